"""connect() through an egress rule under preload: the fd service performs the connect (source
port chosen at connect time) and the library keeps the caller's semantics. The same program runs
natively on the host and inside the container, and must see the same outcomes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import free_port, wait_port
from tests.modes.preload.conftest import ep

PY = sys.executable
CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "connect_cases.py")
ACCEPTOR = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(4096)
while True:
    s.accept()[0].close()
"""


@pytest.fixture
def acceptor(procs) -> int:
    """A host listener on loopback that accepts and closes every connection."""
    port = free_port()
    procs.append(subprocess.Popen([PY, "-c", ACCEPTOR, str(port)]))
    wait_port("127.0.0.1", port)
    return port


@pytest.fixture
def blackhole(make_netns):
    """An address inside a netns this test makes (reached from the host over a veth pair) where
    TCP SYNs are dropped: connects to it neither complete nor fail."""
    bh = make_netns()
    n = os.getpid() % 256
    host_if, peer_if = f"sgv{os.getpid()}", f"sgw{os.getpid()}"
    net = f"198.18.{n}"
    cmds = [["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", bh],
            ["ip", "addr", "add", f"{net}.1/30", "dev", host_if], ["ip", "link", "set", host_if, "up"],
            ["ip", "-n", bh, "addr", "add", f"{net}.2/30", "dev", peer_if], ["ip", "-n", bh, "link", "set", peer_if, "up"],
            ["ip", "netns", "exec", bh, "iptables", "-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP"]]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield f"{net}.1", f"{net}.2"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def grafted_args(source: str, hole_net: str) -> list[str]:
    return [*ep("ep-out", None), *ep("ep-bh", None, source),
            "--egress", "127.0.0.1/32=ep-out", "--egress", f"{hole_net}/30=ep-bh"]


@pytest.mark.parametrize("pools", ["1", "0"])
def test_connect_outcomes_equal_native(run_preload, acceptor, blackhole, pools):
    """With pools the program's own connect runs on a pooled host socket; without, the service
    connects and the library keeps the semantics: the same outcomes either way."""
    source, hole = blackhole
    args = [str(acceptor), str(free_port()), hole, "80"]
    native = subprocess.run([PY, CASES, *args], capture_output=True, text=True, timeout=60, check=True)
    want = json.loads(native.stdout)
    assert want["blocking"] == "0" and want["rebind"] == "EINVAL" and want["reaim"] == "EISCONN"
    assert want["refused blocking"] == "ECONNREFUSED" and want["timeout blocking"] == "EINPROGRESS"
    p = run_preload(grafted_args(source, hole.rsplit(".", 1)[0] + ".0"), [PY, CASES, *args],
                    env={"GRAFT_TRACE": "1", "GRAFT_POOLS": pools})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert json.loads(out) == want
    # every socket went through the service, none was connected inside: one request per socket, or
    # one pool per (endpoint, type) with pools (ep-out stream and datagram, ep-bh stream)
    if pools == "1" and os.geteuid() == 0:
        assert err.count("graft: request: pool ") == 3 and "request: connect " not in err, err
    else:
        assert err.count("graft: request: connect ") == 7, err


def test_churn_client_closes_first(run_preload, acceptor):
    """30,000 x (socket, connect, close) through a dynamic endpoint, the client closing first: the
    source port is chosen per 4-tuple at connect time (TIME_WAIT reused as natively), no errors.
    The source is 127.0.0.2: the ~28,000 TIME_WAIT sockets this leaves for a minute must not stand in
    the way of other tests' bind(("127.0.0.1", 0))."""
    p = run_preload([*ep("ep-out", None, "127.0.0.2"), "--egress", "127.0.0.1/32=ep-out"],
                    [PY, CASES, "churn", str(acceptor), "30000"])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert json.loads(out) == {"done": 30000, "errors": {}}
