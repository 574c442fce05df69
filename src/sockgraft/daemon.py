"""graftd: the fd service for every container in the tables.

One socket per container, `RUNTIME_DIR/fd/<container>.sock`, created and removed as containers
appear in and leave the tables (polled, so `graft add` takes effect without a restart). One event
loop serves them all. Every grant and denial is one JSON line on stderr and in the audit log.
"""
from __future__ import annotations

import fcntl
import os
import signal
import sys

import click

from .audit import Audit
from .fdservice import FdService
from .run import RUNTIME_DIR
from .store import StoreError, state_dir


def socket_path(runtime_dir: str, key: str) -> str:
    return os.path.join(runtime_dir, "fd", key.replace("/", "_") + ".sock")


class Daemon:
    def __init__(self, state: str | None, runtime_dir: str):
        self.state = state_dir(state)
        self.runtime_dir = runtime_dir
        os.makedirs(self.state, mode=0o700, exist_ok=True)
        self._lock = os.open(os.path.join(self.state, "graftd.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise StoreError(f"another graftd already serves {self.state}") from None
        os.ftruncate(self._lock, 0)
        os.write(self._lock, f"{os.getpid()}\n".encode())
        self.service = FdService(self.state, audit=Audit(self.state, echo=True), mode="api")
        self._version = None

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
            path = socket_path(self.runtime_dir, key)
            self.service.listen(key, path)
            self.service.audit.record("container", container=key, socket=path)

    def serve(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.service.stop())
        self.service.audit.record("start", pid=os.getpid(), state_dir=self.state)
        self.sync()
        self.service.serve_forever(tick=self.sync)
        self.service.audit.record("stop", pid=os.getpid())
        self.service.close()
        os.close(self._lock)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", metavar="DIR", help="Tables and audit log (default $GRAFT_STATE_DIR or /var/lib/sockgraft).")
@click.option("--runtime-dir", metavar="DIR", default=RUNTIME_DIR, show_default=True, help="Where the per-container sockets go.")
def cli(state_dir: str | None, runtime_dir: str) -> None:
    """Serve the fd service for every container in the tables."""
    Daemon(state_dir, runtime_dir).serve()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="graftd", standalone_mode=False)
    except click.ClickException as e:
        print(f"graftd: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (StoreError, OSError) as e:
        print(f"graftd: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
