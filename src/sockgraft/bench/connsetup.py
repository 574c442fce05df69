"""Connection-setup workloads of `graft bench`, run from inside the container (client side c1) by the
Python peer (`sockgraft.bench.pypeer`), the graft API in graft-api and plain sockets elsewhere:

- control: socket+bind+close to an endpoint per second; socket+connect+close per second to a host
  listener, closed normally by the client (TIME_WAIT on the client's side, as real clients leave it),
  with the latency of each blocking socket+connect (p50, p99; unpinned).
- control, local-bind and local-connect: the same operations where no rule of the container matches
  (`[::1]`: the bench's tables have IPv4 rules only), which must cost next to nothing grafted
  (connect: to a listener of the same process, accepted in its loop).
- churn: N x (socket, connect, close), the client closing first, through the `dynamic` endpoint of the
  graft topologies; connections/s and failed connects.

Connect cells get a server of their own for every run (a fresh port, so one run's TIME_WAIT is not
the next run's), and check with it that every connection closed the way it should (FIN, not RST).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess

from sockgraft.bench.base import Profile, Servers, Workload, py, tail, target, wait_listening
from sockgraft.bench.ports import free_port
from sockgraft.bench.topologies import TopologyError


@contextlib.contextmanager
def fresh_server(topo, servers: Servers, side: str):
    """A `pypeer serve` on `side` for one measurement: yields its Listener; stopped afterwards."""
    port = free_port()
    listener = topo.listen(side, port)
    log = os.path.join(servers.logdir, f"pypeer-{port}.log")
    with open(log, "w") as f:
        srv = topo.popen(side, py("pypeer", "serve", "--bind", listener.bind, "--port", str(port)), [port],
                         stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_listening(srv, port, "tcp", log)
        yield listener
        if srv.poll() is not None:
            raise TopologyError(f"pypeer serve exited {srv.returncode}: {tail(log)}")
    finally:
        topo.release(srv)


def holders(port: int) -> str:
    """The host's TCP and UDP sockets on `port` and their processes (`ss`), one line."""
    try:
        r = subprocess.run(["ss", "-Htuanp", f"sport = :{port}"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(ss: {e})"
    return " | ".join(" ".join(line.split()) for line in r.stdout.splitlines()) or "none"


def check_closes(out: dict, ok: int) -> None:
    """Every connection the client made (and closed first) reached the server and closed with a FIN."""
    server = out["server"]
    if server["rst"]:
        raise TopologyError(f"{server['rst']} connections were reset (RST), not closed: not a client-first close")
    if server["fin"] < ok:
        raise TopologyError(f"the client made {ok} connections, the server saw {server['fin']} close")


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
        servers.side = side

    def measure(self, topo, servers, client_side, params, profile):
        secs = str(profile.py_seconds)
        if params["op"].startswith("local-"):
            r = json.loads(topo.run(client_side, py("pypeer", "ctl-local", "--what", params["op"][6:], "--seconds", secs),
                                    timeout=60))
            return {"ops": (r["ops_per_s"], "ops/s"), "_ops": (r["ops"], "ops")}
        if params["op"] == "connect":
            with fresh_server(topo, servers, servers.side) as listener:
                addr, port = target(topo, client_side, listener)
                api = ["--graft-source", "out"] if topo.graft_api else []
                r = json.loads(topo.run(client_side, py("pypeer", "ctl-connect", "--connect", addr, "--port", str(port),
                                                         "--seconds", secs, *api), timeout=60))
            check_closes(r, r["ops"])
            return {"ops": (r["ops_per_s"], "ops/s"), "connect-p50": (r["connect_p50_us"], "µs"),
                    "connect-p99": (r["connect_p99_us"], "µs"), "_ops": (r["ops"], "ops")}
        port = topo.client_port(client_side)
        listener = topo.listen(client_side, port)
        api = ["--graft-endpoint", f"s{port}"] if topo.graft_api else []
        try:
            out = topo.run(client_side, py("pypeer", "ctl-bind", "--bind", listener.bind, "--port", str(port),
                                           "--seconds", secs, *api), ports=[port], timeout=60)
        except TopologyError as e:  # (once, a native bind met EADDRINUSE on a port free_port had found free)
            raise TopologyError(f"{e}; the host's sockets on port {port}: {holders(port)}") from None
        r = json.loads(out)
        return {"ops": (r["ops_per_s"], "ops/s"), "_ops": (r["ops"], "ops")}


class Churn(Workload):
    """Client-first-close churn: N x (socket, connect, close) from the container to a host listener."""

    name = "churn"
    kind = "python"

    def variants(self, profile: Profile):
        return [{"n": profile.churn}] if profile.churn else []

    def directions(self, profile):
        return ("c2h",)

    def warm_params(self, params, profile):
        return {**params, "n": min(params["n"], profile.churn_warmup)}

    def start(self, servers, side, params):
        servers.side = side

    def measure(self, topo, servers, client_side, params, profile):
        with fresh_server(topo, servers, servers.side) as listener:
            addr, port = target(topo, client_side, listener)
            api = ["--graft-source", "out"] if topo.graft_api else []
            r = json.loads(topo.run(client_side, py("pypeer", "churn", "--connect", addr, "--port", str(port),
                                                     "--count", str(params["n"]),
                                                     "--max-seconds", str(profile.churn_max_seconds), *api),
                                    timeout=profile.churn_max_seconds + 120))
        check_closes(r, r["ok"])
        if not r["ok"]:
            raise TopologyError(f"churn: no connection made ({r['errnos']})")
        out = {"connections": (r["conns_per_s"], "conn/s"), "errors": (r["errors"], "errors"),
               "_connections": (r["ok"], "conn"), "_unfinished (time cap)": (r["count"] - r["attempted"], "conn")}
        for name, n in r["errnos"].items():  # the traffic check names the failures
            out[f"_{name}"] = (n, "errors")
        return out

    def label(self, params):
        return f"n={params['n']:,} client closes first"
