"""The native connect path (libgraft-seccomp.so, modes/seccomp/fast.py).

(a) Its lookup — the very function gs_serve decides with — answers what `EgressTable.lookup`
answers, on thousands of random tables and operations. (b) A supervisor in this process serves a
container's connects of every kind: with the fast path, the C serves the grants and non-blocking
locals (its counters say so) and the outcomes are those of the Python path (GRAFT_SECCOMP_FAST=0).
"""
from __future__ import annotations

import array
import ctypes
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import threading

import pytest

from sockgraft.core.endpoint import parse_endpoint
from sockgraft.core.engine import Op, Policy
from sockgraft.core.rules import parse_egress, parse_ingress
from sockgraft.host import netns
from sockgraft.host.store import Store
from sockgraft.modes.seccomp import fast as F
from sockgraft.modes.seccomp import kernel as K
from sockgraft.modes.seccomp.supervisor import Supervisor

V4, V6, S, D = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.SOCK_DGRAM
ENDPOINTS = ["a4 type ipv4 addr 127.0.0.1 port dynamic", "b4 type ipv4 addr 127.0.0.9 port 4000",
             "a6 type ipv6 addr ::1 port dynamic", "b6 type ipv6 addr fd00::9 port 7",
             "u type unix path /tmp/sg-none.sock"]
NAMES = ["a4", "b4", "a6", "b6", "u", "missing"]


@pytest.fixture(scope="module")
def lib():
    return F.load()  # installed by scripts/setup: a missing library is a failure here


def _net(rng: random.Random, version: int) -> str:
    bits = 32 if version == 4 else 128
    plen = rng.choice([0, 1, 7, 8, 9, 16, 23, 24, 31, 32] if version == 4 else [0, 8, 64, 95, 96, 104, 127, 128])
    base = rng.choice(["127.0.0.1", "10.1.2.3", "192.0.2.200", "0.0.0.0", "255.255.255.255"] if version == 4 else
                      ["::1", "fd00::5", "::ffff:127.0.0.1", "2001:db8::1", "::"])
    if rng.random() < 0.3:
        base = str(ipaddress.ip_address(rng.getrandbits(bits)) if version == 6 else ipaddress.IPv4Address(rng.getrandbits(32)))
    return str(ipaddress.ip_network(f"{base}/{plen}", strict=False))


def _addr(rng: random.Random, nets: list[str]) -> str:
    """An address near one of the rules' networks (inside, at an edge, just outside) or anywhere."""
    if nets and rng.random() < 0.8:
        n = ipaddress.ip_network(rng.choice(nets))
        off = rng.choice([0, 1, n.num_addresses - 1, n.num_addresses, -1, rng.randrange(max(1, n.num_addresses))])
        top = 2 ** (32 if n.version == 4 else 128)
        ip = ipaddress.ip_address((int(n.network_address) + off) % top) if n.version == 4 else \
            ipaddress.IPv6Address((int(n.network_address) + off) % top)
        if ip.version == 4 and rng.random() < 0.2:
            return f"::ffff:{ip}"
        return str(ip)
    return rng.choice(["127.0.0.1", "10.0.0.1", "::1", "::ffff:10.1.2.3", "fd00::1", "8.8.4.4", "::"])


def _c_lookup(lib, table, op: Op) -> tuple:
    ip = ipaddress.ip_address(op.addr)
    raw = K.encode_sockaddr(V4 if ip.version == 4 else V6, op.addr, op.port)
    fam, port = ctypes.c_int(0), ctypes.c_uint16(0)
    addr = (ctypes.c_uint8 * 16)()
    r = lib.gs_lookup(ctypes.byref(table), op.family, raw, len(raw), op.type, op.proto, int(op.bound),
                      int(op.foreign), ctypes.byref(fam), addr, ctypes.byref(port))
    if r == F.LOCAL:
        return ("local",)
    if r == F.ASK:
        return ("ask",)
    host = socket.inet_ntop(fam.value, bytes(addr)[:4 if fam.value == V4 else 16])
    return ("grant", fam.value, (host, port.value))


