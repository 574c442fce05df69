"""A command run in the foreground: the signals a shell would give it are passed on, and its exit
status comes back the shell's way (128+N when it died of signal N)."""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def python(*args: str) -> list[str]:
    """The command line of this interpreter running `args` (`-m MODULE ...`, `-c CODE ...`) with
    nothing of the directory it starts in on sys.path (`-P`): a json.py or numbers.py there is never
    imported, least of all by a daemon of root's started from someone's directory."""
    return [sys.executable, "-P", *args]


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


@contextlib.contextmanager
def _handling(handler):
    """While inside, `handler` takes FORWARDED_SIGNALS; the old handlers come back."""
    old = {sig: signal.getsignal(sig) for sig in FORWARDED_SIGNALS}
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def forwarding_signals(proc: subprocess.Popen):
    """While inside, FORWARDED_SIGNALS sent to this process go to `proc`."""
    with _handling(lambda s, _f: proc.send_signal(s)):
        yield


def wait_forwarding(proc: subprocess.Popen) -> int:
    """Wait for `proc`, passing signals on; its exit status (EINTR is retried by Python, PEP 475)."""
    with forwarding_signals(proc):
        return exit_status(proc.wait())


@contextlib.contextmanager
def holding_signals():
    """While inside, FORWARDED_SIGNALS sent to this process are held (the list yielded, in order of
    arrival) instead of killing it before it has cleaned up: for wait_container to pass on to the
    command, or for the caller to give up before starting it."""
    held: list[int] = []
    with _handling(lambda s, _f: held.append(s)):
        yield held


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans among our descendants (a daemon's double fork) become our children, not init's."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def wait_container(proc: subprocess.Popen, others, held: list[int] | tuple = ()) -> int:
    """Wait for `proc` (the foreground command) AND every descendant left after it (a daemon that
    forked away: this process must be a subreaper), passing signals on: to `proc` while it runs,
    then to `others()` (the container's remaining pids). A stop asked while `proc` ran (SIGTERM,
    SIGINT, SIGHUP, SIGQUIT) goes on to the remaining pids when `proc` exits, as a container's
    processes go with its first one: `sh -c 'daemon; sleep 60'` stopped is stopped whole, not left
    with its orphaned `sleep`. Returns `proc`'s exit status the shell's way. Reaps with
    waitpid(-1): call it only where no other thread waits for children of its own."""
    import os

    status: int | None = None
    stop: int | None = None  # a stopping signal received while `proc` ran

    def to_others(sig: int) -> None:
        for pid in others():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def forward(sig, _frame):
        nonlocal stop
        if status is None:
            if sig in STOPPING_SIGNALS:
                stop = sig
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
            return
        to_others(sig)

    with _handling(forward):
        for sig in held:
            forward(sig, None)
        while True:
            try:
                pid, st = os.waitpid(-1, 0)  # EINTR is retried by Python (PEP 475)
            except ChildProcessError:
                break
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(st)
                status = exit_status(proc.returncode)
                if stop is not None:
                    to_others(stop)
        if status is None:  # someone else reaped it (cannot happen here): ask Popen
            status = exit_status(proc.wait())
        return status
