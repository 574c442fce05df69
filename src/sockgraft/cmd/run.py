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
from sockgraft.host import netns, paths, userns
from sockgraft.host.children import STOPPING_SIGNALS, become_subreaper, holding_signals, wait_container
from sockgraft.host.store import Store
from sockgraft.modes.api.fdservice import FdService
from sockgraft.modes.base import RunContext, RunSpec
from sockgraft.modes.registry import MODES


def sweep_debris() -> None:
    """Remove what a `graft run` killed with SIGKILL left: its socket directory and its own netns
    (`graft-run-PID`, once no process is left in it). A rootless run's netns dies with its last
    process and fd, so only its socket directory can be left."""
    runtime = paths.default_runtime_dir()
    try:
        entries = os.listdir(runtime)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        entries = []
    for entry in entries:
        parts = entry.split("-")
        if len(parts) >= 3 and parts[0] == "run" and parts[1].isdigit() and not netns.pid_alive(int(parts[1])):
            shutil.rmtree(os.path.join(runtime, entry), ignore_errors=True)
    if not paths.privileged():
        return
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


def check_rootless(spec: RunSpec) -> None:
    """What an unprivileged user cannot have: a named netns (/run/netns is root's), host ports below
    net.ipv4.ip_unprivileged_port_start."""
    if spec.netns:
        raise SpecError(f"-n {spec.netns}: a rootless graft run makes its own unnamed netns (named ones in "
                        f"{netns.NETNS_RUN_DIR} are root's); leave -n out")
    lowest = userns.unprivileged_port_start()
    for ep in spec.endpoints:
        port = getattr(ep, "port", None)
        if isinstance(port, int) and 0 < port < lowest:
            raise SpecError(f"endpoint {ep.name}: host port {port} is below net.ipv4.ip_unprivileged_port_start "
                            f"({lowest}): a rootless run can use ports >= {lowest} only")


def container_pids(ino: int) -> list[int]:
    return [p for p in netns.pids_in_netns(ino) if p != os.getpid()]


def run(spec: RunSpec) -> int:
    if spec.mode not in MODES:
        raise SpecError(f"unknown mode {spec.mode!r} (available: {', '.join(sorted(MODES))})")
    if not spec.cmd:
        raise SpecError("no command to run (graft run ... -- CMD [ARG...])")
    if shutil.which(spec.cmd[0], path=os.environ.get("PATH")) is None and not os.path.exists(spec.cmd[0]):
        raise SpecError(f"command not found: {spec.cmd[0]}")
    rootless = not paths.privileged()
    if rootless:
        check_rootless(spec)
        try:
            paths.check_user_dirs(spec.state_dir)
        except OSError as e:
            raise SpecError(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}") from None
    with holding_signals() as held:  # a stop while setting up: clean up, never die half set up
        return _run(spec, rootless, held)


def _run(spec: RunSpec, rootless: bool, held: list[int]) -> int:
    sweep_debris()
    undo: list = []  # cleanup steps, run in reverse
    store = Store(spec.state_dir)
    try:
        ns: userns.Namespaces | None = None
        try:
            if rootless or spec.userns:
                ns = userns.Namespaces.create(with_net=rootless)
                undo.append(ns.close)
        except userns.UsernsError as e:
            raise SpecError(str(e)) from None
        made_netns = False
        if rootless:
            container = netns.Container(netns.key_for_ino(ns.net_ino), ns.net_ino, ns.net_path)
            name = container.key
        else:
            name = spec.netns or f"graft-run-{os.getpid()}"
            if netns.named_ino(name) is None:
                container = netns.create(name)
                undo.append(lambda: netns.remove(name))
                made_netns = True
            else:
                container = netns.by_name(name)
        key = container.key
        undo.append(store.install(key, container.ino, spec.mode, spec.endpoints, spec.ingress, spec.egress,
                                  fresh=False))

        runtime = paths.default_runtime_dir()
        os.makedirs(runtime, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=runtime)
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
            if ns is not None:
                ns.enter(None if rootless else container.path, low_ports=made_netns)
            else:
                netns.enter(container.path)
            attach.preexec()

        stopped = [sig for sig in held if sig in STOPPING_SIGNALS]
        if stopped:  # stopped before the command started: it never does
            return 128 + stopped[0]
        become_subreaper()  # a daemon that forks away stays ours: we serve it until it is gone
        proc = attach.spawn(preexec)
        thread = service.start_thread()
        undo.append(lambda: (service.stop(), thread.join(5)))
        return wait_container(proc, lambda: container_pids(container.ino), held)
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
