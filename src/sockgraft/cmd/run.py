"""`graft run`: a command in a container netns, its sockets grafted by the chosen attach mode.

Daemonless: this process registers the container's endpoints and rules, serves the fd service for
it while the command runs, passes the command's exit status through and removes what it created.
Attach modes plug in through `modes.base.Attach`; `modes.registry` names them.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from sockgraft.core.endpoint import SpecError
from sockgraft.host import netns
from sockgraft.host.children import exit_status, forwarding_signals
from sockgraft.host.paths import RUNTIME_DIR
from sockgraft.host.store import Store
from sockgraft.modes.api.fdservice import FdService
from sockgraft.modes.base import RunContext, RunSpec
from sockgraft.modes.registry import MODES


def sweep_debris() -> None:
    """Remove what a `graft run` killed with SIGKILL left: its socket directory and its own netns
    (`graft-run-PID`, once no process is left in it)."""
    try:
        entries = os.listdir(RUNTIME_DIR)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        parts = entry.split("-")
        if len(parts) >= 3 and parts[0] == "run" and parts[1].isdigit() and not netns.pid_alive(int(parts[1])):
            shutil.rmtree(os.path.join(RUNTIME_DIR, entry), ignore_errors=True)
    try:
        names = os.listdir(netns.NETNS_RUN_DIR)
    except FileNotFoundError:
        return
    for name in names:
        pid = name[len("graft-run-"):]
        if name.startswith("graft-run-") and pid.isdigit() and not netns.pid_alive(int(pid)):
            ino = netns.named_ino(name)
            if ino is not None and not netns.pids_in_netns(ino):
                netns.remove(name)


def run(spec: RunSpec) -> int:
    if spec.mode not in MODES:
        raise SpecError(f"unknown mode {spec.mode!r} (available: {', '.join(sorted(MODES))})")
    if not spec.cmd:
        raise SpecError("no command to run (graft run ... -- CMD [ARG...])")
    if shutil.which(spec.cmd[0], path=os.environ.get("PATH")) is None and not os.path.exists(spec.cmd[0]):
        raise SpecError(f"command not found: {spec.cmd[0]}")
    sweep_debris()
    name = spec.netns or f"graft-run-{os.getpid()}"
    undo: list = []  # cleanup steps, run in reverse
    store = Store(spec.state_dir)
    try:
        if netns.named_ino(name) is None:
            container = netns.create(name)
            undo.append(lambda: netns.remove(name))
        else:
            container = netns.by_name(name)
        key = container.key
        undo.append(store.install(key, container.ino, spec.mode, spec.endpoints, spec.ingress, spec.egress,
                                  fresh=False))

        os.makedirs(RUNTIME_DIR, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=RUNTIME_DIR)
        os.chmod(workdir, 0o755)
        undo.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
        sock_path = os.path.join(workdir, "graft.sock")
        service = FdService(spec.state_dir, mode=spec.mode)
        undo.append(service.close)
        service.listen(key, sock_path)

        env = dict(os.environ, GRAFT_SOCKET=sock_path, GRAFT_NETNS=name)
        ctx = RunContext(spec, container, sock_path, workdir, env)
        attach = MODES[spec.mode](ctx)
        undo.append(attach.cleanup)
        attach.prepare()

        def preexec() -> None:
            netns.enter(container.path)
            attach.preexec()

        proc = attach.spawn(preexec)
        with forwarding_signals(proc):
            thread = service.start_thread()
            undo.append(lambda: (service.stop(), thread.join(5)))
            return exit_status(proc.wait())  # EINTR is retried by Python (PEP 475)
    finally:
        errors = []
        for step in reversed(undo):
            try:
                step()
            except Exception as e:  # keep cleaning; report at the end
                errors.append(str(e))
        store.close()
        if errors:
            import sys

            print(f"graft: cleanup: {'; '.join(errors)}", file=sys.stderr)
