"""Workloads for `graft bench`: real tools, run identically in every topology.

A workload has variants (params), directions, a server started per (variant group, direction,
topology) and a client measurement that returns {metric: (value, unit)}.
Directions: c2h (client in c1, server on the host), h2c (client on the host, server in c1),
c2c (client in c2, server in c1), and `in-c1` for operations inside one container.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from sockgraft.bench.ports import free_port
from sockgraft.bench.topologies import Listener, Topology, TopologyError

DIRECTIONS = {"c2h": ("c1", "host"), "h2c": ("host", "c1"), "c2c": ("c2", "c1"), "in-c1": ("c1", "c1")}
KIB = 1024
MIB = 1024 * 1024


def size_label(n: int) -> str:
    if n >= MIB and n % MIB == 0:
        return f"{n // MIB}MiB"
    if n >= KIB and n % KIB == 0:
        return f"{n // KIB}KiB"
    return f"{n}B"


@dataclass
class Profile:
    """How much to run: --quick is a small profile, the default a fuller one."""

    name: str
    runs: int
    warmup: int = 1
    seconds: float = 1.0  # one tool measurement (iperf3, sockperf, wrk, siege: whole seconds)
    py_seconds: float = 0.5  # one Python-peer measurement (ZeroMQ, stream, ping-pong, control path)
    directions: tuple = ("c2h", "h2c", "c2c")
    iperf: tuple = ("tcp", "tcp-P4", "udp")
    sockperf: tuple = (("tcp", True), ("udp", True), ("tcp", False), ("udp", False))
    sockperf_directions: tuple = ("c2h", "h2c")
    http_sizes: tuple = (64, KIB, 4 * KIB, 64 * KIB, 256 * KIB, MIB)
    http_modes: tuple = (("keepalive", 1), ("keepalive", 50))
    http_close_sizes: tuple = (KIB, 64 * KIB)  # new connection per request, c=1
    http_directions: tuple = ("h2c",)
    siege_sizes: tuple = (64, 64 * KIB)
    zmq_thr_sizes: tuple = (64, KIB, 128 * KIB, MIB)
    zmq_lat_sizes: tuple = (64, 256 * KIB)
    zmq_directions: tuple = ("c2h", "h2c")
    python: tuple = ("stream", "pingpong")
    ctl: tuple = ("bind", "connect")


QUICK = Profile("quick", runs=3, seconds=1.0, py_seconds=0.3, directions=("c2h",), iperf=("tcp",), sockperf=(("tcp", True),),
                sockperf_directions=("c2h",), http_sizes=(KIB,), http_modes=(("keepalive", 1),), http_close_sizes=(),
                http_directions=("c2h",), siege_sizes=(),
                zmq_thr_sizes=(KIB,), zmq_lat_sizes=(), zmq_directions=("c2h",))
FULL = Profile("full", runs=3, seconds=1.0, py_seconds=0.5)


def tool_seconds(profile: Profile) -> int:
    return max(1, int(round(profile.seconds)))


class Servers:
    """Server processes of one cell; their logs go to a temp dir."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self.procs: list[subprocess.Popen] = []
        self.listeners: dict[str, Listener] = {}
        self.logdir = tempfile.mkdtemp(prefix=f"sgb{os.getpid()}-srv-")

    def start(self, key: str, side: str, cmd_for, proto: str = "tcp", extra_ports: list[int] = ()) -> Listener:
        port = free_port()
        listener = self.topo.listen(side, port)
        log = open(os.path.join(self.logdir, f"{key}.log"), "w")
        p = self.topo.popen(side, cmd_for(listener), [port, *extra_ports], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(p)
        wait_listening(p, port, proto, os.path.join(self.logdir, f"{key}.log"))
        self.listeners[key] = listener
        return listener

    def stop(self) -> None:
        for p in self.procs:
            self.topo.release(p)
        self.procs.clear()
        import shutil

        shutil.rmtree(self.logdir, ignore_errors=True)


def _ports_in(pid: int, proto: str) -> set[int]:
    ports = set()
    files = ("tcp", "tcp6") if proto == "tcp" else ("udp", "udp6")
    for name in files:
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if proto == "tcp" and parts[3] != "0A":
                continue
            ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(p: subprocess.Popen, port: int, proto: str, log: str, timeout: float = 30.0) -> None:
    """Wait until `port` is bound in the netns where the server's socket lives: the netns of the
    process we started (for grafted servers that is `graft run`, in the host netns)."""
    deadline = time.monotonic() + timeout
    while port not in _ports_in(p.pid, proto):
        if p.poll() is not None:
            raise TopologyError(f"server exited {p.returncode}: {_tail(log)}")
        if time.monotonic() > deadline:
            raise TopologyError(f"server not listening on {proto} port {port} after {timeout}s: {_tail(log)}")
        time.sleep(0.02)


def _tail(path: str) -> str:
    try:
        with open(path) as f:
            return " | ".join(f.read().strip().splitlines()[-3:])
    except OSError:
        return ""


class Workload:
    name = ""
    kind = "binary"  # "binary": unmodified programs; "python": our peers (graft API capable)

    def variants(self, profile: Profile) -> list[dict]:
        raise NotImplementedError

    def directions(self, profile: Profile) -> tuple:
        return profile.directions

    def server_key(self, params: dict):
        return None

    def start(self, servers: Servers, side: str, params: dict) -> None:
        raise NotImplementedError

    def measure(self, topo: Topology, servers: Servers, client_side: str, params: dict, profile: Profile) -> dict:
        raise NotImplementedError

    def label(self, params: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in params.items())


def _target(topo: Topology, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
    addr, port = topo.target(client_side, listener, proto)
    topo.check_route(client_side, addr)
    return addr, port


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


def parse_sockperf(out: str) -> dict:
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)
    avg = re.search(r"avg-latency=\s*([\d.]+)", out)
    p50 = re.search(r"percentile 50\.000 =\s*([\d.]+)", out)
    p99 = re.search(r"percentile 99\.000 =\s*([\d.]+)", out)
    count = re.search(r"ReceivedMessages=(\d+)", out)
    if not (avg and p50 and p99 and count):
        raise TopologyError(f"sockperf printed no latency: {' | '.join(out.strip().splitlines()[-3:])}")
    return {"latency-avg": (float(avg.group(1)), "µs"), "latency-p50": (float(p50.group(1)), "µs"),
            "latency-p99": (float(p99.group(1)), "µs"), "_messages": (int(count.group(1)), "msgs")}


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
    }}
}}
"""


class Http(Workload):
    """nginx (own config in a temp dir) driven by wrk, and by siege for a few sizes."""

    name = "http"

    def variants(self, profile):
        out = [{"tool": "wrk", "size": size_label(s), "conn": mode, "c": c}
               for s in profile.http_sizes for mode, c in profile.http_modes]
        out += [{"tool": "wrk", "size": size_label(s), "conn": "close", "c": 1} for s in profile.http_close_sizes]
        out += [{"tool": "siege", "size": size_label(s), "conn": "keepalive", "c": 1} for s in profile.siege_sizes]
        return out

    def directions(self, profile):
        return profile.http_directions

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
            hdr = ["-H", "Connection: close"] if params["conn"] == "close" else []
            out = topo.run(client_side, ["wrk", "-t1", f"-c{params['c']}", f"-d{secs}s", *hdr, url], timeout=60)
            return parse_wrk(out)
        rc = os.path.join(servers.nginx_dir, "siegerc")
        with open(rc, "w") as f:
            f.write(f"connection = {'keep-alive' if params['conn'] == 'keepalive' else 'close'}\nprotocol = HTTP/1.1\n"
                    "logging = false\nshow-logfile = false\nparser = false\nfailures = 1000000\n")
        out = topo.run(client_side, ["siege", "-R", rc, "-b", "-c", str(params["c"]), "-t", f"{secs}S", url], timeout=60,
                       stderr=True)  # siege prints its statistics on stderr
        return parse_siege(out)


def parse_wrk(out: str) -> dict:
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)|Socket errors:.*", out)
    if not rps or not n or int(n.group(1)) == 0:
        raise TopologyError(f"wrk measured nothing: {' | '.join(out.strip().splitlines()[-3:])}")
    if errors and "Non-2xx" in errors.group(0):
        raise TopologyError(f"wrk: {errors.group(0)}")
    return {"requests": (float(rps.group(1)), "req/s"), "_requests": (int(n.group(1)), "req")}


def parse_siege(out: str) -> dict:
    rate = re.search(r"Transaction rate:\s*([\d.]+)", out)
    ok = re.search(r"Successful transactions:\s*(\d+)", out)
    failed = re.search(r"Failed transactions:\s*(\d+)", out)
    if not rate or not ok or int(ok.group(1)) == 0:
        raise TopologyError(f"siege measured nothing: {' | '.join(out.strip().splitlines()[-3:])}")
    if failed and int(failed.group(1)):
        raise TopologyError(f"siege: {failed.group(1)} failed transactions")
    return {"transactions": (float(rate.group(1)), "trans/s"), "_requests": (int(ok.group(1)), "req")}


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"sockgraft.bench.{module}", *args]


class Zmq(Workload):
    """PUSH/PULL throughput (measured by PULL) and REQ/REP round trips; the server is one-shot, so it
    starts anew for every run."""

    name = "zmq"

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


class Control(Workload):
    """Control path from inside the container: socket+bind+close and socket+connect+close per second."""

    name = "control"
    kind = "python"

    def variants(self, profile):
        return [{"op": op} for op in profile.ctl]

    def directions(self, profile):
        return ("c2h",)

    def server_key(self, params):
        return params["op"]

    def start(self, servers, side, params):
        if params["op"] == "connect":
            servers.start("pypeer", side, lambda l: _py("pypeer", "serve", "--bind", l.bind, "--port", str(l.port)))


    def measure(self, topo, servers, client_side, params, profile):
        secs = str(profile.py_seconds)
        if params["op"] == "connect":
            addr, port = _target(topo, client_side, servers.listeners["pypeer"])
            api = ["--graft-source", "out"] if topo.graft_api else []
            out = topo.run(client_side, _py("pypeer", "ctl-connect", "--connect", addr, "--port", str(port),
                                            "--seconds", secs, *api), timeout=60)
        else:
            port = topo.client_port(client_side)
            listener = topo.listen(client_side, port)
            api = ["--graft-endpoint", f"s{port}"] if topo.graft_api else []
            out = topo.run(client_side, _py("pypeer", "ctl-bind", "--bind", listener.bind, "--port", str(port),
                                            "--seconds", secs, *api), ports=[port], timeout=60)
        r = json.loads(out)
        return {"ops": (r["ops_per_s"], "ops/s"), "_ops": (r["ops"], "ops")}


WORKLOADS = {w.name: w for w in (Iperf3(), Sockperf(), Http(), Zmq(), PyPeer(), Control())}