def test_c_lookup_equals_the_engine_table(lib):
    rng = random.Random(20261130)
    eps = {e.name: e for e in map(parse_endpoint, ENDPOINTS)}
    checked = {"grant": 0, "local": 0, "ask": 0}
    for _ in range(3000):
        rules = [f"{_net(rng, rng.choice([4, 6]))}={rng.choice(NAMES)}" for _ in range(rng.randrange(6))]
        policy = Policy(eps, [], [parse_egress(r) for r in rules])
        et = policy.egress_table()
        table, _rows = F.make_table(policy)
        nets = [r.split("=")[0] for r in rules]
        for _ in range(8):
            addr = _addr(rng, nets)
            v6addr = ipaddress.ip_address(addr).version == 6
            family = V6 if v6addr or rng.random() < 0.4 else V4
            op = Op("connect", family, addr, rng.randrange(65536), rng.choice([S, S, D, D, socket.SOCK_RAW]),
                    rng.choice([0, 0, 0, socket.IPPROTO_TCP, socket.IPPROTO_UDP, 132]),
                    bound=rng.random() < 0.1, foreign=rng.random() < 0.1)
            want, got = et.lookup(op), _c_lookup(lib, table, op)
            assert got == want, (rules, op, want, got)
            checked[want[0]] += 1
    assert min(checked.values()) > 500, checked  # every answer was exercised, many times


def test_c_lookup_never_takes_an_address_the_socket_cannot_use(lib):
    eps = {e.name: e for e in map(parse_endpoint, ENDPOINTS)}
    table, _rows = F.make_table(Policy(eps, [], [parse_egress("::/0=a6")]))
    op = Op("connect", V4, "::1", 80, S)  # an IPv4 socket given a sockaddr_in6: the kernel's answer
    assert _c_lookup(lib, table, op) == ("ask",)


def _pair(rng: random.Random) -> str:
    addr = rng.choice(["0.0.0.0", "127.0.0.1", "10.1.2.3", "[::]", "[::1]", "[fd00::5]"])
    lo = rng.choice([1, 80, 443, 8080, 65535, rng.randrange(1, 65536)])
    ports = str(lo) if rng.random() < 0.6 else f"{lo}-{min(65535, lo + rng.randrange(100))}"
    return f"{addr}:{ports}={rng.choice(NAMES)}"


def test_c_bind_local_only_where_the_engine_says_local(lib):
    """gs_bind_local (what the C loop answers without the engine) is 1 only where Policy.decide
    answers "local" for a bind on a fresh socket, whatever V6ONLY, type, protocol or netns; and it
    takes most of those (it is not simply always 0)."""
    rng = random.Random(20261201)
    eps = {e.name: e for e in map(parse_endpoint, ENDPOINTS)}
    lib.gs_bind_local.restype = ctypes.c_int
    seen = {"c-local": 0, "engine-local": 0}
    for _ in range(2000):
        pairs = [_pair(rng) for _ in range(rng.randrange(5))]
        policy = Policy(eps, [parse_ingress(p) for p in pairs], [])
        table, _keep = F.make_table(policy)
        for _ in range(8):
            port = rng.choice([0, 80, 443, 8080, 65535, rng.randrange(65536)])
            addr = rng.choice(["0.0.0.0", "127.0.0.1", "10.1.2.3", "10.1.2.4", "::", "::1", "fd00::5",
                               "::ffff:127.0.0.1", "::ffff:0.0.0.0"])
            v6addr = ipaddress.ip_address(addr).version == 6
            family = V6 if v6addr or rng.random() < 0.3 else V4
            if family == V6 and not v6addr:
                addr = f"::ffff:{addr}"  # what an IPv6 socket is given for an IPv4 address
            raw = K.encode_sockaddr(family, addr, port)
            c_local = lib.gs_bind_local(ctypes.byref(table), family, raw, len(raw))
            for typ, proto in ((S, socket.IPPROTO_TCP), (D, socket.IPPROTO_UDP)):
                for v6only in (False, True):
                    for foreign in (False, True):
                        d = policy.decide(Op("bind", family, addr, port, typ, proto, v6only=v6only, foreign=foreign))
                        if c_local:
                            assert d.verdict == "local", (pairs, family, addr, port, typ, v6only, foreign, d)
            engine_local = policy.decide(Op("bind", family, addr, port, S, socket.IPPROTO_TCP)).verdict == "local"
            seen["c-local"] += c_local
            seen["engine-local"] += engine_local
    assert seen["c-local"] > 0.8 * seen["engine-local"] > 1000, seen


