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
import time

import pytest

from sockgraft.core.endpoint import parse_endpoint
from sockgraft.core.engine import Op, Policy
from sockgraft.core.rules import parse_egress, parse_ingress
from sockgraft.host import netns
from sockgraft.host.store import Store
from sockgraft.modes.seccomp import fast as F
from sockgraft.modes.seccomp import fastlib as FL
from sockgraft.modes.seccomp import kernel as K
from sockgraft.modes.seccomp.supervisor import Supervisor

V4, V6, S, D = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.SOCK_DGRAM
ENDPOINTS = ["a4 type ipv4 addr 127.0.0.1 port dynamic", "b4 type ipv4 addr 127.0.0.9 port 4000",
             "a6 type ipv6 addr ::1 port dynamic", "b6 type ipv6 addr fd00::9 port 7",
             "u type unix path /tmp/sg-none.sock"]
NAMES = ["a4", "b4", "a6", "b6", "u", "missing"]


@pytest.fixture(scope="module")
def lib():
    return FL.load()  # installed by scripts/setup: a missing library is a failure here


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
    if r == FL.LOCAL:
        return ("local",)
    if r == FL.ASK:
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
        table, _rows = FL.make_table(policy)
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
    table, _rows = FL.make_table(Policy(eps, [], [parse_egress("::/0=a6")]))
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
        table, _keep = FL.make_table(policy)
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


def _c_lookup_bind(lib, table, op: Op) -> tuple:
    raw = K.encode_sockaddr(op.family, op.addr, op.port)
    row, fam, port = ctypes.c_int(-1), ctypes.c_int(0), ctypes.c_uint16(0)
    addr = (ctypes.c_uint8 * 16)()
    r = lib.gs_lookup_bind(ctypes.byref(table), op.family, raw, len(raw), op.type, op.proto, int(op.v6only),
                           int(op.foreign), ctypes.byref(row), ctypes.byref(fam), addr, ctypes.byref(port))
    if r == FL.LOCAL:
        return ("local",)
    if r == FL.ASK:
        return ("ask",)
    host = socket.inet_ntop(fam.value, bytes(addr)[:4 if fam.value == V4 else 16])
    return ("grant", fam.value, (host, port.value), row.value)


def test_c_bind_lookup_equals_the_engine_table_and_decide(lib):
    """gs_lookup_bind (what serve_bind grants with) answers IngressTable.lookup's answer, and every
    grant is Policy.decide's: the same host family, address and port, by the same pair."""
    rng = random.Random(20261203)
    eps = {e.name: e for e in map(parse_endpoint, ENDPOINTS + ["f4 type ipv4 addr 127.0.0.1 port 8080"])}
    names = NAMES + ["f4", "a4", "a6", "f4"]  # more pairs an endpoint can serve
    checked = {"grant": 0, "local": 0, "ask": 0}
    for _ in range(1500):
        pairs = [_pair(rng).rsplit("=", 1)[0] + "=" + rng.choice(names) for _ in range(rng.randrange(5))]
        policy = Policy(eps, [parse_ingress(p) for p in pairs], [])
        it = policy.ingress_table()
        table, _keep = FL.make_table(policy)
        for _ in range(8):
            port = rng.choice([0, 80, 443, 8080, 65535, rng.randrange(65536)])
            if pairs and rng.random() < 0.5:  # at a pair's port
                port = parse_ingress(rng.choice(pairs)).port_lo
            addr = rng.choice(["0.0.0.0", "127.0.0.1", "10.1.2.3", "::", "::1", "fd00::5", "::ffff:127.0.0.1"])
            v6addr = ipaddress.ip_address(addr).version == 6
            family = V6 if v6addr or rng.random() < 0.3 else V4
            if family == V6 and not v6addr:
                addr = f"::ffff:{addr}"
            op = Op("bind", family, addr, port, rng.choice([S, S, D, D, socket.SOCK_RAW]),
                    rng.choice([0, 0, socket.IPPROTO_TCP, socket.IPPROTO_UDP, 132]), v6only=rng.random() < 0.3,
                    foreign=rng.random() < 0.1)
            want, got = it.lookup(op), _c_lookup_bind(lib, table, op)
            assert got[:3] == want[:3], (pairs, op, want, got)
            if got[0] == "grant":
                assert got[3] == want[3], (pairs, op, want, got)
                d = policy.decide(op)
                assert d.verdict == "grant" and (d.family, d.host) == (got[1], got[2]), (pairs, op, d, got)
            checked[want[0]] += 1
    assert min(checked.values()) > 500, checked


