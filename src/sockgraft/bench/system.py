"""How the bench touches the system: commands whose failure is a TopologyError, a watchdog for
netlink calls, and the one lock that serializes concurrent bench runs where they share state
(ip_forward, the choice of a free subnet)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess

LOCK_PATH = "/run/sockgraft-bench.lock"


class TopologyError(Exception):
    """A topology cannot be built or used safely."""


class ToolTimeout(TopologyError):
    """A tool did not finish in its time (its last output in the message)."""


def sh(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), capture_output=True, text=True, input=input)
    if check and p.returncode != 0:
        raise TopologyError(f"{' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


@contextlib.contextmanager
def locked():
    """Held by one bench process at a time (flock on LOCK_PATH)."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def alarm(seconds: int, what: str):
    """Never hang forever in a netlink call: SIGALRM turns into a TopologyError."""
    def fire(_s, _f):
        raise TopologyError(f"timed out after {seconds}s {what}")

    try:
        old = signal.signal(signal.SIGALRM, fire)
    except ValueError:  # not the main thread: no watchdog
        yield
        return
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
