"""Network namespace plumbing: naming, identity, creation, entering, and who is on a socket."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from sockgraft.core.endpoint import SpecError

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
SO_PEERPIDFD = 77
PIDFD_GET_NET_NAMESPACE = 0xFF04

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Container:
    """A container as the tables know it: `key` is the netns name, or `netns:INODE` when unnamed."""

    key: str
    ino: int
    path: str  # a path that opens the netns (may be /proc/PID/ns/net)

    @property
    def name(self) -> str | None:
        return None if self.key.startswith(UNNAMED) else self.key


def check_netns_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or len(name) > 255 or "\0" in name:
        raise SpecError(f"bad netns name {name!r}")
    return name


def netns_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, check_netns_name(name))


def named_ino(name: str) -> int | None:
    try:
        return os.stat(netns_path(name)).st_ino
    except FileNotFoundError:
        return None


def name_of_ino(ino: int) -> str | None:
    """The iproute2 name of the netns with this inode, if it has one."""
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return None
    for name in names:
        try:
            if os.stat(os.path.join(NETNS_RUN_DIR, name)).st_ino == ino:
                return name
        except OSError:
            continue
    return None


UNNAMED = "netns:"  # the key of a netns without an iproute2 name: netns:INODE


def key_for_ino(ino: int) -> str:
    """A container's table key: its netns name, or netns:INODE."""
    return name_of_ino(ino) or f"{UNNAMED}{ino}"


def key_ino(key: str) -> int | None:
    """The netns inode a table key stands for (None: a name with no netns now)."""
    if key.startswith(UNNAMED):
        rest = key[len(UNNAMED):]
        return int(rest) if rest.isdigit() else None
    try:
        return named_ino(key)
    except SpecError:
        return None


def by_name(name: str) -> Container:
    ino = named_ino(name)
    if ino is None:
        raise SpecError(f"netns {name!r} does not exist (no {netns_path(name)})")
    return Container(name, ino, netns_path(name))


def by_pid(pid: int) -> Container:
    path = f"/proc/{pid}/ns/net"
    try:
        ino = os.stat(path).st_ino
    except (FileNotFoundError, ProcessLookupError):
        raise SpecError(f"no process {pid}") from None
    except PermissionError:
        raise SpecError(f"cannot see the netns of process {pid}: permission denied") from None
    return Container(key_for_ino(ino), ino, path)


def current() -> Container:
    return by_pid(os.getpid())


def resolve(name: str | None = None, pid: int | None = None) -> Container:
    if name is not None and pid is not None:
        raise SpecError("give -n NETNS or --pid PID, not both")
    if name is not None:
        return by_name(name)
    if pid is not None:
        return by_pid(pid)
    return current()


# -- entering and creating -----------------------------------------------------------------------
def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def enter(path: str) -> None:
    """Move the calling thread into the netns at `path` (use in a child before exec)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd)
    finally:
        os.close(fd)


def create(name: str) -> Container:
    """Create a named netns with only `lo`, up (iproute2 layout)."""
    from pyroute2 import NetNS, netns as pr_netns

    check_netns_name(name)
    pr_netns.create(name)
    with NetNS(name) as ns:
        idx = ns.link_lookup(ifname="lo")[0]
        ns.link("set", index=idx, state="up")
    return by_name(name)


def remove(name: str) -> None:
    from pyroute2 import netns as pr_netns

    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        pass


# -- processes ----------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether the process runs (a zombie counts as dead: it will never clean up)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def pids_in_netns(ino: int) -> list[int]:
    """The processes whose netns has this inode."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}/ns/net").st_ino == ino:
                    pids.append(int(name))
            except OSError:
                continue
    return sorted(pids)


# -- who is on the other end of a unix socket ------------------------------------------------------
def ino_of_pidfd(pidfd: int) -> int:
    """Netns inode of the process behind a pidfd (e.g. from SO_PEERPIDFD: no pid-reuse race)."""
    try:
        nsfd = fcntl.ioctl(pidfd, PIDFD_GET_NET_NAMESPACE)
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise ProcessLookupError(errno.ESRCH, "process gone") from None
        raise
    try:
        return os.fstat(nsfd).st_ino
    finally:
        os.close(nsfd)


SO_NETNS_COOKIE = 71


def netns_cookie(sock: socket.socket) -> int:
    """The cookie of the netns a socket lives in: one getsockopt (SIOCGSKNS costs an fd)."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
