"""What the preload library sends is what sockgraft.core.protocol defines, byte for byte, and it
decodes a sockaddr where the kernel (and the seccomp supervisor's decode_sockaddr) does.

The library's production path runs: a C program (tests/modes/preload/c/wire.c) makes the socket
calls under `graft run --mode preload`, the library builds each request and GRAFT_TRACE writes it on
stderr just before it goes to the fd service."""
from __future__ import annotations

import ctypes
import errno
import socket

import pytest

from sockgraft.core.protocol import FIRST_POOL, Request
from sockgraft.core.rules import parse_egress, parse_ingress
from sockgraft.modes.seccomp import kernel
from tests.helpers import free_port
from tests.modes.preload.conftest import ep

AF_INET, AF_INET6, STREAM, DGRAM = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.SOCK_DGRAM
PAIRS = "0.0.0.0:8000=ep [::]:8000-8010=ep 127.0.0.1:9000=ep"
EGRESS = "127.0.0.0/8=ep-out ::1/128=ep6"
BBCONN = "ep6"
INGRESS = tuple(parse_ingress(p) for p in PAIRS.split())
OUT = tuple(parse_egress(r) for r in EGRESS.split())
TABLE = [*ep("ep", None), *ep("ep-out", None), *ep("ep6", None, "::1")]


def traced(run_preload, cc, cases: list[str], prefilter: bool = False) -> list[list[str]]:
    """The requests the library sent for each case, in order (by default with GRAFT_PREFILTER=0:
    every operation is asked about, whether a rule may match or not)."""
    p = run_preload(TABLE, [cc("wire"), *cases],
                    env={"GRAFT_TRACE": "1", "GRAFT_CONV_PAIRS": PAIRS, "GRAFT_EGRESS": EGRESS, "GRAFT_BBCONN": BBCONN,
                         "GRAFT_PREFILTER": "1" if prefilter else "0"})
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    got: list[list[str]] = []
    for line in err.splitlines():
        if line.startswith("case: "):
            got.append([])
        elif line.startswith("graft: request: "):
            got[-1].append(line[len("graft: request: "):])
    assert len(got) == len(cases) + 1 and got[-1] == [], err  # every case ran, then "end"
    return got[:-1]


def flags(word: str) -> frozenset:
    return frozenset() if word == "-" else frozenset(word.split(","))


def test_requests_are_the_protocol_byte_for_byte(run_preload, cc):
    dst = free_port()  # nothing listens there: connects are refused, datagrams dropped (loopback)
    cases = [
        # bind: every flag combination the library reads from the socket, sorted, `-` when none
        ("bind 2 0.0.0.0 8000 1 -", Request("bind", family=AF_INET, addr="0.0.0.0", port=8000, type=STREAM)),
        ("bind 2 127.0.0.1 9000 2 reuseaddr", Request("bind", family=AF_INET, addr="127.0.0.1", port=9000, type=DGRAM,
                                                         flags=flags("reuseaddr"))),
        ("bind 2 127.0.0.2 8000 1 reuseport,reuseaddr", Request("bind", family=AF_INET, addr="127.0.0.2", port=8000,
                                                                   type=STREAM, flags=flags("reuseaddr,reuseport"))),
        ("bind 10 :: 8001 1 v6only,reuseport,reuseaddr", Request("bind", family=AF_INET6, addr="::", port=8001,
                                                                    type=STREAM, flags=flags("reuseaddr,reuseport,v6only"))),
        ("bind 10 :: 8002 1 -", Request("bind", family=AF_INET6, addr="::", port=8002, type=STREAM)),
        ("bind 10 ::1 0 2 v6only", Request("bind", family=AF_INET6, addr="::1", port=0, type=DGRAM, flags=flags("v6only"))),
        # SOCK_NONBLOCK is not part of the type
        (f"bind 2 0.0.0.0 8000 {STREAM | socket.SOCK_NONBLOCK} -",
         Request("bind", family=AF_INET, addr="0.0.0.0", port=8000, type=STREAM)),
        # egress of an unbound socket: connect asks `connect` (the service connects), sendto and
        # sendmsg ask `sendto` (a socket bound with a port of its own)
        (f"connect 2 127.0.0.1 {dst} 1", Request("connect", family=AF_INET, addr="127.0.0.1", port=dst, type=STREAM)),
        (f"connect 2 127.0.0.1 {dst} 2", Request("connect", family=AF_INET, addr="127.0.0.1", port=dst, type=DGRAM)),
        (f"sendto 2 127.0.0.1 {dst} 2", Request("sendto", family=AF_INET, addr="127.0.0.1", port=dst, type=DGRAM)),
        (f"sendmsg 10 ::1 {dst} 2", Request("sendto", family=AF_INET6, addr="::1", port=dst, type=DGRAM)),
        # the graft API: no caller rules on these
        ("named ep 1 -", Request("named", name="ep", family=0, type=STREAM)),
        ("named ep-out 2 reuseport,reuseaddr", Request("named", name="ep-out", type=DGRAM, flags=flags("reuseaddr,reuseport"))),
        ("dial ep-nothere 1", Request("dial", name="ep-nothere", type=STREAM)),
        ("resolve ep6", Request("resolve", name="ep6")),
    ]
    got = traced(run_preload, cc, [c for c, _ in cases])
    for (case, req), sent in zip(cases, got):
        if req.verb == "bind":
            req.ingress = INGRESS
        elif req.verb in ("connect", "sendto"):
            req.egress, req.bbconn = OUT, (BBCONN,)
        assert sent, f"{case}: no request sent"
        assert sent[0].encode() == req.encode(), case


