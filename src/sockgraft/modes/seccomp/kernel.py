"""Kernel interface of seccomp user notification, in ctypes and struct (x86_64, Linux >= 6.9).

Pure packing/unpacking lives here next to the few raw syscalls Python 3.11 lacks
(seccomp, pidfd_getfd, process_vm_readv). Numbers were checked on this machine
(see KERNEL-NOTES.md): RECV 0xC0502100, SEND 0xC0182101, ID_VALID 0x40082102, ADDFD 0x40182103.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import socket
import struct
from dataclasses import dataclass

# -- constants ---------------------------------------------------------------------------------
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

SYS = {  # x86_64 syscall numbers
    "ioctl": 16, "connect": 42, "sendto": 44, "bind": 49, "getsockname": 51, "getpeername": 52,
    "setsockopt": 54, "seccomp": 317, "process_vm_readv": 310,
    "io_uring_setup": 425, "pidfd_open": 434, "pidfd_getfd": 438,
}
NR_NAME = {v: k for k, v in SYS.items()}

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1  # kernel >= 6.6: wake the supervisor on the trapping task's CPU

SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2

PIDFD_THREAD = os.O_EXCL
SIOCGSKNS = 0x894C
SIOCGIFCONF = 0x8912
IFREQ_SIZE = 40
# struct ifreq getters and setters with no pointer inside (the supervisor may perform these)
IFREQ_GET = frozenset((0x8910, 0x8913, 0x8915, 0x8917, 0x8919, 0x891B, 0x891D, 0x8921, 0x8927, 0x8933,
                       0x8935, 0x8942, 0x8970))
IFREQ_SET = frozenset((0x8914, 0x8916, 0x8918, 0x891A, 0x891C, 0x891E, 0x8922, 0x8923, 0x8924, 0x8934,
                       0x8936, 0x8943))
IOCTL_OUT = {0x8904: 4, 0x8905: 4, 0x8906: 16, 0x8907: 16}  # SIOCGPGRP, SIOCATMARK, SIOCGSTAMP(NS)
IFCONF = struct.Struct("=ixxxxQ")  # int ifc_len; union { char *buf; ... }
CAP_NET_ADMIN = 12

NOTIF_SIZE = 80
_NOTIF = struct.Struct("=QIIiIQ6Q")  # id, pid, flags, nr, arch, ip, args[6]
_RESP = struct.Struct("=QqiI")  # id, val, error, flags
_ADDFD = struct.Struct("=QIIII")  # id, flags, srcfd, newfd, newfd_flags
assert _NOTIF.size == NOTIF_SIZE and _RESP.size == 24 and _ADDFD.size == 24

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class UnsupportedArch(Exception):
    """Seccomp mode runs on x86_64 only."""


def check_arch() -> None:
    machine = platform.machine()
    if machine != "x86_64":
        raise UnsupportedArch(f"seccomp mode supports x86_64 only (this machine is {machine})")


def _syscall(nr: int, *args) -> int:
    ret = _libc.syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


# -- notifications -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Notif:
    id: int
    pid: int  # a thread id
    flags: int
    nr: int
    arch: int
    ip: int
    args: tuple

    @classmethod
    def unpack(cls, buf: bytes) -> "Notif":
        f = _NOTIF.unpack(buf)
        return cls(f[0], f[1], f[2], f[3], f[4], f[5], tuple(f[6:12]))

    def pack(self) -> bytes:
        return _NOTIF.pack(self.id, self.pid, self.flags, self.nr, self.arch, self.ip, *self.args)


def pack_resp(nid: int, val: int = 0, error: int = 0, flags: int = 0) -> bytes:
    """`error` is a positive errno here; the kernel wants it negated."""
    return _RESP.pack(nid, val, -error if error else 0, flags)


def pack_addfd(nid: int, srcfd: int, newfd: int = 0, flags: int = 0, newfd_flags: int = 0) -> bytes:
    return _ADDFD.pack(nid, flags, srcfd, newfd, newfd_flags)


def notif_recv(listener: int) -> Notif:
    buf = bytearray(NOTIF_SIZE)  # must be zeroed
    fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
    return Notif.unpack(bytes(buf))


def notif_send(listener: int, nid: int, val: int = 0, error: int = 0, cont: bool = False) -> None:
    fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND,
                pack_resp(nid, val, error, SECCOMP_USER_NOTIF_FLAG_CONTINUE if cont else 0))


def notif_id_valid(listener: int, nid: int) -> bool:
    try:
        fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", nid))
        return True
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise


def notif_set_flags(listener: int, flags: int) -> None:
    """SECCOMP_IOCTL_NOTIF_SET_FLAGS (argument by value); EINVAL where the kernel lacks a flag."""
    fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, flags)


def notif_addfd(listener: int, nid: int, srcfd: int, newfd: int | None = None, cloexec: bool = False,
                send: bool = False) -> int:
    """Install srcfd in the target: over `newfd` (SETFD) or at a fresh number; with `send` the
    syscall returns that number atomically. Returns the fd number in the target."""
    flags = (SECCOMP_ADDFD_FLAG_SETFD if newfd is not None else 0) | (SECCOMP_ADDFD_FLAG_SEND if send else 0)
    return fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD,
                       pack_addfd(nid, srcfd, newfd or 0, flags, os.O_CLOEXEC if cloexec else 0))


def install_filter(prog: bytes, flags: int) -> int:
    """seccomp(SET_MODE_FILTER, flags, &sock_fprog); returns the listener fd with NEW_LISTENER."""
    n = len(prog) // 8
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("=HxxxxxxQ", n, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    return _syscall(SYS["seccomp"], ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags), fbuf)


# -- processes, fds, memory --------------------------------------------------------------------
def pidfd_open_thread(tid: int) -> int:
    """A pidfd for any thread (leader or not): PIDFD_THREAD works for both on 6.9+."""
    return os.pidfd_open(tid, PIDFD_THREAD)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    return _syscall(SYS["pidfd_getfd"], ctypes.c_int(pidfd), ctypes.c_int(targetfd), ctypes.c_uint(0))


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def read_mem(pid: int, addr: int, size: int) -> bytes:
    """Copy `size` bytes at `addr` of task `pid` (short read -> EFAULT)."""
    if size == 0:
        return b""
    buf = ctypes.create_string_buffer(size)
    local = _IOVec(ctypes.addressof(buf), size)
    remote = _IOVec(addr, size)
    n = _syscall(SYS["process_vm_readv"], ctypes.c_int(pid), ctypes.byref(local), ctypes.c_ulong(1),
                 ctypes.byref(remote), ctypes.c_ulong(1), ctypes.c_ulong(0))
    if n != size:
        raise OSError(errno.EFAULT, "short read of target memory")
    return buf.raw


def fd_cloexec(tid: int, fd: int) -> bool:
    """Whether the target's fd has close-on-exec (a per-fd flag a dup cannot show)."""
    try:
        with open(f"/proc/{tid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"flags:"):
                    return bool(int(line.split()[1], 8) & os.O_CLOEXEC)
    except OSError:
        pass
    return False


def live_socket_inodes() -> set[int]:
    """The inodes of this netns' listening TCP sockets and bound or connected UDP ones (a grafted
    bind's host socket is one of them while it lives: a TCP one listens at once). TCP is asked of
    sock_diag for the LISTEN state only: the kernel then skips the established and TIME_WAIT
    sockets, which /proc/net/tcp lists one by one (120,000 of them after a churn made a read of it
    cost ~0.25 s per 1,024 grafted binds). /proc/self/net/udp{,6} for UDP (no TIME_WAIT there)."""
    try:
        out = _diag_inodes(socket.IPPROTO_TCP, 1 << _TCP_LISTEN)
    except OSError:
        out = _proc_inodes(("tcp", "tcp6"))
    return out | _proc_inodes(("udp", "udp6"))


_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLMSG_ERROR, _NLMSG_DONE = 4, 20, 2, 3
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_TCP_LISTEN = 10
_DIAG_INODE = 68  # struct inet_diag_msg: family, state, timer, retrans, id (48), expires, rqueue, wqueue, uid, inode


def _diag_inodes(proto: int, states: int) -> set[int]:
    out: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG) as nl:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            # struct inet_diag_req_v2: family, protocol, ext, pad, states, id (48 bytes: any)
            req = struct.pack("=BBBxI48x", family, proto, 0, states)
            nl.send(struct.pack("=LHHLL", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, seq, 0) + req)
            while True:
                data, off, done = nl.recv(1 << 16), 0, False
                while off + 16 <= len(data):
                    length, kind = struct.unpack_from("=LH", data, off)
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        err = -struct.unpack_from("=i", data, off + 16)[0]
                        raise OSError(err, f"sock_diag: {os.strerror(err)}")
                    out.add(struct.unpack_from("=I", data, off + 16 + _DIAG_INODE)[0])
                    off += (length + 3) & ~3
                if done or not data:
                    break
    return out


