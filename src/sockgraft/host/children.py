"""A command run in the foreground: the signals a shell would give it are passed on, and its exit
status comes back the shell's way (128+N when it died of signal N)."""
from __future__ import annotations

import contextlib
import signal
import subprocess

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


@contextlib.contextmanager
def forwarding_signals(proc: subprocess.Popen):
    """While inside, FORWARDED_SIGNALS sent to this process go to `proc`; the old handlers come back."""
    old = {sig: signal.getsignal(sig) for sig in FORWARDED_SIGNALS}
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def wait_forwarding(proc: subprocess.Popen) -> int:
    """Wait for `proc`, passing signals on; its exit status (EINTR is retried by Python, PEP 475)."""
    with forwarding_signals(proc):
        return exit_status(proc.wait())
