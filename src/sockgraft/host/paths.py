"""Where sockgraft keeps things on the host: the state dir (tables, audit log) and the runtime dir
(sockets, graftd's status)."""
from __future__ import annotations

import hashlib
import os

STATE_DIR = "/var/lib/sockgraft"
RUNTIME_DIR = "/run/sockgraft"
AGENT_SOCKET = os.path.join(RUNTIME_DIR, "agent.sock")


def state_dir(explicit: str | None = None) -> str:
    return explicit or os.environ.get("GRAFT_STATE_DIR") or STATE_DIR


def fd_socket_path(runtime_dir: str, key: str) -> str:
    """graftd's fd-service socket for one container."""
    path = os.path.join(runtime_dir, "fd", key.replace("/", "_") + ".sock")
    if len(path.encode()) > 107:  # sun_path: a long key gets a short, stable name
        path = os.path.join(runtime_dir, "fd", "h-" + hashlib.sha256(key.encode()).hexdigest()[:24] + ".sock")
    return path
