"""The api mode under the engine's shared rules: dual-stack sockets by name, the options set before
bind(NAME) carried onto the host socket, and callers in a netns nested in the container."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

from tests.helpers import free_port, graft_cmd


def run(ns: str, args: list[str], prog: str, *argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([*graft_cmd(), "run", "-n", ns, *args, "--", sys.executable, "-c", textwrap.dedent(prog), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


DUAL = """
    import socket, sockgraft
    s = sockgraft.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind("ep")
    s.listen()
    print(s.family == socket.AF_INET6, *s.getsockname()[:2], flush=True)
    c, peer = s.accept()
    c.sendall(f"dual {peer[0]}\\n".encode())
    c.close()
"""


def test_af_inet6_socket_bound_by_name_onto_an_ipv4_endpoint_is_v4_mapped(state_dir, ns, procs):
    port = free_port()
    p = run(ns, ["--endpoint", f"ep type ipv4 addr 127.0.0.1 port {port}"], DUAL)
    procs.append(p)
    line = p.stdout.readline()
    assert line.split() == ["True", "::ffff:127.0.0.1", str(port)], line + (p.stderr.read() if p.poll() is not None else "")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        assert c.recv(100) == b"dual ::ffff:127.0.0.1\n"
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0, err


OPTIONS = """
    import socket, sockgraft
    s = sockgraft.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.bind("ep")
    print(*s.getsockname()[:2], s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
          s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    t = sockgraft.socket()
    t.bind("ep2")  # nothing set: the host socket keeps its own defaults
    print(t.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), t.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
"""


def test_options_set_before_bind_by_name_are_on_the_grafted_socket(state_dir, ns):
    port = free_port()
    p = run(ns, ["--endpoint", f"ep type ipv4 addr 127.0.0.1 port {port}",
                 "--endpoint", "ep2 type ipv4 addr 127.0.0.1 port dynamic"], OPTIONS)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    # the host socket (bound to the endpoint) has them; SO_RCVBUF reads back doubled once, not twice
    assert out.splitlines() == [f"127.0.0.1 {port} 1 1 131072", "0 0"]


NESTED = """
    import errno, socket, sys, sockgraft
    from sockgraft.core.protocol import Request
    from sockgraft.modes.api.client import ask
    port = int(sys.argv[1])

    def attempt(f):
        try:
            r = f()
            return "ok" if r is None else r
        except OSError as e:
            return errno.errorcode[e.errno]

    def bind_request(p):  # what the fd service answers a bind of 0.0.0.0:p (as the preload library asks)
        reply, fd = ask(Request("bind", family=socket.AF_INET, addr="0.0.0.0", port=p, type=socket.SOCK_STREAM))
        return reply.kind

    print(attempt(lambda: sockgraft.socket().bind("ep")),
          attempt(lambda: bind_request(port)),
          attempt(lambda: bind_request(port + 1)),
          attempt(lambda: socket.socket().bind(("127.0.0.1", 0))), flush=True)
"""


def test_caller_in_a_nested_netns_is_never_granted(state_dir, ns):
    port = free_port()
    args = ["--endpoint", f"ep type ipv4 addr 127.0.0.1 port {free_port()}", "--ingress", f"0.0.0.0:{port}=ep"]
    # in the container: granted by name and by the pair; a bind no pair matches stays local
    p = run(ns, args, NESTED, str(port))
    out, err = p.communicate(timeout=30)
    assert out.split() == ["ok", "ok", "local", "ok"], err
    # in a netns nested in it: what a rule would graft is EPERM, what no rule matches stays local
    nested = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, "-c", textwrap.dedent(NESTED), str(port)]
    p = subprocess.run([*graft_cmd(), "run", "-n", ns, *args, "--", *nested], capture_output=True, text=True, timeout=30)
    assert p.stdout.split() == ["EPERM", "EPERM", "local", "ok"], p.stderr
