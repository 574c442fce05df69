"""What every `graft bench` workload shares: the profiles (how much to run), the server processes of
one cell, the Workload interface and how a client finds its server.

A workload has variants (params), directions, a server started per (variant group, direction,
topology) and a client measurement that returns {metric: (value, unit)}.
Directions: c2h (client in c1, server on the host), h2c (client on the host, server in c1),
c2c (client in c2, server in c1), and `in-c1` for operations inside one container.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from sockgraft.bench.ports import free_port
from sockgraft.bench.topologies import Listener, Topology, TopologyError
from sockgraft.host.children import python

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
    http_directions: tuple = ("h2c",)  # the keep-alive and siege cells
    http_close_sizes: tuple = (64, KIB)  # wrk with a new connection per request ("Connection: close")
    http_close_conns: tuple = (1, 16)
    http_close_directions: tuple = ("c2h", "h2c")
    siege_sizes: tuple = (64, 64 * KIB)
    zmq_thr_sizes: tuple = (64, KIB, 128 * KIB, MIB)
    zmq_lat_sizes: tuple = (64, 256 * KIB)
    zmq_directions: tuple = ("c2h", "h2c")
    python: tuple = ("stream", "pingpong")
    ctl: tuple = ("bind", "connect", "local-bind", "local-connect")  # local-*: what no rule matches
    churn: int = 100_000  # client-first-close connections per run (0: no churn cells)
    churn_warmup: int = 2_000  # connections of its warm-up run
    churn_max_seconds: float = 60.0  # a run stops here (counted) rather than crawl on


QUICK = Profile("quick", runs=3, seconds=1.0, py_seconds=0.3, directions=("c2h",), iperf=("tcp",), sockperf=(("tcp", True),),
                sockperf_directions=("c2h",), http_sizes=(KIB,), http_modes=(("keepalive", 1),), http_close_sizes=(64,),
                http_directions=("c2h",), siege_sizes=(),
                zmq_thr_sizes=(KIB,), zmq_lat_sizes=(), zmq_directions=("c2h",), churn=30_000, churn_max_seconds=12.0)
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
            raise TopologyError(f"server exited {p.returncode}: {tail(log)}")
        if time.monotonic() > deadline:
            raise TopologyError(f"server not listening on {proto} port {port} after {timeout}s: {tail(log)}")
        time.sleep(0.02)


def tail(path: str) -> str:
    try:
        with open(path) as f:
            return " | ".join(f.read().strip().splitlines()[-3:])
    except OSError:
        return ""


class Workload:
    name = ""
    kind = "binary"  # "binary": unmodified programs; "python": our peers (graft API capable)
    python_peer = False  # runs a peer of ours on the bench's interpreter (kind "python" always does)

    def variants(self, profile: Profile) -> list[dict]:
        raise NotImplementedError

    def directions(self, profile: Profile) -> tuple:
        return profile.directions

    def applies(self, params: dict, direction: str, profile: Profile) -> bool:
        """Whether the variant `params` is measured in `direction` (default: in all of them)."""
        return True

    def server_key(self, params: dict):
        return None

    def warm_params(self, params: dict, profile: Profile) -> dict:
        """The params of a discarded warm-up run (default: the measured ones)."""
        return params

    def start(self, servers: Servers, side: str, params: dict) -> None:
        raise NotImplementedError

    def measure(self, topo: Topology, servers: Servers, client_side: str, params: dict, profile: Profile) -> dict:
        raise NotImplementedError

    def label(self, params: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in params.items())


def target(topo: Topology, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
    addr, port = topo.target(client_side, listener, proto)
    topo.check_route(client_side, addr)
    return addr, port




def py(module: str, *args: str) -> list[str]:
    """A Python peer of the bench (sockgraft.bench.MODULE) run by this interpreter."""
    return python("-m", f"sockgraft.bench.{module}", *args)
