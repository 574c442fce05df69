"""Side doors and denials: io_uring, interface ioctls, SO_BINDTODEVICE, SIOCGSKNS, nested netns,
engine denials, host services without an egress rule."""
from __future__ import annotations

import json
import os
import socket
import sys

from tests.helpers import free_port
from tests.modes.seccomp.util import client_egress, refused, run

PROBE = r"""
import array, ctypes, errno, fcntl, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def code(e): return errno.errorcode.get(e, str(e))
what = sys.argv[1]
if what == "io_uring":
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(425, 4, params)
    print("io_uring", "ok" if fd >= 0 else code(ctypes.get_errno()))
    sys.exit(0)
port = int(sys.argv[2])
def grafted():
    s = socket.socket(); s.connect(("127.0.0.1", port)); return s
def ifconf(s):
    buf = array.array("B", bytes(40 * 32))
    addr, _ = buf.buffer_info()
    req = struct.pack("iL", len(buf), addr)
    try:
        n = struct.unpack("iL", fcntl.ioctl(s.fileno(), 0x8912, req))[0]
    except OSError as e:
        return code(e.errno)
    return ",".join(bytes(buf[i:i + 16]).split(b"\0")[0].decode() for i in range(0, n, 40))
if what == "ioctl":
    print("native", ifconf(socket.socket()))
    print("grafted", ifconf(grafted()))
    n = socket.socket()
    nsfd = fcntl.ioctl(n.fileno(), 0x894C)  # SIOCGSKNS on a native socket: the container's netns
    print("native skns", os.fstat(nsfd).st_ino == os.stat("/proc/self/ns/net").st_ino)
    print("native ifindex", socket.if_nametoindex("lo"))  # SIOCGIFINDEX, performed by the supervisor
    try:
        fcntl.ioctl(n.fileno(), 0x8946, bytes(40))  # SIOCETHTOOL: carries a pointer, never emulated
        print("ethtool ok")
    except OSError as e:
        print("ethtool", code(e.errno))
    g = grafted()
    try:
        fcntl.ioctl(g.fileno(), 0x894C)  # SIOCGSKNS: the host netns as an fd
        print("skns ok")
    except OSError as e:
        print("skns", code(e.errno))
elif what == "bindtodevice":
    for name, s in (("native", socket.socket()), ("grafted", grafted())):
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
            print(name, "ok")
        except OSError as e:
            print(name, code(e.errno))
"""


def test_io_uring_refused(state_dir, ns):
    r = run(ns, [sys.executable, "-c", PROBE, "io_uring"])
    assert r.stdout.strip() == "io_uring ENOSYS"
    # control: the same probe outside the filter gets an io_uring
    p = __import__("subprocess").run([sys.executable, "-c", PROBE, "io_uring"], capture_output=True, text=True)
    assert p.stdout.strip() == "io_uring ok"


def _host_listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def _assert_no_connection(l: socket.socket) -> None:
    l.settimeout(0.5)
    try:
        l.accept()
    except socket.timeout:
        return
    raise AssertionError("the host listener got a connection")


def test_interface_ioctls_refused_on_grafted_sockets(state_dir, ns):
    with _host_listener() as l:
        r = run(ns, [sys.executable, "-c", PROBE, "ioctl", str(l.getsockname()[1])], **client_egress())
    lines = r.stdout.split("\n")
    assert lines[0] == "native lo"  # a container socket sees the container's interfaces
    assert lines[1] == "grafted EPERM"  # a grafted one would show the host's: refused
    assert lines[2:5] == ["native skns True", "native ifindex 1", "ethtool EPERM"]
    assert lines[5] == "skns EPERM"  # a grafted socket would hand out the host netns: refused
    audit = [json.loads(x) for x in open(os.path.join(state_dir, "audit.log"))]
    assert any(a["event"] == "deny" and a["op"].startswith("ioctl 0x8912") for a in audit)


def test_bindtodevice_refused_on_grafted_sockets(state_dir, ns):
    with _host_listener() as l:
        r = run(ns, [sys.executable, "-c", PROBE, "bindtodevice", str(l.getsockname()[1])], **client_egress())
    assert r.stdout.split("\n")[:2] == ["native ok", "grafted EPERM"]


NESTED = r"""
import ctypes, errno, os, socket, sys
port = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if sys.argv[2] == "later":  # granted once (the supervisor has read this thread's netns), then it moves
    first = socket.socket(); first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    first.bind(("0.0.0.0", 8000)); first.close()
if sys.argv[2] in ("nested", "later"):
    assert ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0  # CLONE_NEWNET
    os.system("ip link set lo up")
try:
    s.bind(("0.0.0.0", 8000)); s.listen()
    print("bound", s.getsockname(), flush=True)
except OSError as e:
    other = socket.socket(); other.bind(("0.0.0.0", 8001))  # what no pair matches stays local
    print("denied", errno.errorcode[e.errno], "local", other.getsockname(), flush=True)
sys.stdin.readline()
"""


