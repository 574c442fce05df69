"""The one audit log: every grant, denial and local decision of every mode, one JSON line each.

Lines are appended to `STATE_DIR/audit.log` (O_APPEND: concurrent writers do not interleave) and,
when a daemon asks for it, echoed to stderr.
"""
from __future__ import annotations

import json
import os
import sys
import time

from sockgraft.host.paths import state_dir

AUDIT_NAME = "audit.log"
_encode = json.JSONEncoder(separators=(",", ":")).encode


class Audit:
    """With `deferred`, records wait in memory until `flush()`: a service replies first and writes
    its log lines when it is idle, so logging costs the caller nothing."""

    def __init__(self, directory: str | None = None, echo: bool = False, deferred: bool = False):
        self.path = os.path.join(state_dir(directory), AUDIT_NAME)
        self.echo = echo
        self.deferred = deferred
        self._pending: list[dict] = []
        self._fd: int | None = None

    def _open(self) -> int | None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                return None
        return self._fd

    def record(self, event: str, **fields) -> None:
        self._pending.append({"ts": round(time.time(), 6), "event": event, **fields})
        if not self.deferred:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []  # atomic swap: other threads may be recording
        line = "".join(_encode(r) + "\n" for r in pending)
        fd = self._open()
        if fd is not None:
            try:
                os.write(fd, line.encode())
            except OSError:
                pass  # a full or read-only disk must not stop grafting; the echo still reports
        if self.echo:
            sys.stderr.write(line)
            sys.stderr.flush()

    def decision(self, container: str, mode: str, op: str, decision, **fields) -> None:
        ep = decision.endpoint.name if decision.endpoint else None
        self.record(decision.verdict, container=container, mode=mode, op=op, endpoint=ep,
                    errno=decision.errno or None, reason=decision.reason, **fields)

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
