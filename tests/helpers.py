"""Helpers for tests: free loopback ports, the `graft` command as a user runs it, waiting, stopping."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def free_port(addr: str = "127.0.0.1", sotype: int = socket.SOCK_STREAM) -> int:
    """A port that is free on the host right now (loopback only)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, sotype) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def graft_cmd() -> list[str]:
    exe = shutil.which("graft")
    return [exe] if exe else [sys.executable, "-m", "sockgraft"]


def graft(*args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run the `graft` command line exactly as a user would."""
    p = subprocess.run([*graft_cmd(), *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"graft {' '.join(args)} -> {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def wait_port(addr: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts on a host loopback address (never anything but loopback)."""
    assert addr.startswith("127.") or addr == "::1", f"refusing to probe non-loopback {addr}"
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect((addr, port))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {addr}:{port} after {timeout}s")
            time.sleep(0.05)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process this test started (by its pid), escalating to SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    """Poll `pred` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]
