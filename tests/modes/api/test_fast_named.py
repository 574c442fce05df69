"""The fd service's C `named` and `namedpool` (the graft API's bind by endpoint name, csrc/fdservice_fast.c): on
random policies and requests, what `fs_parse` + `fs_lookup_named` answer from the tables
`fast.compile_named` makes equals what Python answers: a grant exactly where `Policy.decide` grants
an IP endpoint (the same family, host address and port, endpoint and reason for the audit, the
container's mark), and a hand-back to Python for everything else (no such endpoint, a unix one,
another family or socket type, a malformed request)."""
from __future__ import annotations

import ctypes
import ipaddress
import random
import socket

from sockgraft.core.endpoint import parse_endpoint
from sockgraft.core.engine import GRANT, Op, Policy
from sockgraft.core.protocol import ProtocolError, parse_request
from sockgraft.modes.api import fast
from tests.modes.api.test_fast_tables import lib, random_policy  # noqa: F401 (lib: the fixture, the installed library)

NAMES = ["ep0", "ep1", "ep2", "ep3", "a", "x" * 15, "ep0x", "EP0"]


def random_named_policy(rng: random.Random) -> Policy:
    """test_fast_tables' random endpoint tables (ep0..ep3: ipv4, ipv6, unix; fixed and dynamic ports)
    with a mark or none."""
    return Policy(random_policy(rng).endpoints, [], [], mark=rng.choice([0, 0x5ca10001]))


def random_request(rng: random.Random) -> bytes:
    pool = rng.random() < 0.4
    words = ["namedpool" if pool else "named", rng.choice(NAMES + ["", "ep 0"]),
             rng.choice(["0", "0", "2", "10", "1", "3", "02", ""]),
             rng.choice(["1", "1", "2", "3", "5", "16", "01"]), rng.choice(["0", "0", "6", "17", "1", "65536"]),
             rng.choice(["1", "16", "8", "17", "0", "01", "-"] if pool else ["-", "-", "v6only", "reuseaddr,reuseport", "reuse", ""])]
    k = rng.random()
    if k < 0.05:
        words += ["127.0.0.1", "80"]  # a destination: the API's connect from an endpoint (Python's)
    elif k < 0.1:
        words = words[:rng.randint(1, 5)]
    elif k < 0.12:
        words.append("in:127.0.0.1:80=ep0")
    return " ".join(words).encode()


def c_named(lib, c: "fast._Compiled", data: bytes):
    """("ask",) or ("grant", family, (host, port), count) and the audit's (endpoint, reason)."""
    req = fast.Req()
    if lib.fs_parse(data, len(data), c.tables, len(c.tables), ctypes.byref(req)) < 0:
        return ("ask",), None
    assert fast.VERBS[req.verb] == data.split(b" ")[0].decode()
    row, family, port = ctypes.c_int(-1), ctypes.c_int(0), ctypes.c_int(0)
    host = (ctypes.c_uint8 * 16)()
    kind = lib.fs_lookup_named(ctypes.byref(c.tables[req.table]), ctypes.byref(req), ctypes.byref(row),
                               ctypes.byref(family), host, ctypes.byref(port))
    assert kind in (0, 2)  # a name is never `local`
    if kind == 0:
        return ("ask",), None
    text = str(ipaddress.ip_address(bytes(host[:4] if family.value == socket.AF_INET else host)))
    return ("grant", family.value, (text, port.value), req.count), c.in_meta[req.table][row.value]


def py_named(policy: Policy, data: bytes):
    try:
        r = parse_request(data)
    except ProtocolError:
        return ("ask",), None
    if r.verb not in ("named", "namedpool") or r.addr is not None:
        return ("ask",), None
    d = policy.decide(Op("named", r.family, name=r.name, type=r.type, proto=r.proto, v6only="v6only" in r.flags))
    if d.verdict != GRANT or d.family == socket.AF_UNIX:
        return ("ask",), None
    assert d.mark == policy.mark
    return ("grant", d.family, (str(ipaddress.ip_address(d.host[0])), d.host[1]), r.count), (d.endpoint.name, d.reason)


def test_named_random(lib):
    rng = random.Random(11)
    seen = set()
    for _ in range(3000):
        policy = random_named_policy(rng)
        c = fast._Compiled(policy)
        c.build()
        for _ in range(8):
            data = random_request(rng)
            got = c_named(lib, c, data)
            assert got == py_named(policy, data), (policy, data)
            seen.add(got[0][0])
    assert seen == {"ask", "grant"}


def test_named_tables_end_named_requests_only(lib):
    """A named table's name is never taken for another verb's caller rules, nor the container's
    table for a name."""
    policy = Policy({"ep0": parse_endpoint("ep0 type ipv4 addr 127.0.0.1 port dynamic")}, [], [])
    c = fast._Compiled(policy)
    c.build()
    req = fast.Req()
    assert lib.fs_parse(b"named ep0 0 1 0 -", 17, c.tables, len(c.tables), ctypes.byref(req)) == 0
    assert req.table == 1 and c.tables[1].verbs == fast.FOR_NAMED
    for data in (b"connect 2 127.0.0.1 80 1 0ep0", b"bind 2 127.0.0.1 80 1 0 -ep0", b"named  0 1 0 -"):
        assert lib.fs_parse(data, len(data), c.tables, len(c.tables), ctypes.byref(req)) < 0