def _proc_inodes(names) -> set[int]:
    out: set[int] = set()
    for name in names:
        try:
            with open(f"/proc/self/net/{name}", "rb") as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split(None, 10)
                    if len(fields) > 9:
                        out.add(int(fields[9]))
        except FileNotFoundError:
            continue  # (no IPv6)
    return out


def has_cap(tid: int, cap: int) -> bool:
    """Whether the task has `cap` in its effective set."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return False


_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def ifconf(fd: int, length: int, want_data: bool) -> tuple[int, bytes]:
    """SIOCGIFCONF on our own fd: (ifc_len returned, the ifreq array)."""
    buf = ctypes.create_string_buffer(max(length, 1))
    req = ctypes.create_string_buffer(IFCONF.pack(length, ctypes.addressof(buf) if want_data else 0), IFCONF.size)
    if _libc.ioctl(fd, SIOCGIFCONF, req) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    got = IFCONF.unpack(req.raw)[0]
    return got, buf.raw[:got] if want_data else b""


# -- raw socket calls on raw sockaddr bytes (no re-encoding of what was judged) ------------------
for _name in ("bind", "connect"):
    getattr(_libc, _name).argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.sendto.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.sendto.restype = ctypes.c_ssize_t


def raw_call(name: str, fd: int, raw: bytes) -> int:
    """bind/connect on `fd` with the exact sockaddr bytes; returns 0 or a positive errno."""
    ret = getattr(_libc, name)(fd, raw, len(raw))
    return ctypes.get_errno() if ret < 0 else 0


def raw_sendto(fd: int, data: bytes, flags: int, raw: bytes) -> tuple[int, int]:
    """sendto with the exact bytes; returns (bytes sent, 0) or (0, errno)."""
    ret = _libc.sendto(fd, data, len(data), flags, raw, len(raw))
    return (0, ctypes.get_errno()) if ret < 0 else (ret, 0)


# -- sockaddr ----------------------------------------------------------------------------------
class BadSockaddr(ValueError):
    pass


def decode_sockaddr(raw: bytes) -> tuple[int, str, int]:
    """(family, address, port) of a sockaddr_in/sockaddr_in6; BadSockaddr for anything else."""
    if len(raw) < 2:
        raise BadSockaddr("sockaddr too short")
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET:
        if len(raw) < 16:
            raise BadSockaddr("sockaddr_in too short")
        port = struct.unpack_from("!H", raw, 2)[0]
        return family, socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        if len(raw) < 24:  # SIN6_LEN_RFC2133: scope id optional
            raise BadSockaddr("sockaddr_in6 too short")
        port = struct.unpack_from("!H", raw, 2)[0]
        return family, socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise BadSockaddr(f"address family {family}")


def encode_sockaddr(family: int, addr: str, port: int, flowinfo: int = 0, scope_id: int = 0) -> bytes:
    if family == socket.AF_INET:
        return struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_pton(family, addr) + bytes(8)
    if family == socket.AF_INET6:
        return (struct.pack("=H", family) + struct.pack("!HI", port, flowinfo)
                + socket.inet_pton(family, addr) + struct.pack("=I", scope_id))
    raise BadSockaddr(f"address family {family}")


def with_port(raw: bytes, port: int) -> bytes:
    """The same sockaddr_in/in6 with another port."""
    return raw[:2] + struct.pack("!H", port) + raw[4:]
