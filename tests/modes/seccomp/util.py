"""Helpers for seccomp mode tests: `graft run --mode seccomp` as a user runs it."""
from __future__ import annotations

import os
import subprocess

from tests.helpers import fd_count, graft, graft_cmd, wait_for  # noqa: F401  (the seccomp tests' helpers)


MAX_LIFE = 300  # seconds


def run_args(ns: str, cmd: list[str], endpoints=(), ingress=(), egress=()) -> list[str]:
    """`graft run --mode seccomp` arguments (after the program name)."""
    args = ["run", "-n", ns, "--mode", "seccomp"]
    for opt, values in (("--endpoint", endpoints), ("--ingress", ingress), ("--egress", egress)):
        for v in values:
            args += [opt, v]
    return [*args, "--", *cmd]


def start(procs: list, ns: str, cmd: list[str], **kw) -> subprocess.Popen:
    """A long-running command in the container (stopped at teardown through `procs`)."""
    # `timeout`: a server outlives nothing, even if this test run is killed before its teardown
    p = subprocess.Popen([*graft_cmd(), *run_args(ns, ["timeout", str(MAX_LIFE), *cmd], **kw)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    procs.append(p)
    return p


def run(ns: str, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return graft(*run_args(ns, cmd, **kw), check=check, timeout=timeout)


def client_egress(port_dynamic_name: str = "out") -> dict:
    """Endpoint + egress rule for a container client dialing host loopback."""
    return {"endpoints": [f"{port_dynamic_name} type ipv4 addr 127.0.0.1 port dynamic"],
            "egress": [f"127.0.0.0/8={port_dynamic_name}"]}


def refused(port: int, addr: str = "127.0.0.1") -> bool:
    """Nothing listens on host addr:port (loopback only)."""
    import socket

    assert addr.startswith("127.")
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((addr, port)) != 0


def fd_targets(pid: int) -> list[str]:
    """What a process's fds point to, sorted (the audit log is opened on first use: left out)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if not target.endswith("/audit.log"):
            out.append(target.split(":[")[0])  # socket:[ino] -> socket: count kinds, not inodes
    return sorted(out)
