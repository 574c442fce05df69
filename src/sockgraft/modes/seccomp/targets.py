"""What one notification is served with: its listener (`Target`), the notification itself (`Call`,
with the per-notification steps: our duplicate of an fd, the memory copy, the validity check, the
install of a host socket, the write-back of results) and the kernel calls they make (`Kernel`).

`Kernel` is the only place the handlers reach the kernel about a target (seccomp ioctls, pidfd,
process memory, /proc). A unit test hands the supervisor another object with the same methods to
feed notifications in-process; everything else (sockets, the engine, the store) stays real.
"""
from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field

from sockgraft.host import netns
from sockgraft.modes.seccomp import kernel as K

MAX_SOCKADDR = 128
VIEWS_MIN = 1024  # grafted binds remembered before the first pruning (Target.bound)


class Gone(Exception):
    """The target task or its notification went away: nothing to answer."""


class Errno(Exception):
    """Answer the notification with this errno (a positive number)."""

    def __init__(self, err: int):
        super().__init__(err)
        self.err = err


@dataclass
class Target:
    """One listener: a container (or part of one) under one seccomp filter."""

    fd: int
    key: str
    ino: int | None  # the container's netns inode; tasks elsewhere are never granted
    busy: int = 0  # pool jobs and pending connects still using `fd`
    closing: bool = False
    views: dict = field(default_factory=dict)  # host socket inode -> the sockaddr the app bound
    served: dict = field(default_factory=dict)  # (host addr, port) of a grafted bind -> app sockaddr
    slot: int = -1  # its slot in the native loop (fast.Loop), -1: the Python loop epolls it
    views_limit: int = VIEWS_MIN  # `views` is pruned when it grows beyond this

    def bound(self, ino: int, host: tuple, view: bytes) -> None:
        """A grafted bind: host socket `ino`, bound to `host` (addr, port), shows `view`. `views`
        forgets the sockets closed since (a grafted bind's socket listens at once, or is a bound UDP
        one: alive, it is in the netns' socket tables) whenever it doubles, so that it stays
        bounded by the live grafted sockets; `served` is keyed by host address and port (bounded)."""
        self.views[ino] = view
        self.served[host] = view
        if len(self.views) > self.views_limit:
            alive = K.live_socket_inodes()
            alive.add(ino)
            self.views = {i: v for i, v in self.views.items() if i in alive}
            self.views_limit = max(VIEWS_MIN, 2 * len(self.views))