CHILD = r"""
import errno, json, os, select, socket, sys
from sockgraft.modes.seccomp.attach import install_in_child
from sockgraft.modes.seccomp.bpf import filter_program
import array
c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])
fd = install_in_child(filter_program().assemble())
c.sendmsg([b"listener"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
os.close(fd); c.recv(1); c.close()
port = int(sys.argv[2])
out = {}
def name(e): return errno.errorcode.get(e, str(e)) if e else "ok"
def attempt(key, family, kind, dest, blocking=True, bind=None, twice=False):
    s = socket.socket(family, kind)
    try:
        if bind: s.bind(bind)
        s.setblocking(blocking)
        e = s.connect_ex(dest)
        if e == errno.EINPROGRESS:
            select.select([], [s], [], 5)
            e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or 0
            out[key + " waited"] = True
        out[key] = name(e)
        if twice: out[key + " again"] = name(s.connect_ex(dest))
        out[key + " cloexec"] = not s.get_inheritable()
    finally:
        s.close()
attempt("grant blocking", socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", port), twice=True)
attempt("grant nonblocking", socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", port), blocking=False)
attempt("grant v6 socket", socket.AF_INET6, socket.SOCK_STREAM, ("::ffff:127.0.0.1", port))
attempt("grant udp", socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", port))
attempt("grant refused", socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", int(sys.argv[3])))
attempt("local nonblocking", socket.AF_INET, socket.SOCK_STREAM, ("192.0.2.1", 9), blocking=False)
attempt("local blocking", socket.AF_INET, socket.SOCK_STREAM, ("192.0.2.1", 9))
attempt("local udp", socket.AF_INET, socket.SOCK_DGRAM, ("192.0.2.1", 9))
attempt("denied", socket.AF_INET, socket.SOCK_STREAM, ("10.1.2.3", 80))
attempt("bound first", socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", port), bind=("127.0.0.1", 0))
b = socket.socket(socket.AF_INET6)  # what no ingress pair takes: bound in the container
b.bind(("::1", 0))
out["local bind"], out["local bind has a port"] = b.getsockname()[0], b.getsockname()[1] > 0
try:
    b.bind(("::1", 0))
except OSError as e:
    out["local bind again"] = name(e.errno)
b.close()
print(json.dumps(out, sort_keys=True), flush=True)
"""


def _serve_child(state_dir: str, ns: str, tmp_path, port: int, closed: int) -> tuple[dict, dict]:
    key = ns
    with Store(state_dir) as store:
        store.install(key, netns.by_name(ns).ino, "seccomp", [parse_endpoint("out type ipv4 addr 127.0.0.1 port dynamic")],
                      [], [parse_egress("127.0.0.0/8=out"), parse_egress("10.0.0.0/8=nope")], fresh=True)
    sup = Supervisor(state_dir)
    sup.start_thread()
    path = str(tmp_path / f"fast{os.getpid()}-{id(sup)}.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    p = None
    try:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CHILD, path, str(port), str(closed)],
                             stdout=subprocess.PIPE, text=True)
        srv.settimeout(30)
        conn, _ = srv.accept()
        fds = array.array("i")
        _msg, anc, _flags, _addr = conn.recvmsg(16, socket.CMSG_SPACE(4))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:4])
        sup.add_listener(fds[0], key, p.pid)
        conn.send(b"g")
        conn.close()
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        return json.loads(out), dict(sup.stats)
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        srv.close()
        sup.close()
        os.unlink(path)


