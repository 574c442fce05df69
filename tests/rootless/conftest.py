"""A real unprivileged user for the rootless tests: created with useradd (no home, like a service
account), its XDG_RUNTIME_DIR made as logind would (/run/user/UID, mode 700), subuid/subgid ranges
for rootless Podman; removed at the end. Users of killed runs (`sgr<PID>` with PID dead) are swept
first: their processes (by pid), their dirs and their subuid/subgid lines go with them."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal

import pytest

from sockgraft.bench.users import create_user, remove_user
from sockgraft.host.netns import pid_alive

PREFIX = "sgr"  # every user these tests make is sgr<PID of the pytest process>
_OURS = re.compile(rf"^{PREFIX}(\d+)$")
VENV_PYTHON = "/opt/sockgraft/bin/python3"  # the install every user can run (scripts/setup)


def sweep_www() -> None:
    """The daemon test's web roots (/tmp/sgr-www-<PID>) of dead runs, and the daemons (root's too)
    still serving them: by pid, found by that path on their command line."""
    dead = set()
    for entry in os.listdir("/tmp"):
        m = re.match(r"^sgr-www-(\d+)$", entry)
        if m and not pid_alive(int(m[1])):
            dead.add(f"/tmp/{entry}")
    if not dead:
        return
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a in dead for a in argv):
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for d in dead:
        shutil.rmtree(d, ignore_errors=True)


def sweep_users() -> list[str]:
    """Users of earlier runs whose pytest process is gone (and the daemon test's leftovers)."""
    sweep_www()
    gone = []
    for entry in pwd.getpwall():
        m = _OURS.match(entry.pw_name)
        if m and not pid_alive(int(m[1])):
            remove_user(entry.pw_name)
            gone.append(entry.pw_name)
    return gone


@pytest.fixture(scope="session")
def user():
    if os.geteuid() != 0:
        pytest.skip("the rootless tests create a user: run them as root")
    if not os.access(VENV_PYTHON, os.X_OK):
        pytest.skip(f"{VENV_PYTHON} missing: run scripts/setup")
    sweep_users()
    name = f"{PREFIX}{os.getpid()}"
    u = create_user(name, subids=True)
    try:
        yield u
    finally:
        remove_user(name)
