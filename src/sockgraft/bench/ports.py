"""Free ports on the host (the bench only ever listens on loopback or on its own links)."""
from __future__ import annotations

import socket


def free_port(sotype: int = socket.SOCK_STREAM) -> int:
    """A port free for TCP and UDP on the host right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, sotype) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if sotype == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("0.0.0.0", port))
            return port
        except OSError:
            continue
    raise OSError("no free port")
