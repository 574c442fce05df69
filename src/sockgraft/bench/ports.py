"""Free ports on the host (the bench only ever listens on loopback or on its own links).

They come from below the kernel's ephemeral range (net.ipv4.ip_local_port_range), as a real
service's port does: a port of that range may be picked by any connect() (the churn cells make tens
of thousands) and then held in TIME_WAIT, where a later bind() without SO_REUSEADDR - the control
cells' bind - gets EADDRINUSE."""
from __future__ import annotations

import random
import socket

LOWEST = 10000  # below: the well-known and registered ports of real services


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    try:
        low, high = (int(x) for x in open(path).read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # the kernel's default


def candidates(low: int, high: int, rng: random.Random) -> list[int]:
    """Ports outside [low, high] and >= LOWEST, in random order (the wider side first)."""
    below, above = range(LOWEST, low), range(max(high + 1, LOWEST), 65536)
    side = below if len(below) >= len(above) else above
    return rng.sample(side, min(len(side), 200)) if len(side) else []


def free_port() -> int:
    """A port outside the ephemeral range, free for TCP and UDP on the host right now."""
    for port in candidates(*ephemeral_range(), random.Random()):
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("0.0.0.0", port))
            return port
        except OSError:
            continue
    raise OSError("no free port outside the ephemeral range")
