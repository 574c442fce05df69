"""Helpers for tests: free loopback ports, the `graft` command and graftd as a user runs them, waiting,
stopping."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def free_port(addr: str = "127.0.0.1", sotype: int = socket.SOCK_STREAM) -> int:
    """A port that is free on the host right now for `addr` (loopback only), from outside the
    ephemeral range as the bench's (bench.ports: no connect's TIME_WAIT can hold it)."""
    from sockgraft.bench import ports

    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    for _ in range(20):
        port = ports.free_port()
        try:
            with socket.socket(family, sotype) as s:
                s.bind((addr, port))
            return port
        except OSError:
            continue
    raise OSError(f"no free port for {addr}")


def graft_cmd() -> list[str]:
    exe = shutil.which("graft")
    return [exe] if exe else [sys.executable, "-m", "sockgraft"]


def graft(*args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run the `graft` command line exactly as a user would."""
    p = subprocess.run([*graft_cmd(), *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"graft {' '.join(args)} -> {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def graftd_cmd() -> list[str]:
    exe = shutil.which("graftd")
    return [exe] if exe else [sys.executable, "-c", "from sockgraft.cmd.graftd import main; main()"]


def graftd(state_dir: str, runtime_dir: str, *args: str, log=None, ready: bool = True,
           timeout: float = 15) -> subprocess.Popen:
    """Start graftd as a user would, on `state_dir` and `runtime_dir` (more options in `args`).

    Its output (stderr: the audit lines it echoes, errors) goes to the file object `log`, or else to a
    pipe the caller reads after stopping it (`proc.stderr`). With `ready`, return once it serves:
    it writes RUNTIME_DIR/graftd.json, with its pid, after its first sync of the tables (and the
    OCI agent socket, unless --no-agent); if it exits first, fail with what it said."""
    out = {"stdout": log, "stderr": subprocess.STDOUT} if log is not None else {"stderr": subprocess.PIPE}
    proc = subprocess.Popen([*graftd_cmd(), "--state-dir", state_dir, "--runtime-dir", runtime_dir, *args],
                            text=True, **out)
    if ready:
        status = os.path.join(runtime_dir, "graftd.json")

        def serving() -> bool:
            if proc.poll() is not None:
                said = proc.stderr.read() if log is None else open(log.name).read()
                raise AssertionError(f"graftd exited {proc.returncode} before serving: {said}")
            try:
                with open(status) as f:
                    return json.load(f)["pid"] == proc.pid
            except (OSError, ValueError, KeyError):
                return False

        try:
            wait_for(serving, timeout, "graftd to serve")
        except BaseException:
            stop(proc)
            raise
    return proc


def wait_port(addr: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts on a host loopback address (never anything but loopback)."""
    assert addr.startswith("127.") or addr == "::1", f"refusing to probe non-loopback {addr}"
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    def accepts() -> bool:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect((addr, port))
                return True
        except OSError:
            return False

    wait_for(accepts, timeout, f"something to listen on {addr}:{port}")


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