def test_c_decides_from_the_sockaddr_alone_only_where_every_socket_stays_local(lib):
    """What the C loop answers CONTINUE (pools on) without reading the socket's kind: a bind by
    gs_bind_local with the sockaddr's own family (serve_unopened: the socket not even duplicated), a
    connect of a socket of the container's netns by gs_connect_local. Where either says 1, the engine
    answers "local" for EVERY operation the kernel could run with that sockaddr: every IP family the
    kernel pairs it with, any socket type and protocol, V6ONLY, bound or not, in any netns (a grafted
    socket's bind: the kernel's guards, see seccomp_fast.c). And they take most of the engine's
    locals."""
    rng = random.Random(20261202)
    eps = {e.name: e for e in map(parse_endpoint, ENDPOINTS)}
    lib.gs_bind_local.restype = lib.gs_connect_local.restype = ctypes.c_int
    kinds = [(S, 0), (S, socket.IPPROTO_TCP), (D, 0), (D, socket.IPPROTO_UDP), (socket.SOCK_RAW, 1),
             (S, 132), (socket.SOCK_SEQPACKET, 132), (D, 136)]
    seen = {"bind-c": 0, "bind-engine": 0, "connect-c": 0, "connect-engine": 0}
    for _ in range(1500):
        pairs = [_pair(rng) for _ in range(rng.randrange(5))]
        rules = [f"{_net(rng, rng.choice([4, 6]))}={rng.choice(NAMES)}" for _ in range(rng.randrange(5))]
        policy = Policy(eps, [parse_ingress(p) for p in pairs], [parse_egress(r) for r in rules])
        table, _keep = FL.make_table(policy)
        nets = [r.split("=")[0] for r in rules]
        for _ in range(8):
            port = rng.choice([0, 80, 443, 8080, 65535, rng.randrange(65536)])
            addr = rng.choice([_addr(rng, nets), "0.0.0.0", "127.0.0.1", "10.1.2.3", "::", "::1", "fd00::5",
                               "::ffff:127.0.0.1", "::ffff:0.0.0.0"])
            v6addr = ipaddress.ip_address(addr).version == 6
            safam = V6 if v6addr or rng.random() < 0.3 else V4
            if safam == V6 and not v6addr:
                addr = f"::ffff:{addr}"
            raw = K.encode_sockaddr(safam, addr, port)
            c_bind = lib.gs_bind_local(ctypes.byref(table), safam, raw, len(raw))
            c_connect = lib.gs_connect_local(ctypes.byref(table), raw, len(raw))
            # the socket families the kernel lets use this sockaddr: bind only its own; connect an
            # IPv6 socket an AF_INET one too (judged as that IPv4 address)
            for typ, proto in kinds:
                for v6only in (False, True):
                    for foreign in (False, True):
                        for bound in (False, True):
                            if c_bind:
                                d = policy.decide(Op("bind", safam, addr, port, typ, proto, v6only=v6only,
                                                     foreign=foreign, bound=bound))
                                assert d.verdict == "local", (pairs, safam, addr, port, typ, proto, v6only, d)
                            if c_connect:
                                for fam in ((V4, V6) if safam == V4 else (V6,)):
                                    d = policy.decide(Op("connect", fam, addr, port, typ, proto, foreign=foreign,
                                                         bound=bound))
                                    assert d.verdict == "local", (rules, fam, addr, port, typ, proto, d)
            seen["bind-c"] += c_bind
            seen["bind-engine"] += policy.decide(Op("bind", safam, addr, port, S, socket.IPPROTO_TCP,
                                                    v6only=True)).verdict == "local"
            seen["connect-c"] += c_connect
            seen["connect-engine"] += policy.decide(Op("connect", safam, addr, port, S)).verdict == "local"
    assert seen["bind-c"] > 0.8 * seen["bind-engine"] > 1000, seen
    assert seen["connect-c"] >= seen["connect-engine"] > 1000, seen


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
    return _supervised(state_dir, ns, tmp_path, CHILD, [str(port), str(closed)],
                       ["out type ipv4 addr 127.0.0.1 port dynamic"], [], ["127.0.0.0/8=out", "10.0.0.0/8=nope"])


