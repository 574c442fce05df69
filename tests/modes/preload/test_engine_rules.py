"""Preload mode under the engine's shared rules: a dual-stack `[::]:P` bind is matched by an IPv4
pair (the library sends the socket's v6only flag), and a process in a netns nested in the container
is never granted."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import free_port
from tests.modes.preload.conftest import ep

PY = sys.executable

SERVER = textwrap.dedent("""
    import socket, sys
    port, v6only = int(sys.argv[1]), int(sys.argv[2])
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    s.bind(("::", port))
    s.listen()
    print("listening", flush=True)
    while True:
        c, peer = s.accept()
        c.sendall(f"dual {peer[0]}\\n".encode())
        c.close()
""")


def listening_inside(ns: str, port: int) -> bool:
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True)
    return bool(out.stdout.strip())


@pytest.mark.parametrize("v6only", [0, 1])
def test_dual_stack_bind_matched_by_an_ipv4_pair(run_preload, ns, v6only):
    host, port = free_port(), 8000
    p = run_preload([*ep("ep", host), "--ingress", f"0.0.0.0:{port}=ep"], [PY, "-c", SERVER, str(port), str(v6only)])
    line = p.stdout.readline()
    assert line == "listening\n", line + (p.stderr.read() if p.poll() is not None else "")
    if not v6only:  # grafted: the host reaches it on the IPv4 endpoint, the container has no listener
        with socket.create_connection(("127.0.0.1", host), timeout=5) as c:
            assert c.recv(100) == b"dual ::ffff:127.0.0.1\n"
        assert not listening_inside(ns, port)
    else:  # an IPv6-only socket is not the IPv4 listener: no IPv4 pair matches, it stays inside
        assert listening_inside(ns, port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", host), timeout=5)


BINDS = textwrap.dedent("""
    import errno, socket, sys
    port = int(sys.argv[1])
    out = []
    for addr in (("0.0.0.0", port), ("127.0.0.1", 0)):
        s = socket.socket()
        try:
            s.bind(addr)
            out.append("ok:%s:%d" % s.getsockname())
        except OSError as e:
            out.append(errno.errorcode[e.errno])
        s.close()
    print(*out, flush=True)
""")


def test_caller_in_a_nested_netns_is_never_granted(run_preload):
    host, port = free_port(), 8000
    nested = f'unshare -n sh -c \'ip link set lo up && exec "$0" -c "$1" {port}\' "{PY}" "$0"'
    # GRAFT_NAME_TRANSPARENT: getsockname says where the socket really is
    p = run_preload([*ep("ep", host), "--ingress", f"0.0.0.0:{port}=ep"],
                    ["sh", "-c", f'"{PY}" -c "$0" {port} && {nested}', BINDS], env={"GRAFT_NAME_TRANSPARENT": "1"})
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    inside, nested_out = out.splitlines()
    # in the container: the pair grafts onto the host endpoint; the other bind stays local
    assert inside.split()[0] == f"ok:127.0.0.1:{host}", err
    assert inside.split()[1].startswith("ok:127.0.0.1:") and inside.split()[1] != f"ok:127.0.0.1:{host}"
    # nested: what the pair would graft is EPERM; a bind no pair matches still works (locally)
    assert nested_out.split()[0] == "EPERM", err
    assert nested_out.split()[1].startswith("ok:127.0.0.1:"), err
