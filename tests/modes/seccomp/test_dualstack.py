"""Dual-stack servers with only an IPv4 ingress pair: a `[::]:P` bind with IPV6_V6ONLY off (busybox
httpd, Go's ":P") is the program's IPv4 listener too, so `0.0.0.0:P=ep` grafts it; a V6ONLY
`[::]:P` socket is not grafted by it. The application still sees the address it bound."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

from tests.helpers import free_port, graft_cmd, stop, wait_port
from tests.modes.seccomp.util import refused, run, run_args, start, wait_for

BUSYBOX = shutil.which("busybox")


def _audit(state_dir: str) -> list[dict]:
    with open(os.path.join(state_dir, "audit.log")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static not installed")
def test_busybox_httpd_dual_stack_with_an_ipv4_pair(state_dir, ns, procs, tmp_path):
    (tmp_path / "index.html").write_text("dual stack busybox\n")
    port = free_port()
    start(procs, ns, [BUSYBOX, "httpd", "-f", "-p", "8080", "-h", str(tmp_path)],
          endpoints=[f"ep type ipv4 addr 127.0.0.1 port {port}"], ingress=["0.0.0.0:8080=ep"])
    wait_port("127.0.0.1", port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        assert r.read() == b"dual stack busybox\n"
    grants = wait_for(lambda: [a for a in _audit(state_dir) if a["event"] == "grant" and a["op"] == "bind"]
                      if os.path.exists(os.path.join(state_dir, "audit.log")) else None, what="audited grant")
    assert grants[0]["addr"] == "::" and "dual-stack" in grants[0]["reason"]


def test_go_listen_colon_port_with_an_ipv4_pair(state_dir, ns, procs, gonet):
    port = free_port()
    p = start(procs, ns, [gonet, "serve", ":8000"], endpoints=[f"ep type ipv4 addr 127.0.0.1 port {port}"],
              ingress=["0.0.0.0:8000=ep"])
    wait_port("127.0.0.1", port)
    for _ in range(3):  # (wait_port's probe was the first connection)
        with __import__("socket").create_connection(("127.0.0.1", port), timeout=5) as c:
            c.settimeout(5)
            # getsockname of the accepted socket: the app's own port, not the host's
            assert c.recv(64) == b"go 127.0.0.1:8000\n"
    stop(p)
    # getsockname of the listener: the address Go bound, [::]:8000
    assert p.stdout.read().splitlines()[0] == "listening [::]:8000"


V6ONLY = r"""
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(sys.argv[1]))
s.bind(("::", 8000)); s.listen()
print(s.getsockname()[:2], flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("v6only", [0, 1])
def test_v6only_is_not_grafted_by_an_ipv4_pair(state_dir, ns, procs, v6only):
    port = free_port()
    p = subprocess.Popen([*graft_cmd(), *run_args(ns, [sys.executable, "-c", V6ONLY, str(v6only)],
                                                  endpoints=[f"ep type ipv4 addr 127.0.0.1 port {port}"],
                                                  ingress=["0.0.0.0:8000=ep"])],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout.readline().strip() == "('::', 8000)"  # what the app bound, either way
    if v6only:
        assert refused(port)  # stays in the container
    else:
        wait_port("127.0.0.1", port)
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(10) == 0
    (bind,) = [a for a in _audit(state_dir) if a["op"] == "bind"]
    assert bind["event"] == ("local" if v6only else "grant")


def test_ipv4_pair_does_not_graft_a_specific_ipv6_bind(state_dir, ns):
    """Only the dual-stack wildcard counts as an IPv4 listener: `[::1]:P` is not one."""
    code = "import socket\ns=socket.socket(socket.AF_INET6);s.bind(('::1',8000));print(s.getsockname()[:2])\n"
    port = free_port()
    r = run(ns, [sys.executable, "-c", code], endpoints=[f"ep type ipv4 addr 127.0.0.1 port {port}"],
            ingress=["0.0.0.0:8000=ep"])
    assert r.stdout.strip() == "('::1', 8000)"
    (bind,) = [a for a in _audit(state_dir) if a["op"] == "bind"]
    assert bind["event"] == "local"
