"""Asking the fd service. Each process keeps one connection (re-made after fork or when the service
restarted); the grafted socket comes back by SCM_RIGHTS."""
from __future__ import annotations

import errno
import os
import socket
import threading

from sockgraft.core.protocol import MAX_MESSAGE, Reply, Request, parse_reply

ENV_SOCKET = "GRAFT_SOCKET"

_lock = threading.Lock()
_conn: tuple[int, str, socket.socket] | None = None  # (pid, path, connection)


# os.environ's own bytes, where CPython keeps them (os._Environ._data): a lookup there costs ~0.1 µs,
# os.environ.get ~2 µs on this VM, which a pooled connect paid every time (its whole budget is ~10)
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.fsencode(ENV_SOCKET) if isinstance(_ENV_DATA, dict) and os.name == "posix" else None
_env_seen: tuple[object, str | None] = (object(), None)  # (the raw value last read, its text)


def _env_path() -> str | None:
    """os.environ.get(ENV_SOCKET), decoded once per value the variable takes."""
    global _env_seen
    if _ENV_KEY is None:
        return os.environ.get(ENV_SOCKET)
    raw = _ENV_DATA.get(_ENV_KEY)
    if raw is not _env_seen[0]:
        _env_seen = (raw, None if raw is None else os.fsdecode(raw))
    return _env_seen[1]


def service_path(path: str | None = None) -> str:
    path = path or _env_path()
    if not path:
        raise OSError(errno.ENOENT, f"no fd service: {ENV_SOCKET} is not set (run under `graft run` or graftd)")
    return path


def _connect(path: str) -> socket.socket:
    global _conn
    if _conn is not None and _conn[0] == os.getpid() and _conn[1] == path:
        return _conn[2]
    if _conn is not None:
        _conn[2].close()  # inherited over fork, or another service: our copy only
        _conn = None
    s = connection(path)
    _conn = (os.getpid(), path, s)
    return s


def connection(path: str) -> socket.socket:
    """A new connection to the fd service at `path` (close-on-exec)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        raise OSError(e.errno, f"fd service {path}: {e.strerror}") from None
    return s


def _drop() -> None:
    global _conn
    if _conn is not None:
        _conn[2].close()
        _conn = None


def _exchange(s: socket.socket, data: bytes, maxfds: int = 1) -> tuple[bytes, list[int]]:
    s.send(data)
    msg, fds = receive(s, maxfds)
    if not msg:
        raise ConnectionResetError(errno.ECONNRESET, "fd service closed the connection")
    return msg, fds


def receive(s: socket.socket, maxfds: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """One reply and the fds attached (up to `maxfds`), close-on-exec: never inherited by a child
    the program starts. An empty message means the service closed the connection."""
    msg, ancdata, _flags, _ = s.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(maxfds * 4), flags | socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(int.from_bytes(payload[i:i + 4], "little") for i in range(0, len(payload) - len(payload) % 4, 4))
    if not msg:
        for fd in fds:
            os.close(fd)
        fds = []
    return msg, fds


def ask(req: Request, path: str | None = None) -> tuple[Reply, int | None]:
    """Send one request; return the reply and the received fd (owned by the caller), if any.
    A denial raises OSError with the service's errno."""
    reply, fds = ask_fds(req, path, 1)
    return reply, fds[0] if fds else None


def ask_fds(req: Request, path: str | None = None, maxfds: int = 1) -> tuple[Reply, list[int]]:
    """`ask` for a reply that may carry up to `maxfds` fds (`pool`): all of them, owned by the caller."""
    path = service_path(path)
    data = req.encode()
    with _lock:
        try:
            msg, fds = _exchange(_connect(path), data, maxfds)
        except (BrokenPipeError, ConnectionResetError):
            _drop()  # the service restarted: one new connection, one more try
            try:
                msg, fds = _exchange(_connect(path), data, maxfds)
            except (BrokenPipeError, ConnectionResetError) as e:
                _drop()
                raise OSError(e.errno, f"fd service {path}: {e.strerror}") from None
    try:
        reply = parse_reply(msg)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if reply.kind == "err":
        for fd in fds:
            os.close(fd)
        raise OSError(reply.errno, reply.message)
    return reply, fds
