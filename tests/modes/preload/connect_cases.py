"""connect() as a program sees it, run natively on the host and inside a preload container (where
the fd service performs the connect and hands the socket over): the outcomes must be the same.

    python3 connect_cases.py LISTEN_PORT REFUSED_PORT BLACKHOLE_ADDR BLACKHOLE_PORT
    python3 connect_cases.py churn LISTEN_PORT N

Prints one JSON object: case -> outcome (errno names, booleans)."""
from __future__ import annotations

import errno
import json
import select
import socket
import struct
import sys


def name(code: int) -> str:
    return errno.errorcode.get(code, str(code)) if code else "0"


def attempt(fn) -> str:
    try:
        fn()
        return "0"
    except OSError as e:
        return name(e.errno)


def cases(listen: int, refused: int, hole: str, hole_port: int) -> dict:
    out = {}
    # blocking, to a listener: connected; then it cannot be bound again nor aimed elsewhere
    s = socket.socket()
    out["blocking"] = attempt(lambda: s.connect(("127.0.0.1", listen)))
    out["blocking peer"] = s.getpeername() == ("127.0.0.1", listen)
    out["rebind"] = attempt(lambda: s.bind(("127.0.0.1", 0)))
    out["reaim"] = attempt(lambda: s.connect(("127.0.0.1", refused)))
    s.close()
    # non-blocking: EINPROGRESS (or 0), writable, SO_ERROR 0, then EISCONN
    s = socket.socket()
    s.setblocking(False)
    code = s.connect_ex(("127.0.0.1", listen))
    out["nonblocking"] = "started" if code in (0, errno.EINPROGRESS) else name(code)
    out["nonblocking writable"] = bool(select.select([], [s], [], 5)[1])
    out["nonblocking so_error"] = name(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    out["nonblocking again"] = name(s.connect_ex(("127.0.0.1", listen)))
    s.close()
    # refused: blocking says so; non-blocking says EINPROGRESS and SO_ERROR says refused
    s = socket.socket()
    out["refused blocking"] = attempt(lambda: s.connect(("127.0.0.1", refused)))
    s.close()
    s = socket.socket()
    s.setblocking(False)
    out["refused nonblocking"] = name(s.connect_ex(("127.0.0.1", refused)))
    select.select([], [s], [], 5)
    out["refused so_error"] = name(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    s.close()
    # a blackhole: SO_SNDTIMEO bounds a blocking connect (EINPROGRESS, as the kernel says);
    # non-blocking stays in progress
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 300_000))
    out["timeout blocking"] = attempt(lambda: s.connect((hole, hole_port)))
    s.close()
    s = socket.socket()
    s.setblocking(False)
    out["timeout nonblocking"] = name(s.connect_ex((hole, hole_port)))
    out["timeout writable"] = bool(select.select([], [s], [], 0.3)[1])
    s.close()
    # UDP connect: immediate
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out["udp"] = attempt(lambda: u.connect(("127.0.0.1", refused)))
    out["udp rebind"] = attempt(lambda: u.bind(("127.0.0.1", 0)))
    u.close()
    return out


def churn(listen: int, n: int) -> dict:
    """n x (socket, connect, close), the client closing first (TIME_WAIT on the client side)."""
    errors: dict[str, int] = {}
    for _ in range(n):
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", listen))
        except OSError as e:
            errors[name(e.errno)] = errors.get(name(e.errno), 0) + 1
        s.close()
    return {"done": n, "errors": errors}


if __name__ == "__main__":
    if sys.argv[1] == "churn":
        print(json.dumps(churn(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        print(json.dumps(cases(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))