def test_nested_netns_is_never_grafted(state_dir, ns, procs):
    """A task in a netns nested in the container: what a pair would graft is refused with EPERM
    (the same answer as the api and preload modes), what no pair matches stays in its netns; so
    for a thread that moves there after a grant (the netns is read at every grant, not kept)."""
    import subprocess

    from tests.helpers import graft_cmd, wait_port

    port = free_port()
    args = ["run", "-n", ns, "--mode", "seccomp", "--endpoint", f"web type ipv4 addr 127.0.0.1 port {port}",
            "--ingress", "0.0.0.0:8000=web", "--", sys.executable, "-c", NESTED, str(port)]
    denied = "denied EPERM local ('0.0.0.0', 8001)"
    for kind, first_line in (("nested", denied), ("direct", "bound ('0.0.0.0', 8000)"), ("later", denied)):
        p = subprocess.Popen([*graft_cmd(), *args, kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == first_line
        if kind == "direct":
            wait_port("127.0.0.1", port)
        else:
            assert refused(port)
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(10) == 0
    audit = [json.loads(x) for x in open(os.path.join(state_dir, "audit.log"))]
    binds = [a for a in audit if a["op"] == "bind" and a["port"] == 8000]
    assert binds[0]["event"] == "deny" and binds[0]["errno"] == 1 and "outside the container" in binds[0]["reason"]
    assert binds[1]["event"] == "grant"
    assert binds[-2]["event"] == "grant" and binds[-1]["event"] == "deny" and binds[-1]["errno"] == 1


def test_engine_denial_is_an_errno_and_logged(state_dir, ns):
    # an IPv4 socket cannot be grafted onto an IPv6 endpoint: the engine denies with EAFNOSUPPORT
    code = ("import socket,errno\n"
            "try:\n socket.socket().bind(('0.0.0.0',8000)); print('bound')\n"
            "except OSError as e: print(errno.errorcode[e.errno])\n")
    r = run(ns, [sys.executable, "-c", code], endpoints=[f"web6 type ipv6 addr ::1 port {free_port('::1')}"],
            ingress=["0.0.0.0:8000=web6"])
    assert r.stdout.strip() == "EAFNOSUPPORT"
    audit = [json.loads(x) for x in open(os.path.join(state_dir, "audit.log"))]
    assert [a["event"] for a in audit if a["op"] == "bind"] == ["deny"]


def test_host_service_without_egress_rule_unreachable(state_dir, ns):
    with _host_listener() as l:
        port = l.getsockname()[1]
        code = (f"import socket\ns=socket.socket()\nprint(s.connect_ex(('127.0.0.1',{port})))\n")
        # an egress rule for another prefix only: 127.0.0.1 stays in the container -> refused
        r = run(ns, [sys.executable, "-c", code], endpoints=["out type ipv4 addr 127.0.0.1 port dynamic"],
                egress=["127.0.0.2/32=out"])
        assert r.stdout.strip() == str(__import__("errno").ECONNREFUSED)
        _assert_no_connection(l)


def test_grafted_server_socket_cannot_connect(state_dir, ns):
    """A TCP socket grafted by an ingress bind listens at once: it can never be turned into a
    client of a host service (not even by an fd swap under a CONTINUEd call)."""
    with _host_listener() as l:
        code = ("import socket,errno\ns=socket.socket();s.bind(('0.0.0.0',8000))\n"
                f"print(errno.errorcode.get(s.connect_ex(('127.0.0.1',{l.getsockname()[1]}))))\n"
                "s.listen(5);print('listen ok')\n"
                "try:\n s.bind(('0.0.0.0',8000));print('rebound')\nexcept OSError as e: print(errno.errorcode[e.errno])\n")
        r = run(ns, [sys.executable, "-c", code],
                endpoints=[f"web type ipv4 addr 127.0.0.1 port {free_port()}", "out type ipv4 addr 127.0.0.1 port dynamic"],
                ingress=["0.0.0.0:8000=web"], egress=["127.0.0.0/8=out"])
        assert r.stdout.split("\n")[:3] == ["EISCONN", "listen ok", "EINVAL"]  # no second bind, as natively
        _assert_no_connection(l)


def test_socket_bound_in_container_is_not_grafted_by_egress(state_dir, ns):
    """Egress rules are for unbound sockets: a socket bound locally first stays in the container."""
    with _host_listener() as l:
        port = l.getsockname()[1]
        code = ("import socket\n"
                f"a=socket.socket();print(a.connect_ex(('127.0.0.1',{port})))\n"
                f"b=socket.socket();b.bind(('127.0.0.1',0));print(b.connect_ex(('127.0.0.1',{port})))\n")
        r = run(ns, [sys.executable, "-c", code], **client_egress())
        assert r.stdout.split() == ["0", str(__import__("errno").ECONNREFUSED)]
    audit = [json.loads(x) for x in open(os.path.join(state_dir, "audit.log"))]
    connects = [a for a in audit if a["op"] == "connect"]
    assert [a["event"] for a in connects] == ["grant", "local"] and "already bound" in connects[1]["reason"]
