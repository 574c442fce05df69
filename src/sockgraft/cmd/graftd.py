"""graftd: the fd service for every container in the tables, and the OCI seccomp agent.

One socket per container, `RUNTIME_DIR/fd/<container>.sock`, created and removed as containers
appear in and leave the tables (polled, so `graft add` takes effect without a restart). One event
loop serves them all. Every grant and denial is one JSON line on stderr and in the audit log.

The OCI seccomp agent (`RUNTIME_DIR/agent.sock`, the `listenerPath` graft-runtime writes into
config.json) takes the seccomp listeners runc sends and hands them to the seccomp supervisor, which
decides with each container's table. `--metrics ADDR:PORT` serves Prometheus metrics; the state
graftd serves (containers, listeners) is in `RUNTIME_DIR/graftd.json` for `graft status`.

Restarts: a duplicate of every seccomp listener goes to the listener keeper
(`sockgraft.runtime.keeper`, its own session, `RUNTIME_DIR/keeper.sock`), started with the first
listener. A graftd that starts (after a crash, `kill -9`, or SIGTERM for an upgrade) adopts what the
keeper holds before its agent accepts anything new: the running containers stay supervised, and
their calls trapped meanwhile wait in the kernel. SIGTERM/SIGINT stop this graftd only (it answers
what it received, then exits; the keeper keeps the listeners). `graftd --stop` stops graftd and
then the keeper, releasing every listener (the containers' trapped calls then fail with ENOSYS).
"""
from __future__ import annotations

import fcntl
import os
import signal
import sys
import threading
import time

import click

from sockgraft.core.endpoint import SpecError
from sockgraft.modes.api.fdservice import FdService
from sockgraft.host.metrics import Metrics, MetricsAudit
from sockgraft.host.paths import RUNTIME_DIR, fd_socket_path, state_dir, write_json
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
        self.keeper = None  # keeper.Client, once a listener was kept or adopted
        self._keeper_lock = threading.Lock()
        self._keeper_procs: list = []  # keepers this graftd started (reaped when they exit)
        self._kept_meta: dict[str, tuple] = {}  # key -> (pid, container id, registered), to keep again
        self.exit_status = 0

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
                           on_event=lambda event, **f: self.seccomp_audit.record(event, **f), keep=self.keep)
        self.adopt()  # before the agent serves anything new
        self.agent.start_thread()
        self.audit.record("agent", socket=self.agent_socket)

    # -- the listener keeper ---------------------------------------------------------------------
    def adopt(self) -> None:
        """Take over the listeners a previous graftd left with the keeper."""
        from sockgraft.runtime import keeper

        gone = keeper.take_gone(self.runtime_dir)
        try:
            client = keeper.Client.connect(self.runtime_dir)
        except OSError as e:
            self.audit.record("keeper-error", error=f"{keeper.socket_path(self.runtime_dir)}: {e.strerror or e}")
            client = None
        entries = []
        if client is not None:
            try:
                entries, more_gone = client.hello(os.getpid(), self.state)
            except (keeper.KeeperError, OSError) as e:
                client.close()
                raise StoreError(f"listener keeper {keeper.socket_path(self.runtime_dir)}: {e}") from None
            gone += more_gone
            self.keeper = client
        if client is None and not gone:
            return
        keys = set()
        for fd, meta in entries:
            key, pid = meta.get("key", ""), meta.get("pid")
            self._kept_meta[key] = (pid, meta.get("cid", ""), bool(meta.get("registered")))
            if meta.get("registered"):
                self.agent.registered[key] = meta.get("cid", "")
            self.supervisor.add_listener(fd, key, pid if isinstance(pid, int) else None)
            keys.add(key)
        for meta in gone:  # ended while no graftd ran: a table the agent registered goes now
            if meta.get("registered") and meta.get("key") not in keys:
                self.agent.registered[meta["key"]] = meta.get("cid", "")
                self.agent.container_gone(meta["key"])
        self.audit.record("keeper-adopt", keeper=client.keeper_pid if client else None, listeners=len(entries),
                          containers=sorted(keys), gone=len(gone))

    def keep(self, fd: int, key: str, pid: int | None, cid: str, registered: bool) -> None:
        """A duplicate of a new listener to the keeper (started on first use). Never fails the
        container: without a keeper it is served all the same, only not across a restart."""
        from sockgraft.runtime import keeper

        self._kept_meta[key] = (pid, cid, registered)
        with self._keeper_lock:
            try:
                self._keeper_client().keep(fd, key, pid, cid, registered)
            except (keeper.KeeperError, OSError) as e:
                self._keeper_lost()
                self.seccomp_audit.record("keeper-error", container=key, error=str(e))

    def _keeper_client(self):
        """The connected keeper, started if there is none (caller holds _keeper_lock)."""
        from sockgraft.runtime import keeper

        if self.keeper is not None and not self.keeper.alive():
            self._keeper_lost()
        if self.keeper is None:
            client = keeper.Client.connect(self.runtime_dir)
            if client is None:
                client = keeper.Client.spawn(self.runtime_dir, self.state)
                if client.proc is not None:
                    self._keeper_procs.append(client.proc)
            try:
                entries, _gone = client.hello(os.getpid(), self.state)
            except BaseException:
                client.close()
                raise
            for fd, _meta in entries:  # a keeper we did not adopt from holds nothing of ours
                os.close(fd)
            self.keeper = client
            self.audit.record("keeper", pid=client.keeper_pid)
        return self.keeper

    def _keeper_lost(self) -> None:
        if self.keeper is not None:
            self.keeper.close()
            self.keeper = None

    def check_keeper(self) -> None:
        """A keeper that died (killed) while we run: a new one gets every listener we serve."""
        from sockgraft.runtime import keeper

        self._keeper_procs = [p for p in self._keeper_procs if p.poll() is None]
        with self._keeper_lock:
            if self.keeper is None or self.keeper.alive():
                return
            self._keeper_lost()
            self.audit.record("keeper-lost")
            if self.supervisor is None:
                return
            n = 0
            for t in list(self.supervisor.targets.values()):
                if t.closing:
                    continue
                try:
                    fd = os.dup(t.fd)
                except OSError:
                    continue  # dropped meanwhile
                try:
                    if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:seccomp notify":
                        continue
                    pid, cid, registered = self._kept_meta.get(t.key, (None, "", False))
                    self._keeper_client().keep(fd, t.key, pid, cid, registered)
                    n += 1
                except (keeper.KeeperError, OSError) as e:
                    self._keeper_lost()
                    self.audit.record("keeper-error", error=str(e))
                    return
                finally:
                    os.close(fd)
            self.audit.record("keeper-rekept", listeners=n)

    def drain_supervisor(self, timeout: float = 5.0) -> None:
        """Receive no more notifications; answer those received (parked connects, jobs) before the
        loop stops. What was not received stays queued in the kept listener for the next graftd."""
        sup = self.supervisor
        sup.stop_receiving()  # its C loop (modes/seccomp/fast.py) too; what it received is served
        for t in list(sup.targets.values()):
            try:
                sup.epoll.modify(t.fd, 0)  # only POLLHUP from now on
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sup.pending and all(t.busy == 0 for t in list(sup.targets.values())):
                return
            time.sleep(0.02)

    def supervised(self) -> dict[str, int]:
        """Live seccomp listeners per container key."""
        return {} if self.supervisor is None else self.supervisor.active_keys()

    def tick(self) -> None:
        self.sync()
        now = time.monotonic()
        if now - self._status_at < 1.0:
            return
        self._status_at = now
        if self.supervisor is not None and self.supervisor.thread is not None and not self.supervisor.thread.is_alive():
            # the loop died: exit, so that a restarted graftd adopts the listeners from the keeper
            print("graftd: the seccomp supervisor stopped; exiting so that a restart takes over", file=sys.stderr)
            self.exit_status = 1
            self.service.stop()
        self.check_keeper()
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
            "keeper": self.keeper.keeper_pid if self.keeper is not None else None,
        }
        try:
            write_json(self._status_path, status, 0o644)
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
            self.service.store.sync_egress()  # the kernel's egress table rebuilt from the tables
            self.sync()
            self.service.serve_forever(tick=self.tick)
            self.service.audit.record("stop", pid=os.getpid())
        finally:
            if self.agent is not None:
                self.agent.close()
            if self.supervisor is not None:
                if self.keeper is not None:
                    self.drain_supervisor()
                self.supervisor.close()
                self.seccomp_audit.close()
            if self.keeper is not None:
                self.keeper.close()  # the keeper keeps the listeners for the next graftd
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
@click.option("--stop", "stop", is_flag=True,
              help="Stop the graftd of this state dir and the listener keeper of this runtime dir for good "
                   "(running containers' trapped calls then fail with ENOSYS).")
