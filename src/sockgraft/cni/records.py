"""What the graft CNI plugin wrote for a pod: STATE_DIR/cni/<container id>-<ifname>.json.

DEL undoes exactly a record; graft-runtime reads them to know that a pod's netns has its table
from CNI (its containers then join that table instead of replacing it)."""
from __future__ import annotations

import json
import os
import re

from sockgraft.host.paths import write_json

DIR = "cni"
_SAFE = re.compile(r"[^\w.-]")


def path(state: str, container_id: str, ifname: str) -> str:
    name = _SAFE.sub("_", f"{container_id}-{ifname}")[:200]
    return os.path.join(state, DIR, name + ".json")


def read(state: str, container_id: str, ifname: str) -> dict | None:
    try:
        with open(path(state, container_id, ifname)) as f:
            rec = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def write(state: str, rec: dict) -> None:
    p = path(state, rec["container_id"], rec["ifname"])
    os.makedirs(os.path.dirname(p), mode=0o700, exist_ok=True)
    write_json(p, rec)


def remove(state: str, container_id: str, ifname: str) -> None:
    try:
        os.unlink(path(state, container_id, ifname))
    except FileNotFoundError:
        pass


def all_records(state: str) -> list[dict]:
    d = os.path.join(state, DIR)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(".json"):
            try:
                with open(os.path.join(d, name)) as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def for_key(state: str, key: str, ino: int | None = None) -> list[dict]:
    """The records of the pod whose netns has this table key (and inode, when given)."""
    return [r for r in all_records(state) if r.get("key") == key and (ino is None or r.get("ino") == ino)]