class Kernel:
    """The kernel calls of the supervisor about its targets (the real ones)."""

    def __init__(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            self.host_cookie = netns.netns_cookie(probe)

    def recv(self, listener: int) -> K.Notif:
        return K.notif_recv(listener)

    def send(self, listener: int, nid: int, val: int = 0, err: int = 0, cont: bool = False) -> None:
        K.notif_send(listener, nid, val, err, cont)

    def addfd(self, listener: int, nid: int, srcfd: int, newfd: int | None = None, cloexec: bool = False,
              send: bool = False) -> int:
        return K.notif_addfd(listener, nid, srcfd, newfd, cloexec, send)

    def id_valid(self, listener: int, nid: int) -> bool:
        return K.notif_id_valid(listener, nid)

    def sync_wake_up(self, listener: int) -> None:
        """Ask for same-CPU wake-ups (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP; OSError where missing)."""
        K.notif_set_flags(listener, K.SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)

    def getfd(self, tid: int, fd: int) -> int:
        """Our duplicate of fd `fd` of thread `tid` (ESRCH when the thread is gone)."""
        try:
            pidfd = K.pidfd_open_thread(tid)
        except OSError:
            raise OSError(errno.ESRCH, "target gone") from None
        try:
            return K.pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)

    def read(self, tid: int, addr: int, size: int) -> bytes:
        return K.read_mem(tid, addr, size)

    def write(self, tid: int, writes: list[tuple[int, bytes]], check) -> None:
        """Write into the target's memory: /proc/TID/mem is opened first, then `check()` (the
        notification is still valid), so the writes cannot land in another process."""
        try:
            mem = os.open(f"/proc/{tid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            raise ProcessLookupError(errno.ESRCH, "target gone") from None
        try:
            check()
            for addr, data in writes:
                if data:
                    os.pwrite(mem, data, addr)
        finally:
            os.close(mem)

    def cloexec(self, tid: int, fd: int) -> bool:
        return K.fd_cloexec(tid, fd)

    def netns_ino(self, tid: int) -> int:
        return os.stat(f"/proc/{tid}/ns/net").st_ino

    def has_cap(self, tid: int, cap: int) -> bool:
        return K.has_cap(tid, cap)

    def is_host(self, s: socket.socket) -> bool:
        """The socket lives in the host netns (it is grafted)."""
        return netns.netns_cookie(s) == self.host_cookie


class Call:
    """One notification being served, and the steps every handler builds on."""

    __slots__ = ("kernel", "target", "n")

    def __init__(self, kernel: Kernel, target: Target, n: K.Notif):
        self.kernel, self.target, self.n = kernel, target, n

    @property
    def args(self) -> tuple:
        return self.n.args

    @property
    def appfd(self) -> int:
        """The fd argument (arg 0) as the kernel reads it: an int."""
        return self.n.args[0] & 0xFFFFFFFF

    def send(self, val: int = 0, err: int = 0, cont: bool = False) -> None:
        """Answer; a target that is gone or was interrupted (ENOENT) needs no answer."""
        try:
            self.kernel.send(self.target.fd, self.n.id, val, err, cont)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise

    def dup(self, fd: int) -> int:
        """Our own duplicate of the target's fd (closed by the caller)."""
        try:
            return self.kernel.getfd(self.n.pid, fd)
        except OSError as e:
            if e.errno == errno.EBADF:
                raise Errno(errno.EBADF) from None
            if e.errno == errno.ESRCH:
                raise Gone() from None
            raise

    def sock(self, fd: int) -> socket.socket:
        """Our duplicate of the target's fd as a socket (ENOTSOCK for anything else)."""
        dup = self.dup(fd)
        try:
            return socket.socket(fileno=dup)
        except OSError as e:
            os.close(dup)
            if e.errno == errno.ENOTSOCK:
                raise Errno(errno.ENOTSOCK) from None
            raise

    def read(self, addr: int, size: int) -> bytes:
        """A copy of the target's memory (EFAULT for a bad pointer)."""
        try:
            return self.kernel.read(self.n.pid, addr, size)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise Gone() from None
            raise Errno(errno.EFAULT) from None

    def valid(self) -> None:
        """After reading target memory: the task still waits in this very syscall."""
        if not self.kernel.id_valid(self.target.fd, self.n.id):
            raise Gone()

    def sockaddr(self, addr: int, length: int) -> bytes:
        if length > MAX_SOCKADDR or length < 0:
            raise Errno(errno.EINVAL)
        if length and not addr:
            raise Errno(errno.EFAULT)
        return self.read(addr, length)

    def prologue(self, addr_arg: int, len_arg: int) -> tuple[socket.socket, bytes]:
        """Common start of bind/connect/sendto: our duplicate of the socket, the sockaddr copied
        once, and the validity check after the copy."""
        s = self.sock(self.appfd)
        try:
            raw = self.sockaddr(self.n.args[addr_arg], self.n.args[len_arg] & 0xFFFFFFFF)
            self.valid()
        except BaseException:
            s.close()
            raise
        return s, raw

    def nested(self) -> bool:
        """The task is in another netns than the container's (it unshared or setns'ed)."""
        try:
            return self.target.ino is not None and self.kernel.netns_ino(self.n.pid) != self.target.ino
        except OSError:
            raise Gone() from None

    def cloexec(self, fd: int) -> bool:
        return self.kernel.cloexec(self.n.pid, fd)

    def has_cap(self, cap: int) -> bool:
        return self.kernel.has_cap(self.n.pid, cap)

    def install(self, h: socket.socket, appfd: int, cloexec: bool) -> None:
        """Put our host socket `h` over the target's fd number `appfd` (the native socket there is
        closed by the kernel). The answer is sent separately."""
        try:
            self.kernel.addfd(self.target.fd, self.n.id, h.fileno(), appfd, cloexec)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise Gone() from None
            raise

    def install_and_send(self, fd: int) -> None:
        """Install `fd` at a fresh number and answer with that number, in one step."""
        try:
            self.kernel.addfd(self.target.fd, self.n.id, fd, cloexec=True, send=True)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise

    def write_back(self, writes: list[tuple[int, bytes]]) -> None:
        """Write results into the target's memory, checked valid after the memory was opened."""
        try:
            self.kernel.write(self.n.pid, writes, self.valid)
        except ProcessLookupError:
            raise Gone() from None
        except OSError:
            raise Errno(errno.EFAULT) from None


@dataclass
class Pending:
    """A blocking connect whose host-side non-blocking connect is in progress."""

    call: Call
    appfd: int
    cloexec: bool
    host: socket.socket
    deadline: float | None  # the app's SO_SNDTIMEO, if it set one
    raw: bytes = b""  # the judged destination (connected again once done: a blocking connect's state)

    @property
    def target(self) -> Target:
        return self.call.target
