"""Host settings the bench changes for its duration, shared by concurrent bench runs: set while any
run needs them, restored to the value found before the first owner by the last one.

- `ip_forward` = 1 (the nat topologies);
- `nf_conntrack_max` raised to at least CONNTRACK_MAX (the nat topologies: their NAT table turns
  connection tracking on for the whole host netns, and the churn / `Connection: close` cells leave a
  TIME_WAIT entry per connection for 120 s, which filled the default 262,144 and made the kernel
  drop new packets, "nf_conntrack: table full", spoiling later cells);
- `tcp_max_tw_buckets` raised to at least TIME_WAIT_MAX (every run): the churn and `Connection:
  close` cells leave a TIME_WAIT socket per connection for 60 s, and once the host's table is full
  (131,072 here) the kernel closes sockets without one (`TCPTimeWaitOverflow`), which makes connect
  and close cheaper: a cell then ran 2-6x faster than the same cell with room (the churn cells were
  bimodal, by what the cells before them had left). With room, every cell pays TIME_WAIT as a
  client does (~180 MB of kernel memory at the quick profile's peak);
- `/dev/net/tun` opened to every user (mode 0666, as a stock Debian has it; 0600 on this VM) for
  the rootless slirp4netns and pasta topologies, whose user-mode networks need a tap device.

The owners (bench pids) and the original value are kept in a state file per setting, updated under
the bench lock; owners whose process is dead are dropped at every update (and by `debris.sweep`),
so a killed run's value is restored by the next run. nf_conntrack_max goes back only once the
entries fit under it again (else the next run's sweep puts it back). `conntrack_stats` reads the
kernel's counters of what a full table cost (reported per cell by the runner)."""
from __future__ import annotations

import json
import os

from sockgraft.bench.system import locked
from sockgraft.host.netns import pid_alive

FORWARD_PATH = "/proc/sys/net/ipv4/ip_forward"
FORWARD_STATE = "/run/sockgraft-bench.ip_forward.json"
CONNTRACK_MAX_PATH = "/proc/sys/net/netfilter/nf_conntrack_max"
CONNTRACK_COUNT_PATH = "/proc/sys/net/netfilter/nf_conntrack_count"
CONNTRACK_STATE = "/run/sockgraft-bench.nf_conntrack_max.json"
CONNTRACK_STAT_PATH = "/proc/net/stat/nf_conntrack"
CONNTRACK_MAX = 2_097_152  # 8x the default here: the full profile's churn leaves ~1M TIME_WAIT entries
TIME_WAIT_PATH = "/proc/sys/net/ipv4/tcp_max_tw_buckets"
TIME_WAIT_STATE = "/run/sockgraft-bench.tcp_max_tw_buckets.json"
TIME_WAIT_MAX = 2_097_152  # 60 s of connections at ~35k/s