def cli(state_dir: str | None, runtime_dir: str, agent_socket: str | None, no_agent: bool, metrics: str | None,
        stop: bool) -> None:
    """Serve the fd service for every container in the tables, and the OCI seccomp agent."""
    if stop:
        stop_for_good(state_dir, runtime_dir)
        return
    if metrics:
        from sockgraft.host.metrics import parse_listen

        parse_listen(metrics)
    agent = None if no_agent else agent_socket or os.path.join(runtime_dir, "agent.sock")
    d = Daemon(state_dir, runtime_dir, agent, metrics)
    d.serve()
    if d.exit_status:
        sys.exit(d.exit_status)


def stop_for_good(state: str | None, runtime_dir: str, timeout: float = 15.0) -> None:
    """`graftd --stop`: SIGTERM to the graftd holding the state dir's lock, wait until it is gone,
    then release every kept listener and stop the keeper."""
    from sockgraft.runtime import keeper

    state = state_dir(state)
    lock_path = os.path.join(state, "graftd.lock")
    said = []
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    if fd is not None:
        try:
            deadline = time.monotonic() + timeout
            signalled = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    break  # no graftd holds it (any more)
                except BlockingIOError:
                    pass
                if not signalled:
                    try:
                        pid = int(os.pread(fd, 32, 0).split()[0])
                        os.kill(pid, signal.SIGTERM)
                        said.append(f"stopped graftd pid {pid}")
                    except (ValueError, IndexError, ProcessLookupError):
                        pass
                    signalled = True
                if time.monotonic() > deadline:
                    raise StoreError(f"the graftd of {state} did not stop within {timeout:.0f}s")
                time.sleep(0.05)
        finally:
            os.close(fd)
    try:
        released = keeper.stop(runtime_dir)
    except (keeper.KeeperError, OSError) as e:
        raise StoreError(f"listener keeper of {runtime_dir}: {e}") from None
    if released is not None:
        said.append(f"stopped the listener keeper ({released} listeners released)")
    print(f"graftd: {'; '.join(said) if said else 'nothing was running'}", file=sys.stderr)


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