def test_fast_path_serves_connects_as_python_does(state_dir, ns, tmp_path, monkeypatch):
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen(64)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connects to it are refused
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                c, _ = host.accept()
                c.close()
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    port, refused = host.getsockname()[1], closed.getsockname()[1]
    try:
        monkeypatch.setenv(F.ENV, "1")
        pooled, pooled_stats = _serve_child(state_dir, ns, tmp_path, port, refused)
        monkeypatch.setenv("GRAFT_POOLS", "0")
        fast, fast_stats = _serve_child(state_dir, ns, tmp_path, port, refused)
        monkeypatch.setenv(F.ENV, "0")
        slow, slow_stats = _serve_child(state_dir, ns, tmp_path, port, refused)
    finally:
        stop.set()
        host.close()
        closed.close()
    # pooled sockets (the app's own connect runs on one: CONTINUE), sockets made and connected by
    # the C, and Python: the program sees the same outcomes
    assert pooled == fast == slow
    if os.geteuid() == 0:  # pools: with the bind guard and the kernel's egress table
        assert pooled_stats.get("fast_pooled", 0) >= 3 and "fast_park" not in pooled_stats, pooled_stats
    assert "fast_pooled" not in fast_stats, fast_stats
    assert fast["grant blocking"] == "ok" and fast["grant blocking again"] == "EISCONN"
    assert fast["grant nonblocking"] == "ok" and fast["grant udp"] == "ok" and fast["grant v6 socket"] == "ok"
    assert fast["grant refused"] == "ECONNREFUSED" and fast["denied"] == "EADDRNOTAVAIL"
    assert fast["bound first"] == "ECONNREFUSED"  # bound in the container: stays there
    # the C served the grants and the non-blocking locals; Python the rest
    assert fast_stats.get("fast_grant", 0) + fast_stats.get("fast_park", 0) >= 4, fast_stats
    assert fast_stats.get("fast_local", 0) >= 2 and fast_stats.get("fast_handback", 0) >= 3, fast_stats
    assert fast["local bind"] == "::1" and fast["local bind has a port"] and fast["local bind again"] == "EINVAL"
    # what no rule matches: getsockname of a container socket answered CONTINUE by the C; binds
    # decided there too; where the kernel guards host sockets the app's own call runs (CONTINUE)
    assert fast_stats.get("fast_continue", 0) >= 2 and pooled_stats.get("fast_continue", 0) >= 2, fast_stats
    assert fast_stats.get("fast_local", 0) >= 4, fast_stats  # 2 connects, 2 binds
    if os.geteuid() == 0:  # the blocking local connect and the binds: CONTINUE
        assert pooled_stats.get("fast_local_continue", 0) >= 3, pooled_stats
    assert "fast_local_continue" not in fast_stats, fast_stats
    assert not any(k.startswith("fast_") for k in slow_stats), slow_stats
    assert slow_stats["grafted_connect"] == fast_stats["grafted_connect"], (fast_stats, slow_stats)


def test_pools_are_filled_for_dynamic_endpoints_and_closed_with_their_table():
    """The host sockets a target's table holds ahead (struct gs_pool): only for rows of a dynamic IP
    endpoint, bound with NO_PORT to its address and marked; none while pools are off; all closed
    when the table is replaced or the target goes (no fd kept)."""
    from sockgraft.core.tables import MARK_TAG

    pol = Policy({"dyn": parse_endpoint("dyn type ipv4 addr 127.0.0.2 port dynamic"),
                  "fixed": parse_endpoint("fixed type ipv4 addr 127.0.0.3 port 9")},
                 [], [parse_egress("127.0.0.0/8=dyn"), parse_egress("10.0.0.0/8=fixed")], MARK_TAG | 3)
    off = F.Compiled(pol, 0, 0)
    off.fill(lambda: "pools off")
    assert off.pools is None and not off.table.pools
    c = F.Compiled(pol, 0, 0)
    c.fill(lambda: "")
    rows = [c.rows[i] for i in range(c.table.nrows)]
    pools = [c.pools[i] for i in range(c.table.nrows)]
    dyn = next(i for i, r in enumerate(rows) if r.epport == 0)
    assert pools[dyn].n == F.POOL and all(p.n == 0 for i, p in enumerate(pools) if i != dyn)
    fds = list(pools[dyn].fds[:F.POOL])
    for fd in fds:
        s = socket.socket(fileno=os.dup(fd))
        try:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == MARK_TAG | 3
            assert s.getsockname() == ("127.0.0.2", 0) and s.type == socket.SOCK_STREAM
        finally:
            s.close()
    c.close()
    assert c.pools is None and not c.table.pools
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