def _supervised(state_dir: str, ns: str, tmp_path, child: str, args: list[str], endpoints: list[str],
                ingress: list[str], egress: list[str], drive=None) -> tuple[dict, dict]:
    """Run `child` (which installs the filter and hands its listener over) in `ns` under a supervisor
    of this process with this table; `drive(p)` talks to it (reading its stdout) before its last
    line, the JSON it prints. Returns that and the supervisor's stats."""
    key = ns
    with Store(state_dir) as store:
        store.install(key, netns.by_name(ns).ino, "seccomp", [parse_endpoint(e) for e in endpoints],
                      [parse_ingress(i) for i in ingress], [parse_egress(e) for e in egress], fresh=True)
    sup = Supervisor(state_dir)
    sup.start_thread()
    path = str(tmp_path / f"fast{os.getpid()}-{id(sup)}.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    p = None
    try:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", child, path, *args],
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
        if drive is not None:
            drive(p)
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
        monkeypatch.setenv(FL.ENV, "1")
        pooled, pooled_stats = _serve_child(state_dir, ns, tmp_path, port, refused)
        monkeypatch.setenv("GRAFT_POOLS", "0")
        fast, fast_stats = _serve_child(state_dir, ns, tmp_path, port, refused)
        monkeypatch.setenv(FL.ENV, "0")
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
    assert pools[dyn].n == FL.POOL and all(p.n == 0 for i, p in enumerate(pools) if i != dyn)
    fds = list(pools[dyn].fds[:FL.POOL])
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


BIND_CHILD = CHILD.split("port = int(sys.argv[2])")[0] + r"""
out = {}
def name(e): return errno.errorcode.get(e, str(e)) if e else "ok"
def denied(family, kind, addr):
    x = socket.socket(family, kind)
    try:
        x.bind(addr)
        return "ok"
    except OSError as e:
        return name(e.errno)
    finally:
        x.close()
t = socket.socket(); t.bind(("0.0.0.0", 8080)); out["tcp"] = t.getsockname(); t.listen(8)
out["tcp again"] = "ok"
try:
    t.bind(("0.0.0.0", 8080))
except OSError as e:
    out["tcp again"] = name(e.errno)
out["tcp cloexec"], out["tcp blocking"] = not t.get_inheritable(), t.getblocking()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.setblocking(False); u.bind(("0.0.0.0", 5353))
out["udp"], out["udp blocking"] = u.getsockname(), u.getblocking()
d = socket.socket(); d.bind(("127.0.0.1", 0)); out["dynamic 0"] = [d.getsockname()[0], d.getsockname()[1] > 0]
r = socket.socket(); r.bind(("127.0.0.1", 9001)); out["range"] = r.getsockname()
s6 = socket.socket(socket.AF_INET6); s6.bind(("::1", 7000)); out["v6"] = s6.getsockname()[:2]
ds = socket.socket(socket.AF_INET6); ds.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
ds.bind(("::", 7001)); out["dual"] = ds.getsockname()[:2]
out["denied"] = denied(socket.AF_INET, socket.SOCK_STREAM, ("0.0.0.0", 6000))
out["local"] = denied(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 6001))
print("ready", flush=True)
c, _peer = t.accept(); out["accepted"] = c.getsockname(); out["got"] = c.recv(10).decode()
select.select([u], [], [], 10); data, _src = u.recvfrom(100); out["udp got"] = data.decode()
print(json.dumps(out, sort_keys=True), flush=True)
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_fast_path_serves_binds_as_python_does(state_dir, ns, tmp_path, monkeypatch):
    """Binds an ingress pair takes, granted by the C (seccomp_fast.c grant_bind) where the pools are
    on and where they are off, and by Python (GRAFT_SECCOMP_FAST=0): the program sees the same
    outcomes: getsockname answers the container's view (the pair's port, or the host port for a
    dynamic one asked with port 0), a second bind EINVAL, a TCP listener accepts on the host port
    (and its accepted socket shows the view too), a UDP socket receives there, a dual-stack [::]
    bind is taken by an IPv4 pair, a pair naming no endpoint refuses, what no pair takes stays local."""
    tcp, udp = _free_ports(2)

    def drive(p) -> None:
        assert p.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", tcp), timeout=10) as c:
            c.sendall(b"hi")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(b"yo", ("127.0.0.1", udp))

    eps = [f"web type ipv4 addr 127.0.0.1 port {tcp}", f"dns type ipv4 addr 127.0.0.1 port {udp}",
           "dyn type ipv4 addr 127.0.0.1 port dynamic", "dyn6 type ipv6 addr ::1 port dynamic"]
    ingress = ["0.0.0.0:8080=web", "0.0.0.0:5353=dns", "127.0.0.1:0=dyn", "127.0.0.1:9000-9009=dyn",
               "[::1]:7000=dyn6", "0.0.0.0:7001=dyn", "0.0.0.0:6000=missing"]
    results = []
    for env in ({FL.ENV: "1"}, {FL.ENV: "1", "GRAFT_POOLS": "0"}, {FL.ENV: "0"}):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        results.append(_supervised(state_dir, ns, tmp_path, BIND_CHILD, [], eps, ingress, [], drive))
    (pooled, pooled_stats), (fast, fast_stats), (slow, slow_stats) = results
    assert pooled == fast == slow
    assert fast["tcp"] == ["0.0.0.0", 8080] and fast["tcp again"] == "EINVAL"
    assert fast["tcp cloexec"] and fast["tcp blocking"] and not fast["udp blocking"]
    assert fast["udp"] == ["0.0.0.0", 5353] and fast["udp got"] == "yo"
    assert fast["dynamic 0"] == ["127.0.0.1", True] and fast["range"] == ["127.0.0.1", 9001]
    assert fast["v6"] == ["::1", 7000] and fast["dual"] == ["::", 7001]
    assert fast["denied"] == "EADDRNOTAVAIL" and fast["local"] == "ok"
    assert fast["accepted"] == ["127.0.0.1", 8080] and fast["got"] == "hi"
    for stats in (pooled_stats, fast_stats):  # the C granted the six binds, Python none
        assert stats.get("fast_bind", 0) == 6 and stats.get("grafted_bind", 0) == 6, stats
    assert "fast_bind" not in slow_stats and slow_stats.get("grafted_bind", 0) == 6, slow_stats


LOCAL_CHILD = CHILD.split("port = int(sys.argv[2])")[0] + r"""
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_INET6); s.bind(("::1", 0)); s.close()
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.connect(("::1", 9)); u.close()
print("{}", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="pools (the kernel's guards) need root")
def test_locals_answered_without_a_record_are_counted_and_audited(state_dir, ns, tmp_path, monkeypatch):
    """Where pools are on, the C loop records the first local bind and connect of each second and
    only counts the others (gs_loop_quiet): every one still reaches the stats and the audit log
    (aggregated), none is lost at the supervisor's stop."""
    monkeypatch.setenv(FL.ENV, "1")
    n = 300
    _out, stats = _supervised(state_dir, ns, tmp_path, LOCAL_CHILD, [str(n)], ["out type ipv4 addr 127.0.0.1 port dynamic"],
                              ["127.0.0.1:80=out"], ["127.0.0.0/8=out"])
    assert stats.get("fast_local", 0) == 2 * n and stats.get("fast_local_continue", 0) == 2 * n, stats
    audit = [json.loads(x) for x in open(os.path.join(state_dir, "audit.log"))]
    for op in ("bind", "connect"):
        lines = [a for a in audit if a["event"] == "local" and a["op"] == op and a["mode"] == "seccomp"]
        assert sum(a["count"] for a in lines) == n, lines


