"""graftd: the fd service for every container in the tables, and the OCI seccomp agent.

One socket per container, `RUNTIME_DIR/fd/<container>.sock`, created and removed as containers
appear in and leave the tables (polled, so `graft add` takes effect without a restart). One event
loop serves them all. Every grant and denial is one JSON line on stderr and in the audit log.

The OCI seccomp agent (`RUNTIME_DIR/agent.sock`, the `listenerPath` graft-runtime writes into
config.json) takes the seccomp listeners runc sends and hands them to the seccomp supervisor, which
decides with each container's table. `--metrics ADDR:PORT` serves Prometheus metrics; the state
graftd serves (containers, listeners) is in `RUNTIME_DIR/graftd.json` for `graft status`.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import time

import click

from sockgraft.core.endpoint import SpecError
from sockgraft.modes.api.fdservice import FdService
from sockgraft.host import egress
from sockgraft.host.metrics import Metrics, MetricsAudit
from sockgraft.host.paths import RUNTIME_DIR, fd_socket_path, state_dir
from sockgraft.host.store import Store, StoreError

STATUS_NAME = "graftd.json"


class Daemon:
    def __init__(self, state: str | None, runtime_dir: str, agent_socket: str | None = None, metrics: str | None = None):
        self.state = state_dir(state)
        self.runtime_dir = runtime_dir
        self.agent_socket = agent_socket
        self.metrics_addr = metrics
        os.makedirs(self.state, mode=0o700, exist_ok=True)
        self._lock = os.open(os.path.join(self.state, "graftd.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise StoreError(f"another graftd already serves {self.state}") from None
        os.ftruncate(self._lock, 0)
        os.write(self._lock, f"{os.getpid()}\n".encode())
        self.metrics = Metrics()
        self.audit = MetricsAudit(self.state, self.metrics, echo=True)
        self.service = FdService(self.state, audit=self.audit, mode="api",
                                 on_request=lambda seconds: self.metrics.observe("api", seconds))
        self._version = None
        self.supervisor = None
        self.agent = None
        self._status_at = 0.0
        self._status_path = os.path.join(self.runtime_dir, STATUS_NAME)
        self._counts = Store(self.state)  # read by the metrics thread only
        self.metrics.count_containers(self._count_containers)

    def _count_containers(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self._counts.containers():
            counts[row.mode or "api"] = counts.get(row.mode or "api", 0) + 1
        return counts

    def start_agent(self) -> None:
        """The seccomp supervisor and the OCI agent socket in front of it."""
        from sockgraft.modes.seccomp.supervisor import Supervisor
        from sockgraft.runtime.ociagent import Agent

        # its own audit writer: like the fd service, the supervisor writes its lines when its loop is
        # idle (O_APPEND: the two writers never interleave within a line)
        self.seccomp_audit = MetricsAudit(self.state, self.metrics, echo=True)
        self.supervisor = Supervisor(self.state, audit=self.seccomp_audit,
                                     on_notification=lambda seconds: self.metrics.observe("seccomp", seconds))
        self.supervisor.start_thread()
        self.agent = Agent(self.agent_socket, Store(self.state), self.supervisor,
                           on_event=lambda event, **f: self.seccomp_audit.record(event, **f))
        self.agent.start_thread()
        self.audit.record("agent", socket=self.agent_socket)

    def supervised(self) -> dict[str, int]:
        """Live seccomp listeners per container key."""
        return {} if self.supervisor is None else self.supervisor.active_keys()

    def tick(self) -> None:
        self.sync()
        now = time.monotonic()
        if now - self._status_at < 1.0:
            return
        self._status_at = now
        live = self.supervised()
        self.metrics.supervised.set(len(live))
        if self.agent is not None:
            for key in list(self.agent.registered):
                if key not in live:
                    self.agent.container_gone(key)
        self.write_status(live)

    def write_status(self, live: dict[str, int]) -> None:
        """What this graftd serves, for `graft status` (replaced atomically)."""
        status = {
            "pid": os.getpid(), "state_dir": self.state, "time": time.time(),
            "agent_socket": self.agent.path if self.agent else None,
            "metrics": self.metrics_addr,
            "fd_sockets": {key: path for key, (_s, path) in self.service.listeners.items()},
            "seccomp_listeners": live,
        }
        tmp = self._status_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(status, f)
            os.replace(tmp, self._status_path)
        except OSError:
            pass

    def sync(self) -> None:
        """Serve exactly the containers in the tables."""
        version = self.service.store.data_version()
        if version == self._version:
            return
        self._version = version
        keys = {row.key for row in self.service.store.containers()}
        for key in set(self.service.listeners) - keys:
            self.service.unlisten(key)
            self.service.audit.record("container-gone", container=key)
        for key in keys - set(self.service.listeners):
            path = fd_socket_path(self.runtime_dir, key)
            try:
                self.service.listen(key, path)
            except OSError as e:  # one container's socket must not stop the others
                self.service.audit.record("fd-service-error", container=key, socket=path, error=str(e))
                continue
            self.service.audit.record("container", container=key, socket=path)

    def serve(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.service.stop())
        os.makedirs(self.runtime_dir, exist_ok=True)
        try:
            if self.metrics_addr:
                host, port = self.metrics.serve(self.metrics_addr)
                self.audit.record("metrics", addr=host, port=port)
            if self.agent_socket:
                self.start_agent()
            self.service.audit.record("start", pid=os.getpid(), state_dir=self.state)
            egress.sync(self.service.store)  # the kernel's egress table rebuilt from the tables
            self.sync()
            self.service.serve_forever(tick=self.tick)
            self.service.audit.record("stop", pid=os.getpid())
        finally:
            if self.agent is not None:
                self.agent.close()
            if self.supervisor is not None:
                self.supervisor.close()
                self.seccomp_audit.close()
            self.metrics.close()
            self.service.close()
            self._counts.close()
            try:
                os.unlink(self._status_path)
            except FileNotFoundError:
                pass
            os.close(self._lock)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", metavar="DIR", help="Tables and audit log (default $GRAFT_STATE_DIR or /var/lib/sockgraft).")
@click.option("--runtime-dir", metavar="DIR", default=RUNTIME_DIR, show_default=True, help="Where the per-container sockets go.")
@click.option("--agent-socket", metavar="PATH", help="OCI seccomp agent socket (listenerPath) [default: RUNTIME_DIR/agent.sock].")
@click.option("--no-agent", is_flag=True, help="Do not serve the OCI seccomp agent.")
@click.option("--metrics", "metrics", metavar="ADDR:PORT", help="Serve Prometheus metrics at http://ADDR:PORT/metrics.")
def cli(state_dir: str | None, runtime_dir: str, agent_socket: str | None, no_agent: bool, metrics: str | None) -> None:
    """Serve the fd service for every container in the tables, and the OCI seccomp agent."""
    if metrics:
        from sockgraft.host.metrics import parse_listen

        parse_listen(metrics)
    agent = None if no_agent else agent_socket or os.path.join(runtime_dir, "agent.sock")
    Daemon(state_dir, runtime_dir, agent, metrics).serve()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="graftd", standalone_mode=False)
    except click.ClickException as e:
        print(f"graftd: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (StoreError, SpecError, OSError) as e:
        print(f"graftd: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
