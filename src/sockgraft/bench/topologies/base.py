"""The abstract topology: where `graft bench` runs a server and a client, and what it starts there.

Sides: ``host`` is the host netns; ``c1`` and ``c2`` are two containers. A topology starts a
command on a side (`popen`, `run`) and tells a client where a server on another side is reached
(`listen`, `target`); before any client starts, `check_route` refuses a destination that is not
loopback or one of the topology's own links. Every process it starts carries the bench's owner
mark (debris.OWNER_ENV) and dies with the bench (parent-death signal)."""
from __future__ import annotations

import abc
import contextlib
import ipaddress
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass

from sockgraft.bench.debris import OWNER_ENV
from sockgraft.bench.system import ToolTimeout, TopologyError

SIDES = ("host", "c1", "c2")


def pdeathsig() -> None:
    """In a child before exec: die with the bench (PR_SET_PDEATHSIG SIGKILL)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a process we started, and its process group (it leads a session of its own)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def last_output(out: str | None, err: str | None) -> str:
    """What a tool that timed out printed last (stderr first), for the error: "; last output: ..."."""
    lines = ((err or "").strip() or (out or "").strip()).splitlines()
    return f"; last output: {' | '.join(lines[-2:])}" if lines else "; no output"


def loopback_only(addr: str, topology: str) -> None:
    if not ipaddress.ip_address(addr).is_loopback:
        raise TopologyError(f"refusing non-loopback destination {addr} in topology {topology}")


@dataclass
class Listener:
    """Where a server on `side` listens inside its own view (bind address, port)."""

    side: str
    bind: str
    port: int


class Topology(abc.ABC):
    """What every topology shares: starting, running and stopping processes on a side. Subclasses
    say where servers listen and clients connect, and may build something in `setup`."""

    name: str
    kind: str
    graft_api = False  # peers written in Python use sockgraft's API in this topology
    binaries = True  # unmodified binaries can run here
    mtu: int | None = None  # MTU on the data path
    default = True  # measured when `graft bench` is given no --topologies
    quick = True  # ... and by `graft bench --quick` then too

    def __init__(self, state_dir: str | None = None):
        self.procs: list[subprocess.Popen] = []
        self.state_dir = state_dir

    # lifecycle
    def unavailable(self) -> str | None:
        """Why this topology cannot run on this machine, or None."""
        return None

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        for p in self.procs:
            stop(p)
        self.procs.clear()

    def na(self, workload_kind: str) -> str | None:
        """Why a workload kind makes no sense here, or None ("python-peer": a workload of any kind that
        runs one of the bench's Python peers)."""
        return None

    def na_direction(self, direction: str) -> str | None:
        """Why a direction (base.DIRECTIONS) is not built here, or None."""
        return None

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the report: how this topology is built."""

    # addressing
    @abc.abstractmethod
    def listen(self, side: str, port: int) -> Listener:
        """Where a server on `side` binds to serve `port`."""

    @abc.abstractmethod
    def target(self, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
        """Where a client on `client_side` reaches `listener`."""

    @abc.abstractmethod
    def check_route(self, client_side: str, addr: str) -> None:
        """Raise TopologyError unless `addr` is loopback or reached over this topology's own links."""

    def client_port(self, side: str) -> int:
        """A port a client on `side` may bind (the control-path bind benchmark)."""
        from sockgraft.bench.ports import free_port

        return free_port()

    # processes
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[OWNER_ENV] = str(os.getpid())
        return env

    def command(self, side: str, cmd: list[str], ports: list[int]) -> list[str]:
        """The command line that runs `cmd` on `side` (serving `ports`)."""
        return cmd

    def preexec(self, side: str):
        return pdeathsig

    def popen(self, side: str, cmd: list[str], ports: list[int] = (), **kw) -> subprocess.Popen:
        full = self.command(side, list(cmd), list(ports))
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(full, env=self.env(), preexec_fn=self.preexec(side), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def run(self, side: str, cmd: list[str], ports: list[int] = (), timeout: float = 120, stderr: bool = False) -> str:
        """Run a client to completion; its stdout (and stderr after it, with stderr=True); raises on failure."""
        p = self.popen(side, cmd, ports, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        timed_out = False
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(p)
            out, err = p.communicate()
            timed_out = True
        finally:
            with contextlib.suppress(ValueError):
                self.procs.remove(p)
        return self.settle(side, cmd, timeout, timed_out, p.returncode, out, err, stderr)

    def settle(self, side: str, cmd: list[str], timeout: float, timed_out: bool, rc: int, out: str, err: str,
               stderr: bool) -> str:
        """What `run` returns for a client that ended so (wherever it ran), or the error it raises."""
        if timed_out:
            raise ToolTimeout(f"{shlex.join(cmd)} timed out after {timeout}s in {self.name}/{side}{last_output(out, err)}")
        if rc != 0:
            last = (err or out).strip().splitlines()[-3:]
            raise TopologyError(f"{os.path.basename(cmd[0])} exited {rc} in {self.name}/{side}: {' | '.join(last)}")
        return out + err if stderr else out

    def release(self, proc: subprocess.Popen) -> None:
        stop(proc)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)