class Shared:
    """One sysctl set to `want(original)` while it has owners; put back when the last one goes and
    `can_restore(original)` says it may (else at a later update: debris.sweep makes one)."""

    def __init__(self, path: str, state_path: str, want, can_restore=lambda original: True):
        self.path, self.state_path, self.want, self.can_restore = path, state_path, want, can_restore

    def read(self) -> str:
        with open(self.path) as f:
            return f.read().strip()

    def _write(self, value: str) -> None:
        with open(self.path, "w") as f:
            f.write(value)

    def owners(self) -> list[int]:
        """The bench pids that currently hold the setting (dead ones included until the next update)."""
        try:
            with open(self.state_path) as f:
                return json.load(f)["owners"]
        except (FileNotFoundError, ValueError, KeyError):
            return []

    def original(self) -> str | None:
        """The value found before the first current owner (None: no owner)."""
        try:
            with open(self.state_path) as f:
                return json.load(f)["original"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def update(self, add: int | None = None, remove: int | None = None) -> None:
        """Add or remove an owner; with neither, only drop dead owners."""
        with locked():
            try:
                with open(self.state_path) as f:
                    state = json.load(f)
            except (FileNotFoundError, ValueError):
                state = None
            if state is None:
                if add is None:
                    return
                state = {"original": self.read(), "owners": []}
            owners = [p for p in state["owners"] if pid_alive(p) and p != remove]
            if add is not None and add not in owners:
                owners.append(add)
            if owners or not self.can_restore(state["original"]):
                state["owners"] = owners
                with open(self.state_path, "w") as f:
                    json.dump(state, f)
                if owners:
                    self._write(self.want(state["original"]))
            else:
                self._write(state["original"])
                os.unlink(self.state_path)


class SharedMode(Shared):
    """A device node's permission bits (octal text) instead of a sysctl's value."""

    def read(self) -> str:
        return f"{os.stat(self.path).st_mode & 0o7777:o}"

    def _write(self, value: str) -> None:
        os.chmod(self.path, int(value, 8))


FORWARD = Shared(FORWARD_PATH, FORWARD_STATE, lambda original: "1")
def _drained(original: str) -> bool:
    """Whether the table's entries fit under the original limit again (TIME_WAIT entries live 120 s:
    lowering the limit below the count would make the kernel drop new packets of whoever still
    tracks connections)."""
    try:
        with open(CONNTRACK_COUNT_PATH) as f:
            return int(f.read()) <= int(original)
    except (OSError, ValueError):
        return True


CONNTRACK = Shared(CONNTRACK_MAX_PATH, CONNTRACK_STATE, lambda original: str(max(int(original), CONNTRACK_MAX)),
                   _drained)


def read_forward() -> str:
    return FORWARD.read()


def forward_owners() -> list[int]:
    return FORWARD.owners()


def forward_update(add: int | None = None, remove: int | None = None) -> None:
    """Add or remove an owner of ip_forward=1; with neither, only drop dead owners."""
    FORWARD.update(add, remove)


def conntrack_update(add: int | None = None, remove: int | None = None) -> None:
    """Add or remove an owner of the raised nf_conntrack_max (nothing when conntrack is not loaded)."""
    if os.path.exists(CONNTRACK_MAX_PATH) or os.path.exists(CONNTRACK_STATE):
        CONNTRACK.update(add, remove)


TIME_WAIT = Shared(TIME_WAIT_PATH, TIME_WAIT_STATE, lambda original: str(max(int(original), TIME_WAIT_MAX)))


def time_wait_update(add: int | None = None, remove: int | None = None) -> None:
    """Add or remove an owner of the raised tcp_max_tw_buckets."""
    if os.path.exists(TIME_WAIT_PATH) or os.path.exists(TIME_WAIT_STATE):
        TIME_WAIT.update(add, remove)


def time_wait_overflows() -> int | None:
    """The host netns's TcpExt TCPTimeWaitOverflow counter: sockets closed without TIME_WAIT
    because the table was full (None: unreadable)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            if names.startswith("TcpExt:"):
                return int(dict(zip(names.split()[1:], values.split()[1:]))["TCPTimeWaitOverflow"])
    except (OSError, ValueError, KeyError):
        pass
    return None


TUN = SharedMode("/dev/net/tun", "/run/sockgraft-bench.tun_mode.json", lambda original: f"{int(original, 8) | 0o666:o}")


def tun_update(add: int | None = None, remove: int | None = None) -> None:
    """Add or remove an owner of /dev/net/tun opened to every user (nothing when there is no tun)."""
    if os.path.exists(TUN.path):
        TUN.update(add, remove)


def conntrack_stats() -> dict[str, int]:
    """This netns's conntrack now: entries, the limit, and the counters a full table moves (summed
    over CPUs): `drop` (a new packet dropped: "table full" in dmesg), `early_drop` (an entry evicted
    to make room), `insert_failed`. Empty when conntrack is not loaded."""
    out: dict[str, int] = {}
    try:
        with open(CONNTRACK_STAT_PATH) as f:
            head, *rows = f.read().split("\n")
        names = head.split()
        for row in filter(None, (r.split() for r in rows)):
            for name, value in zip(names, row):
                if name in ("drop", "early_drop", "insert_failed"):
                    out[name] = out.get(name, 0) + int(value, 16)
        for key, path in (("count", CONNTRACK_COUNT_PATH), ("max", CONNTRACK_MAX_PATH)):
            with open(path) as f:
                out[key] = int(f.read())
    except (OSError, ValueError):
        return {}
    return out
