"""Asking the fd service: one connection per request, the socket comes back by SCM_RIGHTS."""
from __future__ import annotations

import errno
import os
import socket

from .protocol import MAX_MESSAGE, Reply, Request, parse_reply

ENV_SOCKET = "GRAFT_SOCKET"


def service_path(path: str | None = None) -> str:
    path = path or os.environ.get(ENV_SOCKET)
    if not path:
        raise OSError(errno.ENOENT, f"no fd service: {ENV_SOCKET} is not set (run under `graft run` or graftd)")
    return path


def ask(req: Request, path: str | None = None) -> tuple[Reply, int | None]:
    """Send one request; return the reply and the received fd (owned by the caller), if any.
    A denial raises OSError with the service's errno."""
    path = service_path(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
        except OSError as e:
            raise OSError(e.errno, f"fd service {path}: {e.strerror}") from None
        s.send(req.encode())
        data, fds, _flags, _ = socket.recv_fds(s, MAX_MESSAGE, 1)
    reply = parse_reply(data) if data else Reply("err", errno=errno.ECONNRESET, message="fd service closed the connection")
    fd = fds[0] if fds else None
    if reply.kind == "err":
        if fd is not None:
            os.close(fd)
        raise OSError(reply.errno, reply.message)
    return reply, fd
