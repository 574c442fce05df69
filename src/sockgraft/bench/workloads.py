"""Workloads for `graft bench`: real tools, run identically in every topology (iperf3, sockperf,
nginx + wrk/siege, ZeroMQ, the Python peers); the connection-setup workloads (control path,
client-first-close churn) are in sockgraft.bench.connsetup. WORKLOADS names them all.
The shared parts (Profile, Servers, Workload) are in sockgraft.bench.base.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from sockgraft.bench.base import (KIB, MIB, Workload, py as _py, size_label, tail as _tail, target as _target,
                                  tool_seconds, wait_listening)
from sockgraft.bench.connsetup import Churn, Control
from sockgraft.bench.parsers import new_connections, parse_siege, parse_sockperf, parse_stub_status, parse_wrk
from sockgraft.bench.ports import free_port
from sockgraft.bench.system import ToolTimeout
from sockgraft.bench.topologies import TopologyError


class Iperf3(Workload):
    name = "iperf3"

    def variants(self, profile):
        table = {"tcp": {"proto": "tcp", "streams": 1}, "tcp-P4": {"proto": "tcp", "streams": 4},
                 "udp": {"proto": "udp", "streams": 1, "len": 1472}, "udp-64": {"proto": "udp", "streams": 1, "len": 64}}
        return [table[v] for v in profile.iperf]

    def start(self, servers, side, params):
        servers.start("iperf3", side, lambda l: ["iperf3", "-s", "-B", l.bind, "-p", str(l.port)])

    def measure(self, topo, servers, client_side, params, profile):
        addr, port = _target(topo, client_side, servers.listeners["iperf3"])
        cmd = ["iperf3", "-c", addr, "-p", str(port), "-t", str(tool_seconds(profile)), "-J"]
        if params["streams"] > 1:
            cmd += ["-P", str(params["streams"])]
        if params["proto"] == "udp":
            cmd += ["-u", "-b", "0", "-l", str(params["len"])]
        out = json.loads(topo.run(client_side, cmd, timeout=60))
        if "error" in out:
            raise TopologyError(f"iperf3: {out['error']}")
        received = out["end"]["sum_received"]
        result = {"throughput": (received["bits_per_second"] / 1e9, "Gbit/s")}
        if params["proto"] == "udp":
            result["loss"] = (received.get("lost_percent", 0.0), "%")
        result["_bytes"] = (received["bytes"], "B")
        return result


class Sockperf(Workload):
    name = "sockperf"

    def variants(self, profile):
        return [{"proto": p, "msg": 14, "pinned": pinned} for p, pinned in profile.sockperf]

    def server_key(self, params):
        return (params["proto"], params["pinned"])

    def directions(self, profile):
        return profile.sockperf_directions

    def start(self, servers, side, params):
        pin = ["taskset", "-c", "0"] if params["pinned"] else []
        tcp = ["--tcp"] if params["proto"] == "tcp" else []
        servers.start("sockperf", side, lambda l: [*pin, "sockperf", "server", "-i", l.bind, "-p", str(l.port), *tcp],
                      proto=params["proto"])

    def measure(self, topo, servers, client_side, params, profile):
        addr, port = _target(topo, client_side, servers.listeners["sockperf"], params["proto"])
        pin = ["taskset", "-c", "1"] if params["pinned"] else []
        tcp = ["--tcp"] if params["proto"] == "tcp" else []
        out = topo.run(client_side, [*pin, "sockperf", "ping-pong", "-i", addr, "-p", str(port), *tcp,
                                     "-t", str(tool_seconds(profile)), "-m", str(params["msg"])], timeout=60)
        return parse_sockperf(out)


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 65;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    server {{
        listen {bind}:{port};
        root {dir}/www;
        location = /nginx-status {{ stub_status; }}
    }}
}}
"""


class Http(Workload):
    """nginx (own config in a temp dir) driven by wrk, and by siege for a few sizes."""

    name = "http"

    def variants(self, profile):
        out = [{"tool": "wrk", "size": size_label(s), "conn": mode, "c": c}
               for s in profile.http_sizes for mode, c in profile.http_modes]
        out += [{"tool": "wrk", "size": size_label(s), "conn": "close", "c": c}
                for s in profile.http_close_sizes for c in profile.http_close_conns]
        out += [{"tool": "siege", "size": size_label(s), "conn": "keepalive", "c": 1} for s in profile.siege_sizes]
        return out

    def directions(self, profile):
        return tuple(dict.fromkeys((*profile.http_directions, *profile.http_close_directions)))

    def applies(self, params, direction, profile):
        """Connection-per-request cells in their directions, keep-alive and siege in theirs."""
        if params["tool"] == "wrk" and params["conn"] == "close":
            return direction in profile.http_close_directions
        return direction in profile.http_directions

    def start(self, servers, side, params):
        d = os.path.join(servers.logdir, "nginx")  # removed with the server logs
        os.makedirs(os.path.join(d, "www"))
        os.chmod(servers.logdir, 0o755)
        os.chmod(d, 0o755)
        for n in (64, KIB, 4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB):
            with open(os.path.join(d, "www", size_label(n)), "wb") as f:
                f.write(b"x" * n)

        def cmd(listener):
            conf = os.path.join(d, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(dir=d, bind=listener.bind, port=listener.port))
            return ["nginx", "-c", conf, "-p", d, "-e", os.path.join(d, "error.log")]

        servers.start("nginx", side, cmd)
        servers.nginx_dir = d

    def measure(self, topo, servers, client_side, params, profile):
        addr, port = _target(topo, client_side, servers.listeners["nginx"])
        url = f"http://{addr}:{port}/{params['size']}"
        secs = tool_seconds(profile)
        if params["tool"] == "wrk":
            close = params["conn"] == "close"
            hdr = ["-H", "Connection: close"] if close else []  # with the space: wrk keeps alive without it
            before = nginx_status(topo, servers.listeners["nginx"])
            out = topo.run(client_side, ["wrk", "-t1", f"-c{params['c']}", f"-d{secs}s", *hdr, url], timeout=60)
            result = parse_wrk(out)
            seen = new_connections(before, nginx_status(topo, servers.listeners["nginx"]),
                                   result["_requests"][0], close)
            result["_connections"] = (seen["connections"], "conn")
            return result
        rc = os.path.join(servers.nginx_dir, "siegerc")
        with open(rc, "w") as f:
            f.write(f"connection = {'keep-alive' if params['conn'] == 'keepalive' else 'close'}\nprotocol = HTTP/1.1\n"
                    "logging = false\nshow-logfile = false\nparser = false\nfailures = 1000000\n")
        cmd = ["siege", "-R", rc, "-b", "-c", str(params["c"]), "-t", f"{secs}S", url]
        try:  # siege prints its statistics on stderr
            out = topo.run(client_side, cmd, timeout=secs + 30, stderr=True)
        except ToolTimeout as e:  # siege now and then never exits after its time (JoeDog/siege#4, #66)
            print(f"graft bench: {e}: siege once more", file=sys.stderr)
            out = topo.run(client_side, cmd, timeout=secs + 30, stderr=True)
        return parse_siege(out)


