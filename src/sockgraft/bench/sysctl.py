"""ip_forward, shared by concurrent bench runs: set to 1 while any run needs it (the nat
topologies), restored to the value found before the first owner by the last one.

The owners (bench pids) and that original value are kept in FORWARD_STATE, updated under the bench
lock; owners whose process is dead are dropped at every update (and by `debris.sweep`)."""
from __future__ import annotations

import json
import os

from sockgraft.bench.system import locked
from sockgraft.host.netns import pid_alive

FORWARD_PATH = "/proc/sys/net/ipv4/ip_forward"
FORWARD_STATE = "/run/sockgraft-bench.ip_forward.json"


def read_forward() -> str:
    with open(FORWARD_PATH) as f:
        return f.read().strip()


def _write_forward(value: str) -> None:
    with open(FORWARD_PATH, "w") as f:
        f.write(value)


def forward_owners() -> list[int]:
    """The bench pids that currently hold ip_forward=1 (dead ones included until the next update)."""
    try:
        with open(FORWARD_STATE) as f:
            return json.load(f)["owners"]
    except (FileNotFoundError, ValueError, KeyError):
        return []


def forward_update(add: int | None = None, remove: int | None = None) -> None:
    """Add or remove an owner of ip_forward=1; with neither, only drop dead owners."""
    with locked():
        try:
            with open(FORWARD_STATE) as f:
                state = json.load(f)
        except (FileNotFoundError, ValueError):
            state = None
        if state is None:
            if add is None:
                return
            state = {"original": read_forward(), "owners": []}
        owners = [p for p in state["owners"] if pid_alive(p) and p != remove]
        if add is not None and add not in owners:
            owners.append(add)
        if owners:
            state["owners"] = owners
            with open(FORWARD_STATE, "w") as f:
                json.dump(state, f)
            _write_forward("1")
        else:
            _write_forward(state["original"])
            os.unlink(FORWARD_STATE)