GRANT_CHILD = CHILD.split("port = int(sys.argv[2])")[0] + r"""
import time
port, n, go = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def connects():
    for _ in range(n):
        s = socket.socket(); s.connect(("127.0.0.1", port)); s.close()
connects()
print("half", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
connects()
print("{}", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="pools (the kernel's guards) need root")
def test_pooled_grants_answered_without_a_record_are_counted_and_audited(state_dir, ns, tmp_path, monkeypatch):
    """Where pools are on, the C loop records the first pooled grant of each rule and socket kind per
    second and only counts the others (gs_loop_quiet): every one still reaches the stats and the
    audit log, with the engine's decision, also across a table swapped mid-run (gs_loop_set_table
    hands over the old table's counts) and at the supervisor's stop."""
    monkeypatch.setenv(FL.ENV, "1")
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen(128)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                host.accept()[0].close()
            except OSError:
                return

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    n, go = 200, str(tmp_path / "go")

    def drive(p) -> None:
        assert p.stdout.readline().strip() == "half"
        with Store(state_dir) as store:  # a new policy: the C loop's table is swapped
            store.add(ns, parse_endpoint("more type ipv4 addr 127.0.0.2 port dynamic"))
        time.sleep(0.3)
        open(go, "w").close()

    try:
        _out, stats = _supervised(state_dir, ns, tmp_path, GRANT_CHILD, [str(host.getsockname()[1]), str(n), go],
                                  ["out type ipv4 addr 127.0.0.1 port dynamic"], [], ["127.0.0.0/8=out"], drive)
    finally:
        stop.set()
        host.close()
    assert stats.get("grafted_connect", 0) == 2 * n, stats  # (a connect that met the old table: Python)
    assert stats.get("fast_grant", 0) + stats.get("fast_stale", 0) == 2 * n, stats
    assert stats.get("fast_quiet_grant", 0) > 0, stats
    audit = [json.loads(x) for x in open(os.path.join(state_dir, "audit.log"))]
    lines = [a for a in audit if a["event"] == "grant" and a["op"] == "connect" and a["mode"] == "seccomp"]
    assert sum(a["count"] for a in lines) == 2 * n, lines
    assert {a["endpoint"] for a in lines} == {"out"}, lines
