"""The fd service's native fast path (csrc/fdservice_fast.c, through the installed libgraft-fdfast.so
that production loads) parses and decides exactly as Python does:

- `fs_parse` accepts a request exactly when core/protocol.parse_request accepts it as a `connect`, a
  `pool`, a `bind` or a `bindpool` (and its caller rules are ones the Python side compiled), with
  the same fields; it hands back everything else (`named`, `namedpool`: test_fast_named.py). Hand-picked and thousands of seeded random byte strings.
- `fs_lookup` equals engine.EgressTable.lookup on thousands of random tables and operations, and
  the row it names carries the endpoint and reason `Policy.decide` gives (what the audit writes).
"""
from __future__ import annotations

import ctypes
import ipaddress
import random
import socket

import pytest

from sockgraft.core import tables
from sockgraft.core.endpoint import parse_endpoint
from sockgraft.core.engine import GRANT, LOCAL, Op, Policy
from sockgraft.core.protocol import MAX_POOL, ProtocolError, parse_request
from sockgraft.core.rules import parse_egress, parse_ingress
from sockgraft.modes.api import fast


@pytest.fixture(scope="module")
def lib():
    try:
        return fast.open_library()  # the installed library, whatever GRAFT_FDSERVICE_FAST says
    except OSError as e:
        pytest.fail(f"{fast.lib_path()} does not load ({e}): run scripts/setup")


def tables_for(tails: list[bytes]):
    arr = (fast.Table * len(tails))()
    keep = []
    for t, tail in zip(arr, tails):
        rows = (fast.Row * 1)()
        t.tail, t.tail_len, t.nrows, t.rows = tail, len(tail), 0, ctypes.cast(rows, ctypes.POINTER(fast.Row))
        t.verbs = fast.tail_verbs(tail)
        keep.append(rows)
    return arr, keep


def c_parse(lib, data: bytes, tails: list[bytes]):
    arr, _keep = tables_for(tails)
    req = fast.Req()
    if lib.fs_parse(data, len(data), arr, len(tails), ctypes.byref(req)) < 0:
        return None
    return fast.VERBS[req.verb], req.family, bytes(req.addr[:4] if req.family == socket.AF_INET else req.addr), \
        req.port, req.type, req.proto, req.count, req.flags, tails[req.table]


def py_parse(data: bytes, tails: list[bytes]):
    try:
        r = parse_request(data)
    except ProtocolError:
        return None
    if r.verb not in fast.VERBS or r.verb in ("named", "namedpool"):
        return None
    tail = fast._tail(data)
    if tail not in tails:
        return None
    flags = sum(bit for name, bit in (("reuseaddr", 1), ("reuseport", 2), ("v6only", 4)) if name in r.flags)
    return r.verb, r.family, ipaddress.ip_address(r.addr).packed, r.port, r.type, r.proto, r.count, flags, tail


TAILS = [b"", b" out:127.0.0.0/8=ep-out", b" out:10.0.0.0/8=ep-out bbconn:ep6", b" in:127.0.0.1:80=ep-out",
         b" in:0.0.0.0:1-9=ep-out in:[::]:80=ep6"]
