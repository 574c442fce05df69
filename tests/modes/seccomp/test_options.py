"""A grafted socket carries the options the program set on its socket before the trapped connect -
those (host/optwatch.py notes them), not its netns' defaults - and its fd's close-on-exec flag,
in the C loop and in the Python handlers alike."""
from __future__ import annotations

import socket

import pytest

from tests.modes.seccomp.util import client_egress, run

PROG = r"""
import socket, sys
port = int(sys.argv[1])
with open("/proc/sys/net/ipv4/ip_default_ttl", "w") as f:
    f.write("33")  # this netns' own default, which a grafted socket does not take

def show(tag, s):
    s.connect(("127.0.0.1", port))  # only a host socket reaches the host's listener
    print(tag, s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
          s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
          s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS), s.getsockopt(socket.IPPROTO_IP, socket.IP_TTL),
          s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8).hex(), flush=True)
    s.close()

s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x20)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, bytes.fromhex("0100000005000000"))
show("set", s)
show("fresh", socket.socket())
t = socket.socket()
t.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 33)
show("ttl", t)
for inherit in (True, False, True, False):  # one fd number, its flag changing: read anew each time
    s = socket.socket()
    s.set_inheritable(inherit)
    s.connect(("127.0.0.1", port))
    print("inheritable", s.fileno(), s.get_inheritable(), flush=True)
    s.close()
"""


@pytest.mark.parametrize("fast", ["1", "0"])
def test_a_grafted_socket_carries_the_options_the_program_set(state_dir, ns, monkeypatch, fast):
    monkeypatch.setenv("GRAFT_SECCOMP_FAST", fast)
    with socket.socket() as lst, socket.socket() as probe:
        lst.bind(("127.0.0.1", 0))
        lst.listen(16)
        r = run(ns, ["python3", "-c", PROG, str(lst.getsockname()[1])], **client_egress())
        rcvbuf = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # the host's default
        ttl = probe.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
    flags = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("inheritable")]
    assert len({fd for fd, _ in flags}) == 1 and [v for _, v in flags] == ["True", "False", "True", "False"], r.stdout
    lines = dict(line.split(maxsplit=1) for line in r.stdout.splitlines() if not line.startswith("inheritable"))
    assert lines["set"].split() == ["1", "1", "77", str(2 * 65536), "32", str(ttl), "0100000005000000"], r.stdout
    assert lines["fresh"].split() == ["0", "0", "7200", str(rcvbuf), "0", str(ttl), "0000000000000000"], r.stdout
    assert lines["ttl"].split()[5] == "33", r.stdout
    assert ttl != 33