# (family, length of the sockaddr the program passes, does the kernel take it)
SOCKADDR_CASES = [
    (AF_INET, 16, True), (AF_INET, 20, True), (AF_INET, 15, False), (AF_INET, 2, False),
    (AF_INET6, 28, True), (AF_INET6, 32, True), (AF_INET6, 24, True),  # SIN6_LEN_RFC2133: no scope id
    (AF_INET6, 23, False), (AF_INET6, 16, False),
]


def sockaddr(family: int, length: int, addr: str, port: int) -> bytes:
    raw = kernel.encode_sockaddr(family, addr, port) + bytes(8)
    return raw[:length]


@pytest.mark.parametrize("family, length, taken", SOCKADDR_CASES)
def test_the_kernel_takes_these_lengths(family, length, taken):
    """The cases' third column is the kernel's answer, measured (a loopback bind to port 0)."""
    libc = ctypes.CDLL(None, use_errno=True)
    raw = sockaddr(family, length, "127.0.0.1" if family == AF_INET else "::1", 0)
    with socket.socket(family, STREAM) as s:
        rc = libc.bind(s.fileno(), ctypes.c_char_p(raw), len(raw))
        assert (rc == 0) == taken, errno.errorcode.get(ctypes.get_errno())


@pytest.mark.parametrize("family, length, taken", SOCKADDR_CASES)
def test_seccomp_decode_sockaddr_takes_what_the_kernel_takes(family, length, taken):
    addr = "0.0.0.0" if family == AF_INET else "::"
    raw = sockaddr(family, length, addr, 8000)
    if taken:
        assert kernel.decode_sockaddr(raw) == (family, addr, 8000)
    else:
        with pytest.raises(kernel.BadSockaddr):
            kernel.decode_sockaddr(raw)


def test_preload_decodes_what_the_kernel_takes(run_preload, cc):
    cases = []
    for family, length, _ in SOCKADDR_CASES:
        addr = "0.0.0.0" if family == AF_INET else "::"
        cases.append(f"raw {family} {sockaddr(family, length, addr, 8000).hex()}")
    got = traced(run_preload, cc, cases)
    for (family, length, taken), sent in zip(SOCKADDR_CASES, got):
        addr = "0.0.0.0" if family == AF_INET else "::"
        want = [Request("bind", family=family, addr=addr, port=8000, type=STREAM, ingress=INGRESS).encode().decode()]
        assert sent == (want if taken else []), (family, length)


def test_prefilter_request_and_no_request_where_no_rule_can_apply(run_preload, cc):
    """With the prefilter (the default), the process asks `prefilter` with all its rules once, then
    only about operations a rule may apply to: a bind no pair can match and a destination no egress
    rule holds send nothing."""
    dst = free_port()
    cases = ["bind 2 127.0.0.1 0 1 -", "bind 10 ::1 0 2 v6only", "bind 10 :: 8000 1 v6only",
             "bind 2 0.0.0.0 8000 1 -", f"connect 2 127.0.0.1 {dst} 1", f"sendto 10 ::1 {dst} 2"]
    got = traced(run_preload, cc, cases, prefilter=True)
    want_first = Request("prefilter", ingress=INGRESS, egress=OUT, bbconn=(BBCONN,)).encode().decode()
    assert got[0] == [want_first]  # fetched at the first operation, which stays local
    assert got[1] == []
    # [::]:8000 with V6ONLY: [::]:8000-8010 matches (IPv6 pair)
    assert got[2] == [Request("bind", family=AF_INET6, addr="::", port=8000, type=STREAM, flags=frozenset({"v6only"}),
                              ingress=INGRESS).encode().decode()]
    assert got[3] == [Request("bind", family=AF_INET, addr="0.0.0.0", port=8000, type=STREAM,
                              ingress=INGRESS).encode().decode()]
    # a connect asks for a first batch of host sockets; where the service has none to give, `connect` follows
    pool = Request("pool", family=AF_INET, addr="127.0.0.1", port=dst, type=STREAM, egress=OUT, bbconn=(BBCONN,),
                   count=FIRST_POOL).encode().decode()
    connect = Request("connect", family=AF_INET, addr="127.0.0.1", port=dst, type=STREAM, egress=OUT,
                      bbconn=(BBCONN,)).encode().decode()
    assert got[4] in ([pool], [pool, connect]), got[4]
    assert got[5] == [Request("sendto", family=AF_INET6, addr="::1", port=dst, type=DGRAM, egress=OUT,
                              bbconn=(BBCONN,)).encode().decode()]
