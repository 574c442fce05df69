"""The supervisor's handlers in-process: notifications fed through a fake `Kernel` (the target is
this test process: its "fds" are real sockets of the test, its "memory" a dict), with the real
engine, store, audit log and host sockets on loopback. No namespace, no seccomp filter."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket

import pytest

from sockgraft.core.endpoint import parse_endpoint
from sockgraft.core.rules import parse_egress, parse_ingress
from sockgraft.host.store import Store
from sockgraft.modes.seccomp import kernel as K
from sockgraft.modes.seccomp.supervisor import Supervisor
from sockgraft.modes.seccomp.targets import Call, Target
from tests.helpers import free_port

KEY, NETNS = "unit", 4242


class FakeKernel:
    """The kernel calls of targets.Kernel, answered from this process."""

    def __init__(self):
        self.fds: dict[int, socket.socket] = {}  # the target's fd table
        self.memory: dict[int, bytes] = {}
        self.host: set[int] = set()  # inodes of host (grafted) sockets
        self.sent: list[tuple] = []  # (id, val, err, cont)
        self.valid = True
        self.task_netns = NETNS
        self.target = Target(-1, KEY, NETNS)  # its listener, as the supervisor knows it
        self._next = 0x1000

    def give(self, s: socket.socket, grafted: bool = False) -> int:
        fd = 100 + len(self.fds)
        self.fds[fd] = s
        if grafted:
            self.host.add(os.fstat(s.fileno()).st_ino)
        return fd

    def put(self, data: bytes) -> int:
        self._next += 0x1000
        self.memory[self._next] = data
        return self._next

    # -- targets.Kernel --
    def send(self, listener, nid, val=0, err=0, cont=False):
        self.sent.append((nid, val, err, cont))

    def addfd(self, listener, nid, srcfd, newfd=None, cloexec=False, send=False):
        s = socket.socket(fileno=os.dup(srcfd))
        old = self.fds.get(newfd)
        if old is not None:
            old.close()
        self.fds[newfd] = s
        self.host.add(os.fstat(s.fileno()).st_ino)
        return newfd

    def id_valid(self, listener, nid):
        return self.valid

    def sync_wake_up(self, listener):
        pass

    def getfd(self, tid, fd):
        if fd not in self.fds:
            raise OSError(errno.EBADF, "bad fd")
        return os.dup(self.fds[fd].fileno())

    def read(self, tid, addr, size):
        if addr not in self.memory:
            raise OSError(errno.EFAULT, "bad address")
        return self.memory[addr][:size]

    def write(self, tid, writes, check):
        check()
        for addr, data in writes:
            self.memory[addr] = data

    def cloexec(self, tid, fd):
        return False

    def netns_ino(self, tid):
        return self.task_netns

    def has_cap(self, tid, cap):
        return False

    def is_host(self, s):
        return os.fstat(s.fileno()).st_ino in self.host


@pytest.fixture
def sup(state_dir):
    sup = Supervisor(state_dir, kernel=FakeKernel())
    yield sup
    sup.close()
    for s in sup.kernel.fds.values():
        s.close()


def table(state_dir, endpoints=(), ingress=(), egress=()):
    with Store(state_dir) as store:
        store.install(KEY, NETNS, "seccomp", [parse_endpoint(e) for e in endpoints],
                      [parse_ingress(i) for i in ingress], [parse_egress(e) for e in egress], fresh=True)


_ids = iter(range(1, 1 << 30))


def notify(sup, name: str, *args) -> tuple:
    """Serve one notification of syscall `name`; returns the answer (val, err, cont), or None."""
    nid = next(_ids)
    n = K.Notif(nid, os.getpid(), 0, K.SYS[name], K.AUDIT_ARCH_X86_64, 0, tuple(args) + (0,) * (6 - len(args)))
    sup.handlers.serve(Call(sup.kernel, sup.kernel.target, n))
    answers = [a[1:] for a in sup.kernel.sent if a[0] == nid]
    assert len(answers) <= 1
    return answers[0] if answers else None


def sockaddr(sup, addr: str, port: int) -> tuple[int, int]:
    raw = K.encode_sockaddr(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr, port)
    return sup.kernel.put(raw), len(raw)


def audit(state_dir) -> list[dict]:
    with open(os.path.join(state_dir, "audit.log")) as f:
        return [json.loads(line) for line in f]


def test_bind_grafted_by_an_ingress_pair(state_dir, sup):
    host_port = free_port()
    table(state_dir, [f"web type ipv4 addr 127.0.0.1 port {host_port}"], ["0.0.0.0:8000=web"])
    fd = sup.kernel.give(socket.socket())
    assert notify(sup, "bind", fd, *sockaddr(sup, "0.0.0.0", 8000)) == (0, 0, False)
    h = sup.kernel.fds[fd]
    assert sup.kernel.is_host(h) and h.getsockname() == ("127.0.0.1", host_port)
    assert h.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1  # listening at once
    # getsockname: the app's view, written into its memory
    addr, lenp = sup.kernel.put(bytes(16)), sup.kernel.put((16).to_bytes(4, "little"))
    assert notify(sup, "getsockname", fd, addr, lenp) == (0, 0, False)
    assert K.decode_sockaddr(sup.kernel.memory[addr]) == (socket.AF_INET, "0.0.0.0", 8000)
    sup.audit.flush(force=True)
    (a,) = [a for a in audit(state_dir) if a["op"] == "bind"]
    assert a["event"] == "grant" and a["endpoint"] == "web" and a["mode"] == "seccomp"


def test_dual_stack_bind_grafted_by_an_ipv4_pair(state_dir, sup):
    host_port = free_port()
    table(state_dir, [f"web type ipv4 addr 127.0.0.1 port {host_port}"], ["0.0.0.0:8000=web"])
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    fd = sup.kernel.give(s)
    assert notify(sup, "bind", fd, *sockaddr(sup, "::", 8000)) == (0, 0, False)
    assert sup.kernel.fds[fd].getsockname()[:2] == ("::ffff:127.0.0.1", host_port)


def test_unmatched_bind_is_performed_on_the_app_socket(state_dir, sup):
    table(state_dir, ["web type ipv4 addr 127.0.0.1 port dynamic"], ["0.0.0.0:8000=web"])
    app = socket.socket()
    fd = sup.kernel.give(app)
    port = free_port()
    assert notify(sup, "bind", fd, *sockaddr(sup, "127.0.0.1", port)) == (0, 0, False)
    assert sup.kernel.fds[fd] is app and app.getsockname() == ("127.0.0.1", port)


def test_nested_task_is_denied_what_a_pair_would_graft(state_dir, sup):
    table(state_dir, [f"web type ipv4 addr 127.0.0.1 port {free_port()}"], ["0.0.0.0:8000=web"])
    sup.kernel.task_netns = NETNS + 1
    app = socket.socket()
    fd = sup.kernel.give(app)
    assert notify(sup, "bind", fd, *sockaddr(sup, "0.0.0.0", 8000)) == (0, errno.EPERM, False)
    assert sup.kernel.fds[fd] is app and app.getsockname()[1] == 0
    sup.audit.flush(force=True)
    (a,) = audit(state_dir)
    assert a["event"] == "deny" and "outside the container" in a["reason"]


def test_connect_grafted_by_an_egress_rule(state_dir, sup):
    table(state_dir, ["out type ipv4 addr 127.0.0.1 port dynamic"], egress=["127.0.0.2/32=out"])
    with socket.socket() as srv:
        srv.bind(("127.0.0.2", 0))
        srv.listen(4)
        app = socket.socket()
        app.setblocking(False)
        fd = sup.kernel.give(app)
        val, err, cont = notify(sup, "connect", fd, *sockaddr(sup, *srv.getsockname()))
        assert err in (0, errno.EINPROGRESS) and not cont
        h = sup.kernel.fds[fd]
        assert sup.kernel.is_host(h) and fcntl.fcntl(h.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK  # as the app's
        c, peer = srv.accept()
        c.close()
        assert peer == h.getsockname() and peer[0] == "127.0.0.1"


def test_connect_without_a_rule_stays_with_the_app_socket(state_dir, sup):
    table(state_dir, ["out type ipv4 addr 127.0.0.1 port dynamic"], egress=["127.0.0.2/32=out"])
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        app = socket.socket()
        app.setblocking(False)
        fd = sup.kernel.give(app)
        assert notify(sup, "connect", fd, *sockaddr(sup, *srv.getsockname()))[1] in (0, errno.EINPROGRESS)
        assert sup.kernel.fds[fd] is app and not sup.kernel.is_host(app)
        srv.accept()[0].close()


@pytest.mark.parametrize("verb", ["connect", "sendto"])
def test_grafted_socket_only_reaches_what_an_egress_rule_names(state_dir, sup, verb):
    table(state_dir, ["out type ipv4 addr 127.0.0.1 port dynamic"], egress=["127.0.0.2/32=out"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as named, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        named.bind(("127.0.0.2", 0))
        other.bind(("127.0.0.3", 0))
        other.setblocking(False)
        g = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        g.bind(("127.0.0.1", 0))  # a host socket, as grafted
        fd = sup.kernel.give(g, grafted=True)
        data = sup.kernel.put(b"dg")
        args = (lambda a: (fd, *a)) if verb == "connect" else (lambda a: (fd, data, 2, 0, *a))
        assert notify(sup, verb, *args(sockaddr(sup, *other.getsockname()))) == (0, errno.EPERM, False)
        with pytest.raises(BlockingIOError):
            other.recv(16)
        assert notify(sup, verb, *args(sockaddr(sup, *named.getsockname())))[1:] == (0, False)
        if verb == "connect":
            assert g.getpeername() == named.getsockname()
        else:
            named.settimeout(5)
            assert named.recvfrom(16) == (b"dg", g.getsockname())
    sup.audit.flush(force=True)
    events = [(a["event"], a["addr"], a["grafted"]) for a in audit(state_dir) if a["op"] == verb]
    assert events == [("deny", "127.0.0.3", True), ("grant", "127.0.0.2", True)]


def test_sendto_grafts_an_unbound_datagram_socket(state_dir, sup):
    table(state_dir, ["out type ipv4 addr 127.0.0.1 port dynamic"], egress=["127.0.0.2/32=out"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.2", 0))
        rx.settimeout(5)
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fd = sup.kernel.give(app)
        assert notify(sup, "sendto", fd, sup.kernel.put(b"hello"), 5, 0, *sockaddr(sup, *rx.getsockname())) == (5, 0, False)
        h = sup.kernel.fds[fd]
        assert h is not app and sup.kernel.is_host(h)
        assert rx.recvfrom(16) == (b"hello", h.getsockname())


def test_what_the_handlers_refuse_before_judging(state_dir, sup):
    table(state_dir)
    fd = sup.kernel.give(socket.socket())
    assert notify(sup, "bind", fd, sup.kernel.put(bytes(200)), 200) == (0, errno.EINVAL, False)  # > 128 bytes
    assert notify(sup, "bind", fd, 0, 16) == (0, errno.EFAULT, False)
    assert notify(sup, "bind", 7, *sockaddr(sup, "127.0.0.1", 0)) == (0, errno.EBADF, False)
    assert notify(sup, "getpeername", fd) == (0, errno.ENOSYS, False)  # no handler
    sup.kernel.valid = False  # the task left the syscall: nothing performed, nothing answered
    assert notify(sup, "bind", fd, *sockaddr(sup, "127.0.0.1", free_port())) is None
    assert sup.kernel.fds[fd].getsockname()[1] == 0
