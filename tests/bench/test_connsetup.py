"""Connection-setup workloads for real, small: wrk with a new connection per request in both
directions, client-first-close churn and the control path in every topology; and the checks behind
them (nginx's counters refuse a wrk run that kept connections alive; the peer server tells a FIN
from an RST)."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from sockgraft.bench import topologies as T
from sockgraft.bench.base import Profile, Servers
from sockgraft.bench.debris import owned_processes
from sockgraft.bench.parsers import new_connections, parse_wrk
from sockgraft.bench.runner import run_bench
from sockgraft.bench.stats import validate
from sockgraft.bench.workloads import Http, nginx_status
from tests.helpers import free_port, stop, wait_port

pytestmark = pytest.mark.e2e

ALL = ["native", "nat", "graft-api", "graft-preload", "graft-seccomp"]
TINY = Profile("tiny-setup", runs=1, warmup=1, seconds=1, py_seconds=0.2, directions=("c2h",), http_sizes=(),
               siege_sizes=(), http_close_sizes=(64,), http_close_conns=(1, 16), ctl=("connect",), churn=2000,
               churn_warmup=100)


def test_connection_setup_cells_in_every_topology():
    res = run_bench(TINY, ALL, ["http", "control", "churn"], progress=False)
    assert not res.errors, res.errors
    measured = set(res.topologies)
    assert {"native", "nat", "graft-api"} <= measured
    for rec in res.records:
        validate(rec)
    cells = {(r["topology"], r["workload"], r["direction"], r["params"].get("c"), r["metric"]) for r in res.records}
    for topo in measured:
        want = {(topo, "control", "c2h", None, m) for m in ("ops", "connect-p50", "connect-p99")}
        want |= {(topo, "churn", "c2h", None, m) for m in ("connections", "errors")}
        if topo != "graft-api":  # wrk and nginx are binaries
            want |= {(topo, "http", d, c, "requests") for d in ("c2h", "h2c") for c in (1, 16)}
        assert want <= cells, (topo, want - cells)
        assert res.traffic[topo]["churn connections"] == 2000  # the measured run made all of them
        if topo != "graft-api":  # nginx saw a connection for every request (the check passed)
            assert res.traffic[topo]["http connections"] >= res.traffic[topo]["http requests"] > 0
    churn_errors = {r["topology"]: r["median"] for r in res.records if r["workload"] == "churn" and r["metric"] == "errors"}
    assert churn_errors["native"] == 0
    p50 = {r["topology"]: r["median"] for r in res.records if r["metric"] == "connect-p50"}
    assert all(v > 0 for v in p50.values())
    assert owned_processes(os.getpid()) == []


def test_wrk_keeping_connections_alive_is_refused():
    """wrk with 'Connection:close' (no space) keeps its connections alive; the nginx counters show it."""
    topo = T.Native()
    servers = Servers(topo)
    try:
        Http().start(servers, "host", {})
        listener = servers.listeners["nginx"]
        seen = {}
        for header in ("Connection: close", "Connection:close"):
            before = nginx_status(topo, listener)
            out = topo.run("host", ["wrk", "-t1", "-c4", "-d1s", "-H", header, f"http://127.0.0.1:{listener.port}/64B"])
            seen[header] = (before, nginx_status(topo, listener), parse_wrk(out)["_requests"][0])
        good = new_connections(*seen["Connection: close"], close=True)
        assert good["connections"] >= good["requests"] > 0
        with pytest.raises(T.TopologyError, match="reused connections"):
            new_connections(*seen["Connection:close"], close=True)
    finally:
        servers.stop()
        topo.teardown()


def _closes(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"C")
        return json.loads(c.makefile().readline())


def test_peer_server_tells_fin_from_rst():
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "sockgraft.bench.pypeer", "serve", "--port", str(port)],
                           stdout=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        _closes(port)  # start counting from here
        for linger in (False, True, False):
            c = socket.create_connection(("127.0.0.1", port))
            if linger:  # what the old control benchmark did: close with RST, no TIME_WAIT
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
        assert _closes(port) == {"fin": 2, "rst": 1}
        out = subprocess.run([sys.executable, "-m", "sockgraft.bench.pypeer", "churn", "--connect", "127.0.0.1",
                              "--port", str(port), "--count", "500"], capture_output=True, text=True, timeout=60)
        r = json.loads(out.stdout)
        assert (r["ok"], r["errors"], r["server"]) == (500, 0, {"fin": 500, "rst": 0})
    finally:
        stop(srv)


def test_peer_server_settles_waiting_connections_ready_in_the_same_batch():
    """A b"C" that comes with the closes of connections the server was waiting on (their FINs ready
    in the same wake-up): it counts them before it answers, and the wake-up's other events for
    those connections do not stop it (they were settled and closed already)."""
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "sockgraft.bench.pypeer", "serve", "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port("127.0.0.1", port)
        _closes(port)
        for _ in range(5):
            ask = socket.create_connection(("127.0.0.1", port), timeout=10)
            time.sleep(0.1)  # accepted, waiting for its first byte
            waiting = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
            time.sleep(0.2)
            ask.sendall(b"C")
            for c in waiting:
                c.close()
            assert json.loads(ask.makefile().readline()) == {"fin": 20, "rst": 0}
            ask.close()
        assert _closes(port) == {"fin": 0, "rst": 0} and srv.poll() is None
    finally:
        stop(srv)
    assert b"Traceback" not in srv.stderr.read()


def test_local_operations_in_every_topology():
    """What no rule matches (`[::1]` in the container): bind and connect measured in every topology."""
    tiny = Profile("tiny-local", runs=1, warmup=1, seconds=1, py_seconds=0.2, directions=("c2h",),
                   ctl=("local-bind", "local-connect"))
    res = run_bench(tiny, ALL, ["control"], progress=False)
    assert not res.errors, res.errors
    ops = {(r["topology"], r["params"]["op"]): r["median"] for r in res.records if r["metric"] == "ops"}
    assert set(ops) == {(t, op) for t in res.topologies for op in tiny.ctl}
    assert {"native", "graft-preload", "graft-seccomp"} <= set(res.topologies)
    assert all(v > 0 for v in ops.values())
    assert owned_processes(os.getpid()) == []
