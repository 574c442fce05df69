"""The one audit log: every decision of every mode, as JSON lines, bounded.

- Denials, failures and events (start, agent, ...) are one line each.
- Grants and local decisions are aggregated per (event, container, mode, operation, endpoint) and
  per interval (`GRAFT_AUDIT_INTERVAL`, default 1 s): the first of an interval is a line at once
  (`count: 1`); the repeats are one line when the interval ends (`count: N`, `repeats: true`, `until`,
  with the fields of the interval's first). Summing `count` gives every decision; a connection per request
  costs a counter increment, not a line. The metrics (graftd --metrics) count every decision.
- The log rotates: past `GRAFT_AUDIT_MAX_BYTES` (default 16 MiB) `audit.log` becomes `audit.log.1`
  (`.1` becomes `.2`, ... up to `GRAFT_AUDIT_KEEP` files, default 4), so it never holds more than
  (KEEP + 1) × MAX_BYTES. Several processes append to it (O_APPEND: lines never interleave); a lock
  file serializes the rotation.

Nothing is written on the hot path: services set `deferred` and call `flush()` when idle.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time

from sockgraft.host.paths import state_dir

AUDIT_NAME = "audit.log"
AGGREGATED = ("grant", "local")
_encode = json.JSONEncoder(separators=(",", ":")).encode


def _env_number(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class Audit:
    """With `deferred`, records wait in memory until `flush()`: a service replies first and writes
    its log lines when it is idle, so logging costs the caller nothing."""

    def __init__(self, directory: str | None = None, echo: bool = False, deferred: bool = False,
                 max_bytes: int | None = None, keep: int | None = None, interval: float | None = None):
        self.path = os.path.join(state_dir(directory), AUDIT_NAME)
        self.echo = echo
        self.deferred = deferred
        self.max_bytes = int(max_bytes if max_bytes is not None else _env_number("GRAFT_AUDIT_MAX_BYTES", 16 << 20))
        self.keep = max(1, int(keep if keep is not None else _env_number("GRAFT_AUDIT_KEEP", 4)))
        self.interval = interval if interval is not None else _env_number("GRAFT_AUDIT_INTERVAL", 1.0)
        self._pending: list[dict] = []
        self._counts: dict[tuple, dict] = {}  # aggregated grants/locals of the current interval
        self._window = time.monotonic()
        self._fd: int | None = None

    def _open(self) -> int | None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                return None
        return self._fd

    def record(self, event: str, count: int = 1, **fields) -> None:
        """One event, or `count` alike (an aggregated kind: counted as that many; another kind: one
        line that says the count)."""
        now = round(time.time(), 6)
        if event in AGGREGATED:
            key = (event, fields.get("container"), fields.get("mode"), fields.get("op"), fields.get("endpoint"))
            agg = self._counts.get(key)
            if agg is not None:  # seen in this interval: counted, written when the interval ends
                agg["count"] += count
                agg["until"] = now
                return
            self._counts[key] = {"ts": now, "event": event, **fields, "count": count - 1, "repeats": True}
            if count > 1:
                self._counts[key]["until"] = now
            fields["count"] = 1
        elif count != 1:
            fields["count"] = count
        self._pending.append({"ts": now, "event": event, **fields})
        if not self.deferred:
            self.flush()

    def flush(self, force: bool = False) -> None:
        """Write what is pending; the interval's repeats once it is over (or when forced)."""
        out, self._pending = self._pending, []  # atomic swap: other threads may be recording
        if self._counts and (force or time.monotonic() - self._window >= self.interval):
            counts, self._counts = self._counts, {}
            self._window = time.monotonic()
            out += [agg for agg in counts.values() if agg["count"]]
        if not out:
            return
        data = "".join(_encode(r) + "\n" for r in out)
        fd = self._open()
        if fd is not None:
            try:
                os.write(fd, data.encode())
                if os.fstat(fd).st_size > self.max_bytes:
                    self._rotate()
            except OSError:
                pass  # a full or read-only disk must not stop grafting; the echo still reports
        if self.echo:
            sys.stderr.write(data)
            sys.stderr.flush()

    def _rotate(self) -> None:
        """audit.log -> .1 -> .2 ... (the oldest beyond `keep` dropped), under a lock; a writer that
        finds the file already rotated by someone else just reopens."""
        lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_ino == os.fstat(self._fd).st_ino and st.st_size > self.max_bytes:
                for i in range(self.keep, 0, -1):
                    src = self.path if i == 1 else f"{self.path}.{i - 1}"
                    try:
                        os.replace(src, f"{self.path}.{i}")
                    except FileNotFoundError:
                        pass
        finally:
            os.close(lock)
        os.close(self._fd)
        self._fd = None

    def decision(self, container: str, mode: str, op: str, decision, count: int = 1, **fields) -> None:
        ep = decision.endpoint.name if decision.endpoint else None
        self.record(decision.verdict, count, container=container, mode=mode, op=op, endpoint=ep,
                    errno=decision.errno or None, reason=decision.reason, **fields)

    def close(self) -> None:
        self.flush(force=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
