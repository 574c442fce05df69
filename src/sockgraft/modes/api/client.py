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


def service_path(path: str | None = None) -> str:
    path = path or os.environ.get(ENV_SOCKET)
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
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        raise OSError(e.errno, f"fd service {path}: {e.strerror}") from None
    _conn = (os.getpid(), path, s)
    return s


def _drop() -> None:
    global _conn
    if _conn is not None:
        _conn[2].close()
        _conn = None


def _exchange(s: socket.socket, data: bytes) -> tuple[bytes, list[int]]:
    s.send(data)
    msg, fds, _flags, _ = socket.recv_fds(s, MAX_MESSAGE, 1)
    if not msg:
        raise ConnectionResetError(errno.ECONNRESET, "fd service closed the connection")
    return msg, fds


def ask(req: Request, path: str | None = None) -> tuple[Reply, int | None]:
    """Send one request; return the reply and the received fd (owned by the caller), if any.
    A denial raises OSError with the service's errno."""
    path = service_path(path)
    data = req.encode()
    with _lock:
        try:
            msg, fds = _exchange(_connect(path), data)
        except (BrokenPipeError, ConnectionResetError):
            _drop()  # the service restarted: one new connection, one more try
            try:
                msg, fds = _exchange(_connect(path), data)
            except (BrokenPipeError, ConnectionResetError) as e:
                _drop()
                raise OSError(e.errno, f"fd service {path}: {e.strerror}") from None
    reply = parse_reply(msg)
    fd = fds[0] if fds else None
    if reply.kind == "err":
        if fd is not None:
            os.close(fd)
        raise OSError(reply.errno, reply.message)
    return reply, fd
