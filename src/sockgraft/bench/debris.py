"""What the bench leaves on the machine, and sweeping what killed runs left.

Every object the bench creates carries the name prefix ``sgb<PID>`` (netns, links, nft table, temp
dirs, the rootless topologies' users) and every process it starts carries ``SGB_OWNER=<PID>`` in its
environment, where PID is the bench process. `sweep()` removes what a killed earlier run left behind: objects whose owner pid is
dead; it also drops dead owners of ip_forward, nf_conntrack_max and /dev/net/tun's mode (restoring
their values when none is left)."""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import tempfile

from sockgraft.bench.sysctl import conntrack_update, forward_update, time_wait_update, tun_update
from sockgraft.bench.system import sh
from sockgraft.bench.users import remove_user
from sockgraft.host import netns as sg_netns
from sockgraft.host.netns import pid_alive

PREFIX = "sgb"
OWNER_ENV = "SGB_OWNER"


def tag(pid: int | None = None) -> str:
    """The name prefix of what bench process `pid` (default: this one) creates."""
    return f"{PREFIX}{os.getpid() if pid is None else pid}"


def owner_of(name: str) -> int | None:
    m = re.match(rf"^{PREFIX}(\d+)", name)
    return int(m.group(1)) if m else None


def _proc_owner(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(OWNER_ENV.encode() + b"="):
            try:
                return int(item.split(b"=", 1)[1])
            except ValueError:
                return None
    return None


def owned_processes(owner: int) -> list[int]:
    """Processes started by bench process `owner` (this process excluded)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _proc_owner(int(entry)) == owner:
            pids.append(int(entry))
    return pids


def debris(owner_alive=pid_alive) -> dict[str, list]:
    """What earlier runs whose owner is dead left behind (or, with owner_alive=lambda p: False and a
    filter by the caller, what any run left)."""
    found: dict[str, list] = {"processes": [], "netns": [], "links": [], "nft": [], "dirs": [], "users": []}
    found["users"] = [u.pw_name for u in pwd.getpwall() if (o := owner_of(u.pw_name)) and not owner_alive(o)]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            owner = _proc_owner(int(entry))
            if owner is not None and owner != os.getpid() and not owner_alive(owner):
                found["processes"].append(int(entry))
    with contextlib.suppress(FileNotFoundError):
        found["netns"] = [n for n in os.listdir("/run/netns") if (o := owner_of(n)) and not owner_alive(o)]
    for link in json.loads(sh("ip", "-j", "link", "show").stdout or "[]"):
        o = owner_of(link["ifname"])
        if o and not owner_alive(o):
            found["links"].append(link["ifname"])
    tables = json.loads(sh("nft", "-j", "list", "tables").stdout or '{"nftables": []}')["nftables"]
    for t in tables:
        if "table" in t and (o := owner_of(t["table"]["name"])) and not owner_alive(o):
            found["nft"].append((t["table"]["family"], t["table"]["name"]))
    tmp = tempfile.gettempdir()
    for d in os.listdir(tmp):
        if (o := owner_of(d)) and not owner_alive(o) and os.path.isdir(os.path.join(tmp, d)):
            found["dirs"].append(os.path.join(tmp, d))
    return found


def sweep() -> dict[str, list]:
    """Remove the debris of killed earlier runs (owner pid dead); returns what was removed."""
    found = debris()
    for pid in found["processes"]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in found["netns"]:
        sg_netns.remove(name)
    for name in found["links"]:
        sh("ip", "link", "del", name, check=False)
    for family, name in found["nft"]:
        sh("nft", "delete", "table", family, name, check=False)
    for d in found["dirs"]:
        shutil.rmtree(d, ignore_errors=True)
    for name in found["users"]:  # the rootless topologies' users, with their processes and dirs
        remove_user(name)
    from sockgraft.host import egress  # egress tables (host/egress.py) of state dirs now gone
    egress.sweep()
    forward_update()  # drops dead owners, restores the original value if none is left
    conntrack_update()  # the same for nf_conntrack_max
    time_wait_update()  # and tcp_max_tw_buckets
    tun_update()  # and /dev/net/tun's mode
    return found