def nginx_status(topo, listener) -> dict:
    """nginx's counters, read from the host netns (where the bench runs) with one HTTP/1.0 request."""
    addr, port = _target(topo, "host", listener)
    with socket.create_connection((addr, port), timeout=10) as c:
        c.sendall(b"GET /nginx-status HTTP/1.0\r\nHost: bench\r\n\r\n")
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    return parse_stub_status(data.decode("latin-1"))


class Zmq(Workload):
    """PUSH/PULL throughput (measured by PULL) and REQ/REP round trips; the server is one-shot, so it
    starts anew for every run."""

    name = "zmq"
    python_peer = True  # libzmq driven by sockgraft.bench.zmqpeer

    def variants(self, profile):
        return ([{"pattern": "push-pull", "size": s} for s in profile.zmq_thr_sizes]
                + [{"pattern": "req-rep", "size": s} for s in profile.zmq_lat_sizes])

    def directions(self, profile):
        return profile.zmq_directions

    def start(self, servers, side, params):
        servers.side = side

    def measure(self, topo, servers, client_side, params, profile):
        role = "pull" if params["pattern"] == "push-pull" else "rep"
        log = os.path.join(servers.logdir, "zmq.log")
        port = free_port()
        listener = topo.listen(servers.side, port)
        with open(log, "w") as f:
            srv = topo.popen(servers.side, _py("zmqpeer", role, "--bind", f"tcp://{listener.bind}:{port}", "--timeout", "30"),
                             [port], stdout=subprocess.PIPE, stderr=f, text=True)
        try:
            wait_listening(srv, port, "tcp", log)
            addr, tport = _target(topo, client_side, listener)
            client = _py("zmqpeer", "push" if role == "pull" else "req", "--connect", f"tcp://{addr}:{tport}",
                         "--size", str(params["size"]), "--seconds", str(profile.py_seconds))
            cout = topo.run(client_side, client, timeout=90)
            out, _ = srv.communicate(timeout=60)
            if srv.returncode != 0:
                raise TopologyError(f"zmqpeer {role} exited {srv.returncode}: {_tail(log)}")
        finally:
            topo.release(srv)
        if role == "pull":
            r = json.loads(out)
            return {"throughput": (r["msgs_per_s"], "msg/s"), "bandwidth": (r["gbit_s"], "Gbit/s"),
                    "_bytes": (r["bytes"], "B")}
        r = json.loads(cout)
        return {"latency-median": (r["median_us"], "µs rtt"), "_messages": (r["count"], "msgs")}

    def label(self, params):
        return f"{params['pattern']} {size_label(params['size'])}"


class PyPeer(Workload):
    """Python TCP stream and ping-pong, the same code in every topology (graft API in graft-api)."""

    name = "python"
    kind = "python"

    def variants(self, profile):
        return [{"test": t} for t in profile.python]

    def start(self, servers, side, params):
        api = servers.topo.graft_api and side != "host"

        def cmd(l):
            return _py("pypeer", "serve", "--bind", l.bind, "--port", str(l.port),
                       *(["--graft-endpoint", f"s{l.port}"] if api else []))

        servers.start("pypeer", side, cmd)

    def measure(self, topo, servers, client_side, params, profile):
        addr, port = _target(topo, client_side, servers.listeners["pypeer"])
        api = ["--graft-source", "out"] if topo.graft_api and client_side != "host" else []
        out = json.loads(topo.run(client_side, _py("pypeer", params["test"], "--connect", addr, "--port", str(port),
                                                   "--seconds", str(profile.py_seconds), *api), timeout=60))
        if params["test"] == "stream":
            return {"throughput": (out["gbit_s"], "Gbit/s"), "_bytes": (out["bytes"], "B")}
        return {"latency-median": (out["median_us"], "µs rtt"), "_messages": (out["count"], "msgs")}


WORKLOADS = {w.name: w for w in (Iperf3(), Sockperf(), Http(), Zmq(), PyPeer(), Control(), Churn())}