HAND_PICKED = [
    b"connect 2 127.0.0.1 80 1 0", b"connect 10 ::1 80 1 0", b"connect 10 ::ffff:127.0.0.1 443 2 17",
    b"connect 2 127.0.0.1 0 1 0", b"connect 2 127.0.0.1 65535 15 65535", b"connect 2 127.0.0.1 65536 1 0",
    b"connect 2 127.0.0.1 80 16 0", b"connect 2 127.0.0.1 080 01 00", b"connect 2 127.0.0.01 80 1 0",
    b"connect 2 127.0.0.1 80 1", b"connect 2 127.0.0.1 80 1 0 ", b"connect  2 127.0.0.1 80 1 0",
    b"connect 3 127.0.0.1 80 1 0", b"connect 10 127.0.0.1 80 1 0", b"connect 2 ::1 80 1 0",
    b"connect 02 127.0.0.1 80 1 0", b"connect 0000000002 127.0.0.1 80 1 0", b"connect 00000000002 1.2.3.4 1 1 0",
    b"connect 10 fe80::1%eth0 80 1 0", b"connect 10 fe80::1% 80 1 0", b"connect 10 :: 80 1 0",
    b"connect 10 ::: 80 1 0", b"connect 10 1::2::3 80 1 0", b"connect 10 1:2:3:4:5:6:7:8 80 1 0",
    b"connect 10 1:2:3:4:5:6:7::8 80 1 0", b"connect 10 1:2:3:4:5:6:7:: 80 1 0", b"connect 10 ::2:3:4:5:6:7:8 80 1 0",
    b"connect 10 1:2:3:4:5:6:1.2.3.4 80 1 0", b"connect 10 1:2:3:4:5:6:7:1.2.3.4 80 1 0", b"connect 10 ::1.2.3 80 1 0",
    b"connect 10 ::01.2.3.4 80 1 0", b"connect 10 ::FFFF:1.2.3.4 80 1 0", b"connect 10 00000::1 80 1 0",
    b"connect 10 0000::1 80 1 0", b"connect 10 :1::2 80 1 0", b"connect 10 1::2: 80 1 0", b"connect 10 1: 80 1 0",
    b"connect 2 1.2.3.4.5 80 1 0", b"connect 2 256.1.1.1 80 1 0", b"connect 2 1.2.3. 80 1 0", b"connect 2 \xff.1.1.1 80 1 0",
    b"connect 2 1.2.3.4 8\x000 1 0", b"connect 2 1.2.3.4 80 1 0\xff", b"connect 2 1.2.3.4 80 1 0 out:127.0.0.0/8=ep-out",
    b"connect 2 1.2.3.4 80 1 0 out:127.0.0.0/8=ep-ou", b"connect 2 1.2.3.4 80 1 0 out:10.0.0.0/8=ep-out bbconn:ep6",
    b"connect 2 1.2.3.4 80 1 0  out:127.0.0.0/8=ep-out", b"sendto 2 1.2.3.4 80 2 0", b"show", b"connect",
    b"connect ", b"", b"Connect 2 1.2.3.4 80 1 0", b"connect 2 1.2.3.4 80 1 0" + b" " * 4090,
    b"connect 2 \xd9\xa1.2.3.4 80 1 0", b"connect 2 1.2.3.4 \xd9\xa1 1 0",
    b"pool 2 127.0.0.1 80 1 0 16", b"pool 2 127.0.0.1 80 1 0 1", b"pool 2 127.0.0.1 80 1 0 0", b"pool 2 127.0.0.1 80 1 0 17",
    b"pool 2 127.0.0.1 80 1 0 %d" % MAX_POOL, b"pool 2 127.0.0.1 80 1 0 %d" % (MAX_POOL + 1),
    b"pool 2 127.0.0.1 80 1 0 016", b"pool 2 127.0.0.1 80 1 0", b"pool 2 127.0.0.1 80 1 0 4 ", b"pool 10 ::1 80 2 17 3",
    b"pool 2 127.0.0.1 80 1 0 4 out:127.0.0.0/8=ep-out", b"pool 2 127.0.0.1 80 1 0 out:127.0.0.0/8=ep-out",
    b"pool  2 127.0.0.1 80 1 0 4", b"Pool 2 127.0.0.1 80 1 0 4", b"pool", b"pool ", b"poo 2 127.0.0.1 80 1 0 4",
    b"pool 2 127.0.0.1 80 1 0 4 out:10.0.0.0/8=ep-out bbconn:ep6", b"pool 2 127.0.0.1 80 1 0 \xd9\xa1",
    b"bind 2 127.0.0.1 80 1 0 -", b"bind 10 :: 80 1 0 v6only", b"bind 2 0.0.0.0 0 2 17 reuseaddr,reuseport",
    b"bind 2 127.0.0.1 80 1 0 reuseport,reuseaddr,v6only", b"bind 2 127.0.0.1 80 1 0 reuseaddr,reuseaddr",
    b"bind 2 127.0.0.1 80 1 0 reuseaddr,", b"bind 2 127.0.0.1 80 1 0 ,reuseaddr", b"bind 2 127.0.0.1 80 1 0 --",
    b"bind 2 127.0.0.1 80 1 0 ", b"bind 2 127.0.0.1 80 1 0", b"bind 2 127.0.0.1 80 1 0 -,reuseaddr",
    b"bind 2 127.0.0.1 80 1 0 REUSEADDR", b"bind 2 127.0.0.1 80 1 0 reuse", b"bind 2 127.0.0.1 80 1 0 - in:127.0.0.1:80=ep-out",
    b"bind 2 127.0.0.1 80 1 0 - out:127.0.0.0/8=ep-out", b"connect 2 127.0.0.1 80 1 0 in:127.0.0.1:80=ep-out",
    b"pool 2 127.0.0.1 80 1 0 3 in:127.0.0.1:80=ep-out", b"bind 2 127.0.0.1 80 1 0 - in:0.0.0.0:1-9=ep-out in:[::]:80=ep6",
    b"bind 2 127.0.0.1 80 1 0 v6only\xff",
    b"bindpool 2 127.0.0.1 80 1 0 - 16", b"bindpool 10 :: 80 1 0 v6only 1", b"bindpool 2 127.0.0.1 80 1 0 - 17",
    b"bindpool 2 127.0.0.1 80 1 0 - %d" % MAX_POOL, b"bindpool 2 127.0.0.1 80 1 0 - %d" % (MAX_POOL + 1),
    b"bindpool 2 127.0.0.1 80 1 0 - 0", b"bindpool 2 127.0.0.1 80 1 0 -", b"bindpool 2 127.0.0.1 80 1 0 4",
    b"bindpool 2 127.0.0.1 80 1 0 - 4 in:127.0.0.1:80=ep-out", b"bindpool 2 127.0.0.1 80 1 0 - 4 out:127.0.0.0/8=ep-out",
    b"bindpool 2 127.0.0.1 80 1 0 reuseaddr, 4", b"bindpool 2 127.0.0.1 80 1 0 - 4 ", b"bindpool  2 127.0.0.1 80 1 0 - 4",
    b"bindpool", b"bindpool ", b"bindpoo 2 127.0.0.1 80 1 0 - 4", b"bind 2 127.0.0.1 80 1 0 - 4",
]


