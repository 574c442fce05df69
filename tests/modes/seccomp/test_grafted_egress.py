"""A socket that is grafted already (a host socket) reaches only what an egress rule names.

Before, a trapped sendto/connect on a grafted socket was carried out unjudged: a UDP socket grafted
by an egress rule for 127.0.0.2 (or by an ingress pair) could send to any host address. Now the
engine judges it (`Op(..., grafted=True)`): EPERM for a destination no egress rule names, and a
"deny" line in the audit log for each attempt."""
from __future__ import annotations

import json
import os
import socket
import sys

from tests.helpers import free_port
from tests.modes.seccomp.util import run

APP = r"""
import errno, socket, sys
udp_allowed, tcp_allowed, udp_blocked, tcp_blocked = (int(a) for a in sys.argv[1:5])
FASTOPEN = getattr(socket, "MSG_FASTOPEN", 0x20000000)

def attempt(label, f):
    try:
        f()
        print(label, "ok", flush=True)
    except OSError as e:
        print(label, errno.errorcode.get(e.errno, e.errno), flush=True)

def dgram():
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

# UDP grafted by the egress rule: its first sendto makes it a host socket
u = dgram()
u.sendto(b"granted 1", ("127.0.0.2", udp_allowed))
attempt("udp-egress sendto", lambda: u.sendto(b"leak", ("127.0.0.3", udp_blocked)))
attempt("udp-egress connect", lambda: u.connect(("127.0.0.3", udp_blocked)))
u.sendto(b"granted 2", ("127.0.0.2", udp_allowed))  # what the rule names still works
# UDP grafted by an ingress pair (a server socket)
v = dgram(); v.bind(("0.0.0.0", 9000))
attempt("udp-ingress sendto", lambda: v.sendto(b"leak", ("127.0.0.3", udp_blocked)))
attempt("udp-ingress connect", lambda: v.connect(("127.0.0.3", udp_blocked)))
# TCP grafted by the egress rule (connected to 127.0.0.2)
t = socket.socket(); t.connect(("127.0.0.2", tcp_allowed))
attempt("tcp-egress connect", lambda: t.connect(("127.0.0.3", tcp_blocked)))
attempt("tcp-egress fastopen", lambda: t.sendto(b"leak", FASTOPEN, ("127.0.0.3", tcp_blocked)))
# TCP grafted by an ingress pair (listening at once)
l = socket.socket(); l.bind(("0.0.0.0", 8000))
attempt("tcp-ingress connect", lambda: l.connect(("127.0.0.3", tcp_blocked)))
attempt("tcp-ingress fastopen", lambda: l.sendto(b"leak", FASTOPEN, ("127.0.0.3", tcp_blocked)))
"""

ATTEMPTS = ["udp-egress sendto", "udp-egress connect", "udp-ingress sendto", "udp-ingress connect",
            "tcp-egress connect", "tcp-egress fastopen", "tcp-ingress connect", "tcp-ingress fastopen"]


def _bound(addr: str, sotype: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, sotype)
    s.bind((addr, 0))
    if sotype == socket.SOCK_STREAM:
        s.listen(16)
    s.setblocking(False)
    return s


def _drain(s: socket.socket) -> list:
    """Everything that arrived so far (datagrams or connections), without waiting: on loopback a
    datagram or a handshake is complete when the sender's call returns, and the sender has exited."""
    got = []
    while True:
        try:
            got.append(s.recvfrom(256) if s.type == socket.SOCK_DGRAM else s.accept())
        except BlockingIOError:
            return got


def test_grafted_sockets_reach_only_what_an_egress_rule_names(state_dir, ns):
    socks = {(a, t): _bound(a, t) for a in ("127.0.0.2", "127.0.0.3") for t in (socket.SOCK_DGRAM, socket.SOCK_STREAM)}
    try:
        port = {k: s.getsockname()[1] for k, s in socks.items()}
        r = run(ns, [sys.executable, "-c", APP, str(port["127.0.0.2", socket.SOCK_DGRAM]),
                     str(port["127.0.0.2", socket.SOCK_STREAM]), str(port["127.0.0.3", socket.SOCK_DGRAM]),
                     str(port["127.0.0.3", socket.SOCK_STREAM])],
                endpoints=["ep-out type ipv4 addr 127.0.0.1 port dynamic",
                           f"u-in type ipv4 addr 127.0.0.1 port {free_port(sotype=socket.SOCK_DGRAM)}",
                           f"t-in type ipv4 addr 127.0.0.1 port {free_port()}"],
                ingress=["0.0.0.0:9000=u-in", "0.0.0.0:8000=t-in"], egress=["127.0.0.2/32=ep-out"])
        results = dict(line.rsplit(" ", 1) for line in r.stdout.splitlines())
        assert results == {a: "EPERM" for a in ATTEMPTS}, r.stdout + r.stderr
        # nothing arrived where no rule leads
        assert _drain(socks["127.0.0.3", socket.SOCK_DGRAM]) == []
        assert _drain(socks["127.0.0.3", socket.SOCK_STREAM]) == []
        # what the rule names did arrive, from the host endpoint: these sockets were host sockets
        grams = _drain(socks["127.0.0.2", socket.SOCK_DGRAM])
        assert [(d, a[0]) for d, a in grams] == [(b"granted 1", "127.0.0.1"), (b"granted 2", "127.0.0.1")]
        conns = _drain(socks["127.0.0.2", socket.SOCK_STREAM])
        assert len(conns) == 1 and conns[0][1][0] == "127.0.0.1"
        for c, _ in conns:
            c.close()
    finally:
        for s in socks.values():
            s.close()
    audit = [json.loads(x) for x in open(os.path.join(state_dir, "audit.log"))]
    denies = [a for a in audit if a["event"] == "deny"]
    assert len(denies) == len(ATTEMPTS), denies
    assert all(a["addr"] == "127.0.0.3" and a["grafted"] is True and a["errno"] == 1 and a["mode"] == "seccomp"
               for a in denies), denies
    assert sorted(a["op"] for a in denies) == ["connect"] * 4 + ["sendto"] * 4
    grants = {(a["op"], a["endpoint"]) for a in audit if a["event"] == "grant"}
    assert {("bind", "u-in"), ("bind", "t-in"), ("sendto", "ep-out"), ("connect", "ep-out")} <= grants
