"""User namespaces for `graft run`: the command is root inside, someone unprivileged outside.

- Rootless (an unprivileged caller): a new user namespace that maps the caller's uid/gid to 0, and
  a new network namespace owned by it, with `lo` up. The caller keeps every capability over both
  (it owns the user namespace), so the command can bind low ports *in its own netns*, while the
  grafted host sockets are made by the caller's fd service / supervisor as the caller.
- Root with `--userns`: the named netns stays root's (made by `graft run` as before); only the
  command enters a new user namespace whose root is an unprivileged host uid (`GRAFT_USERNS_UID`,
  default 65534 = nobody). It holds no capability over the netns, its sockets or their marks.

Both are created by a short-lived holder child and kept by file descriptors in `graft run` (no
process has to stay in them). `Namespaces.enter()` runs in the command's child before exec.
"""
from __future__ import annotations

import ctypes
import os
import socket
import struct
import fcntl

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_libc = ctypes.CDLL(None, use_errno=True)


class UsernsError(OSError):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise UsernsError(err, f"{what}: {os.strerror(err)}")


def lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def userns_uid() -> int:
    value = os.environ.get("GRAFT_USERNS_UID", "65534")
    if not value.isdigit() or int(value) == 0:
        raise UsernsError(0, f"GRAFT_USERNS_UID={value!r}: give a non-zero host uid")
    return int(value)


class Namespaces:
    """A user namespace (and, rootless, its network namespace), held open by fds."""

    def __init__(self, user_fd: int, net_fd: int | None):
        self.user_fd, self.net_fd = user_fd, net_fd

    @property
    def net_ino(self) -> int | None:
        return os.fstat(self.net_fd).st_ino if self.net_fd is not None else None

    @property
    def net_path(self) -> str | None:
        return f"/proc/{os.getpid()}/fd/{self.net_fd}" if self.net_fd is not None else None

    @classmethod
    def create(cls, with_net: bool) -> "Namespaces":
        """Make the namespaces: with_net (rootless) maps this user to 0 and adds a netns with lo up;
        without (root --userns) maps 0 to userns_uid()."""
        outside = None if with_net else userns_uid()
        uid, gid = os.geteuid(), os.getegid()
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the holder
            code = 1
            try:
                os.close(to_child_w)
                os.close(to_parent_r)
                _check(_libc.unshare(CLONE_NEWUSER | (CLONE_NEWNET if with_net else 0)), "unshare")
                os.write(to_parent_w, b"u")
                if os.read(to_child_r, 1) == b"m":
                    if with_net:
                        lo_up()
                    os.write(to_parent_w, b"r")
                    os.read(to_child_r, 1)  # until the parent holds the namespaces
                    code = 0
            except BaseException as e:  # noqa: BLE001 - the parent reports it
                try:
                    os.write(to_parent_w, b"E" + str(e).encode()[:200])
                except OSError:
                    pass
            finally:
                os._exit(code)
        os.close(to_child_r)
        os.close(to_parent_w)
        try:
            said = os.read(to_parent_r, 256)
            if said != b"u":
                raise UsernsError(0, f"cannot create a user namespace: {said[1:].decode(errors='replace') or 'holder died'}")
            try:
                if with_net:  # an unprivileged user may map exactly its own ids
                    _write(f"/proc/{pid}/setgroups", "deny")
                    _write(f"/proc/{pid}/uid_map", f"0 {uid} 1\n")
                    _write(f"/proc/{pid}/gid_map", f"0 {gid} 1\n")
                else:
                    _write(f"/proc/{pid}/uid_map", f"0 {outside} 1\n")
                    _write(f"/proc/{pid}/gid_map", f"0 {outside} 1\n")
            except OSError as e:
                raise UsernsError(e.errno or 0, f"cannot map ids into the user namespace: {e.strerror or e}") from None
            os.write(to_child_w, b"m")
            said = os.read(to_parent_r, 256)
            if said != b"r":
                raise UsernsError(0, f"cannot set up the namespaces: {said[1:].decode(errors='replace') or 'holder died'}")
            user_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            net_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC) if with_net else None
            return cls(user_fd, net_fd)
        finally:
            for fd in (to_child_w, to_parent_r):
                os.close(fd)
            os.waitpid(pid, 0)

    def enter(self, netns_path: str | None = None, low_ports: bool = False) -> None:
        """In the command's child, before exec: join the netns (root: the named one first, while
        still host root), then the user namespace, and become its root (uid/gid 0 inside).
        low_ports (root, a netns this run made): the command's own binds in it may use any port (the
        netns is root's, so its user-namespace root lacks CAP_NET_BIND_SERVICE there)."""
        if self.net_fd is None:
            if netns_path:
                fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _check(_libc.setns(fd, CLONE_NEWNET), "setns(net)")
                finally:
                    os.close(fd)
                if low_ports:
                    _write("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0")
            os.setgroups([])
            _check(_libc.setns(self.user_fd, CLONE_NEWUSER), "setns(user)")
        else:
            _check(_libc.setns(self.user_fd, CLONE_NEWUSER), "setns(user)")
            _check(_libc.setns(self.net_fd, CLONE_NEWNET), "setns(net)")
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)

    def close(self) -> None:
        for fd in (self.user_fd, self.net_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.user_fd = self.net_fd = None  # type: ignore[assignment]


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024