def test_parse_hand_picked(lib):
    for data in HAND_PICKED:
        assert c_parse(lib, data, TAILS) == py_parse(data, TAILS), data


def random_addr(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.25:
        return str(ipaddress.IPv4Address(rng.getrandbits(32)))
    if k < 0.5:
        ip = ipaddress.IPv6Address(rng.getrandbits(128) if rng.random() < 0.5 else rng.getrandbits(16))
        return rng.choice([ip.compressed, ip.exploded, ip.compressed.upper()])
    if k < 0.6:
        return "::ffff:" + str(ipaddress.IPv4Address(rng.getrandbits(32)))
    if k < 0.8:  # hextets and separators put together at random
        parts = [rng.choice(["", "0", "1", "ff", "FFFF", "00000", "abcd", "g", "0001", "1.2.3.4", "01.2.3.4",
                             "255.255.255.255", "256.0.0.1"]) for _ in range(rng.randint(0, 10))]
        return ":".join(parts)
    if k < 0.9:  # octets put together at random
        return ".".join(rng.choice(["0", "1", "00", "01", "255", "256", "999", "1000", "", "a"])
                        for _ in range(rng.randint(1, 5)))
    return "".join(rng.choice("0123456789abcdefABCDEF:.%x ") for _ in range(rng.randint(0, 45)))


def random_number(rng: random.Random) -> str:
    return rng.choice([str(rng.randint(0, 20)), str(rng.randint(0, 70000)), "0" + str(rng.randint(0, 99)), "",
                       "-1", "1e3", "99999999999", "0000000001", "4294967297", " 1"])


def valid_request(rng: random.Random) -> list[str]:
    addr = random_addr(rng) if rng.random() < 0.3 else rng.choice(
        [str(ipaddress.IPv4Address(rng.getrandbits(32))), str(ipaddress.IPv6Address(rng.getrandbits(128))),
         "::ffff:" + str(ipaddress.IPv4Address(rng.getrandbits(32))), ipaddress.IPv6Address(rng.getrandbits(128)).exploded])
    family = "2" if "." in addr and ":" not in addr else "10"
    words = ["connect", family, addr, str(rng.randint(0, 65535)), str(rng.randint(0, 15)), str(rng.choice([0, 6, 17]))]
    k = rng.random()
    if k < 0.3:
        words = ["pool", *words[1:], str(rng.randint(1, MAX_POOL + 1))]
    elif k < 0.6:
        words = ["bind", *words[1:], rng.choice(["-", "reuseaddr", "v6only", "reuseport,v6only", "reuseaddr,reuseport,v6only"])]
    elif k < 0.75:
        words = ["bindpool", *words[1:], rng.choice(["-", "reuseaddr", "v6only", "reuseport,v6only"]), str(rng.randint(1, MAX_POOL + 1))]
    return words


def random_request(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        words = valid_request(rng)
        if rng.random() < 0.3:
            i = rng.randrange(1, len(words))
            words[i] = random_number(rng) if i != 2 else random_addr(rng)
    else:
        words = [rng.choice(["connect"] * 8 + ["pool"] * 4 + ["bind"] * 4 + ["bindpool"] * 4 + ["sendto", "show", "connec"]),
                 rng.choice(["2", "10", "2", "10", "1", "0", "02", ""]), random_addr(rng), random_number(rng),
                 rng.choice(["1", "2", "3", "0", "15", "16", random_number(rng)]),
                 rng.choice(["0", "6", "17", "0", random_number(rng)])]
        for _ in range(2):
            if rng.random() < 0.5:
                words.append(rng.choice(["1", "16", "17", "0", "8", "-", "v6only", "reuseaddr,", "x", random_number(rng)]))
    if rng.random() < 0.1:
        del words[rng.randrange(1, len(words))]
    data = " ".join(words).encode()
    if rng.random() < 0.3:
        data += rng.choice(TAILS[1:] + [b" out:bad", b" bbconn:ep6", b" ", b" out:127.0.0.0/8=ep-out "])
    if rng.random() < 0.05:
        i = rng.randrange(len(data) + 1)
        data = data[:i] + bytes([rng.choice([0, 0x80, 0xff, 0x20, 0x3a, 0x2e])]) + data[i:]
    return data


def test_parse_random(lib):
    rng = random.Random(11)
    accepted = 0
    for _ in range(20000):
        data = random_request(rng)
        want = py_parse(data, TAILS)
        assert c_parse(lib, data, TAILS) == want, data
        accepted += want is not None
    assert accepted > 3000  # the generator reaches the accepting side often enough to mean something


# -- the lookup -----------------------------------------------------------------------------------
V4 = ["127.0.0.1", "127.0.0.2", "10.1.2.3", "10.255.0.1", "192.168.7.1", "0.0.0.0", "255.255.255.255"]
V6 = ["::1", "fd00::1", "fd00:0:0:1::7", "2001:db8::5", "::", "fe80::1"]


def random_policy(rng: random.Random) -> Policy:
    eps = {}
    for i in range(rng.randint(0, 4)):
        kind = rng.choice(["ipv4", "ipv4", "ipv6", "unix"])
        name = f"ep{i}"
        if kind == "unix":
            eps[name] = parse_endpoint(f"{name} type unix path /run/x{i}.sock")
        else:
            addr = rng.choice(V4 if kind == "ipv4" else V6)
            port = rng.choice(["dynamic", "dynamic", str(rng.randint(1, 65535))])
            eps[name] = parse_endpoint(f"{name} type {kind} addr {addr} port {port}")
    rules = []
    for _ in range(rng.randint(0, 6)):
        v4 = rng.random() < 0.6
        ip = ipaddress.ip_address(rng.choice(V4) if v4 else rng.choice(V6 + ["::ffff:10.1.2.3"]))
        if rng.random() < 0.3:
            ip = ipaddress.ip_address(rng.getrandbits(32 if ip.version == 4 else 128)) if ip.version == 4 \
                else ipaddress.IPv6Address(rng.getrandbits(128))
        plen = rng.choice([0, 1, 8, 12, 16, 24, 31, 32] if ip.version == 4 else [0, 7, 64, 96, 104, 120, 127, 128])
        net = ipaddress.ip_network(f"{ip}/{plen}", strict=False)
        target = rng.choice([*eps, "missing"]) if eps else "missing"
        rules.append(parse_egress(f"{net}={target}"))
    return Policy(eps, [], rules)


def random_op(rng: random.Random) -> Op:
    family = rng.choice([socket.AF_INET, socket.AF_INET6, socket.AF_INET6, socket.AF_UNIX])
    if family == socket.AF_INET:
        addr = rng.choice(V4 + [str(ipaddress.IPv4Address(rng.getrandbits(32)))])
    else:
        addr = rng.choice(V6 + [f"::ffff:{a}" for a in V4] + [str(ipaddress.IPv6Address(rng.getrandbits(128)))])
    sotype = rng.choice([socket.SOCK_STREAM, socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW, 5, 0])
    proto = rng.choice([0, 0, 6, 17, 1, 132])
    return Op("connect", family, addr, rng.randint(0, 65535), sotype, proto)


def c_lookup(lib, policy: Policy, op: Op):
    rows, meta = fast.compile_rows(policy)
    t = fast.Table(b"", 0, len(meta), ctypes.cast(rows, ctypes.POINTER(fast.Row)))
    req = fast.Req()
    req.verb, req.family, req.port, req.type, req.proto = fast.CONNECT, op.family, op.port, op.type, op.proto
    if op.family in (socket.AF_INET, socket.AF_INET6):
        packed = ipaddress.ip_address(op.addr).packed
        ctypes.memmove(req.addr, packed, len(packed))
    row, family, port, host = ctypes.c_int(-1), ctypes.c_int(0), ctypes.c_int(0), (ctypes.c_uint8 * 16)()
    kind = lib.fs_lookup(ctypes.byref(t), ctypes.byref(req), ctypes.byref(row), ctypes.byref(family), host,
                         ctypes.byref(port))
    if kind == 0:
        return ("ask",), None
    if kind == 1:
        return ("local",), None
    text = str(ipaddress.ip_address(bytes(host[:4] if family.value == socket.AF_INET else host)))
    return ("grant", family.value, (text, port.value)), meta[row.value]


def test_lookup_random(lib):
    rng = random.Random(5)
    seen = set()
    for _ in range(4000):
        policy = random_policy(rng)
        for _ in range(5):
            op = random_op(rng)
            want = policy.egress_table().lookup(op)
            got, meta = c_lookup(lib, policy, op)
            if want[0] == "grant":  # the same address, written as ipaddress writes it
                want = ("grant", want[1], (str(ipaddress.ip_address(want[2][0])), want[2][1]))
                d = policy.decide(op)
                assert d.verdict == GRANT and meta == (d.endpoint.name, d.reason), (policy, op)
            assert got == want, (policy, op)
            seen.add(want[0])
    assert seen == {"ask", "local", "grant"}


def test_addresses_random(lib):
    """Addresses alone, most of them put together from pieces (the corners of ipaddress's rules)."""
    rng = random.Random(7)
    outcomes = set()
    for _ in range(20000):
        addr = random_addr(rng)
        for family in (2, 10):
            data = f"connect {family} {addr} 80 1 0".encode()
            want = py_parse(data, TAILS)
            assert c_parse(lib, data, TAILS) == want, data
            outcomes.add((family, want is not None))
    assert outcomes == {(2, True), (2, False), (10, True), (10, False)}


# -- the bind lookup ------------------------------------------------------------------------------
def random_ingress_policy(rng: random.Random) -> Policy:
    base = random_policy(rng)
    pairs = []
    for _ in range(rng.randint(0, 5)):
        v4 = rng.random() < 0.6
        addr = rng.choice(V4 + ["0.0.0.0"]) if v4 else rng.choice(V6 + ["::"])
        lo = rng.choice([0, 1, 80, 443, 8000])
        hi = lo if rng.random() < 0.6 else rng.choice([lo, lo + 1, 8080, 65535])
        target = rng.choice([*base.endpoints, "missing"]) if base.endpoints else "missing"
        ports = str(lo) if lo == hi else f"{lo}-{hi}"
        pairs.append(parse_ingress(f"{addr if v4 else f'[{addr}]'}:{ports}={target}"))
    return Policy(base.endpoints, pairs, [], mark=rng.choice([0, 0x5ca10001]))


def random_bind(rng: random.Random) -> Op:
    family = rng.choice([socket.AF_INET, socket.AF_INET6, socket.AF_INET6, socket.AF_UNIX])
    if family == socket.AF_INET:
        addr = rng.choice(V4 + ["0.0.0.0", str(ipaddress.IPv4Address(rng.getrandbits(32)))])
    else:
        addr = rng.choice(V6 + ["::", "::", "::ffff:0.0.0.0"] + [f"::ffff:{a}" for a in V4])
    sotype = rng.choice([socket.SOCK_STREAM, socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW, 5])
    proto = rng.choice([0, 0, 6, 17, 1])
    return Op("bind", family, addr, rng.choice([0, 1, 80, 81, 443, 8000, 8080, 65535, rng.randint(0, 65535)]),
              sotype, proto, v6only=rng.random() < 0.3)


def c_lookup_bind(lib, policy: Policy, op: Op):
    rows, meta = fast.compile_in_rows(policy)
    t = fast.Table(b"", 0, 0, None, fast.tail_verbs(b""), len(meta), ctypes.cast(rows, ctypes.POINTER(fast.InRow)))
    req = fast.Req()
    req.verb, req.family, req.port, req.type, req.proto = fast.BIND, op.family, op.port, op.type, op.proto
    req.flags = 4 if op.v6only else 0
    if op.family in (socket.AF_INET, socket.AF_INET6):
        packed = ipaddress.ip_address(op.addr).packed
        ctypes.memmove(req.addr, packed, len(packed))
    row, family, port, dual = ctypes.c_int(-1), ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    host = (ctypes.c_uint8 * 16)()
    kind = lib.fs_lookup_bind(ctypes.byref(t), ctypes.byref(req), ctypes.byref(row), ctypes.byref(family), host,
                              ctypes.byref(port), ctypes.byref(dual))
    if kind == 0:
        return ("ask",), None
    if kind == 1:
        return ("local",), None
    text = str(ipaddress.ip_address(bytes(host[:4] if family.value == socket.AF_INET else host)))
    endpoint, reason = meta[row.value]
    return ("grant", family.value, (text, port.value), row.value, bool(dual.value)), \
        (endpoint, reason + (" (dual-stack [::] bind)" if dual.value else ""))


def test_bind_lookup_random(lib):
    """fs_lookup_bind equals engine.IngressTable.lookup, and each of its answers is what Policy.decide
    says: a grant of the same endpoint, family, host address and reason (what the audit writes), or
    `local` exactly where the engine says local."""
    rng = random.Random(13)
    seen = set()
    for _ in range(4000):
        policy = random_ingress_policy(rng)
        for _ in range(5):
            op = random_bind(rng)
            want = policy.ingress_table().lookup(op)
            got, meta = c_lookup_bind(lib, policy, op)
            if want[0] == "grant":
                want = ("grant", want[1], (str(ipaddress.ip_address(want[2][0])), want[2][1]), *want[3:])
            assert got == want, (policy, op)
            d = policy.decide(op)
            if got[0] == "grant":
                assert d.verdict == GRANT and meta == (d.endpoint.name, d.reason), (policy, op)
                assert (d.family, (str(ipaddress.ip_address(d.host[0])), d.host[1])) == got[1:3] and d.mark == policy.mark
            elif got[0] == "local":
                assert d.verdict == LOCAL, (policy, op)
            seen.add(want[0])
    assert seen == {"ask", "local", "grant"}


def test_the_constants_are_the_headers():
    """The numbers fast.py passes to and reads from the library are csrc/fdservice_fast.h's."""
    import pathlib
    import re

    header = (pathlib.Path(__file__).resolve().parents[3] / "csrc" / "fdservice_fast.h").read_text()
    names = {m[0]: int(m[1]) for m in re.findall(r"#define (FS_\w+) (\d+)", header)}
    for body in re.findall(r"enum \{([^}]*)\}", header):
        names.update({k: int(v) for k, v in re.findall(r"(FS_\w+) = (\d+)", body)})
    names.update({m[0]: int(m[1], 16) for m in re.findall(r"#define (FS_\w+) 0x([0-9A-Fa-f]+)", header)})
    assert (fast.ABI, fast.POOLS, fast.UNBOUND_POOLS, fast.MAX_MESSAGE) == \
        (names["FS_ABI"], names["FS_POOLS"], names["FS_UNBOUND_POOLS"], names["FS_MAX_MESSAGE"])
    assert (tables.UNBOUND_TAG, tables.MARK_MAX) == (names["FS_UNBOUND_TAG"], names["FS_MARK_MAX"])
    assert (fast.CONNECT, fast.POOL, fast.BIND, fast.NAMED, fast.BINDPOOL, fast.NAMEDPOOL) == \
        (names["FS_CONNECT"], names["FS_POOL"], names["FS_BIND"], names["FS_NAMED"], names["FS_BINDPOOL"],
         names["FS_NAMEDPOOL"])
    assert (fast.FOR_EGRESS, fast.FOR_BIND, fast.FOR_NAMED) == \
        (names["FS_FOR_EGRESS"], names["FS_FOR_BIND"], names["FS_FOR_NAMED"])
    assert (fast.DROP, fast.HANDBACK, fast.GRANT, fast.LOCAL, fast.FAIL) == \
        (names["FS_DROP"], names["FS_HANDBACK"], names["FS_GRANT"], names["FS_LOCAL"], names["FS_FAIL"])
