"""Fixtures shared by every test: an isolated state dir, namespaces that are always removed,
free loopback ports, and the `graft` command as a user runs it."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from sockgraft.host.netns import pid_alive, pids_in_netns
from tests.helpers import stop

NETNS_PREFIX = "sgt"  # every netns a test creates is named sgt<PID>-<N>
# namespaces tests make (sgt<PID>-N, or sgt<PID>-Nx for one `graft run` creates), and the ones
# graft-runtime makes for our containers (graft-oci-sgt<PID>-N) or an engine's (graft-oci-<24 hex>)
_OURS = re.compile(rf"^(?:graft-oci-)?{NETNS_PREFIX}(\d+)-\d+\w*$")
_ENGINES = re.compile(r"^graft-oci-[0-9a-f]{24}$")


def leftover_netns() -> list[str]:
    """Namespaces an earlier, killed test run left behind: ours whose test pid is dead, and the
    engines' that no process uses any more."""
    try:
        names = sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []
    dead = []
    for name in names:
        if m := _OURS.match(name):
            if not pid_alive(int(m[1])):
                dead.append(name)
        elif _ENGINES.match(name):
            try:
                if not pids_in_netns(os.stat(f"/run/netns/{name}").st_ino):
                    dead.append(name)
            except OSError:
                continue
    return dead


def pytest_sessionstart(session):
    """The one sweeper of leftover namespaces and egress tables (for every folder of tests)."""
    from sockgraft.host import egress, netns

    for name in leftover_netns():
        try:
            netns.remove(name)
        except OSError:
            pass  # in use after all, or gone meanwhile: the next session tries again
    egress.sweep(keep=_live_state_dir)  # nftables tables a killed or earlier run left
    _forget_system_rows(lambda pid: not pid_alive(pid))


def _forget_system_rows(whose) -> list[str]:
    """Containers of test runs (keys sgt<PID>-N) in the system state dir, where no test should
    write (each has its own GRAFT_STATE_DIR): forget those whose PID `whose(pid)` picks."""
    from sockgraft.host.paths import SYSTEM_STATE_DIR
    from sockgraft.host.store import Store

    if not os.path.exists(os.path.join(SYSTEM_STATE_DIR, "tables.db")) or os.geteuid() != 0:
        return []
    gone = []
    with Store(SYSTEM_STATE_DIR) as store:
        for row in store.containers():
            if (m := _OURS.match(row.key)) and whose(int(m[1])):
                store.forget(row.key)
                gone.append(row.key)
    return gone


_SESSION = re.compile(r"^(.*/pytest-of-[^/]+)/pytest-(\d+)/")


def _live_state_dir(state_dir: str) -> bool:
    """A state dir whose table must stay: it still has its database, and it is not a test's of a
    session three or more before the newest (pytest keeps the last three session dirs: their stores
    stay on disk, and a table left with them would judge sockets whose mark a later test reuses)."""
    if not os.path.exists(os.path.join(state_dir, "tables.db")):
        return False
    m = _SESSION.match(state_dir + "/")
    if m is None:
        return True
    sessions = [int(n[7:]) for n in os.listdir(m.group(1)) if n.startswith("pytest-") and n[7:].isdigit()]
    return int(m.group(2)) > max(sessions, default=0) - 3


def pytest_sessionfinish(session):
    """Tables of this session's state dirs that a test left (containers it did not remove)."""
    from sockgraft.host import egress

    try:
        base = os.path.realpath(str(session.config._tmp_path_factory.getbasetemp()))
    except (AttributeError, OSError, ValueError):
        return
    egress.sweep(keep=lambda d: not d.startswith(base + os.sep))
    left = _forget_system_rows(lambda pid: pid == os.getpid())
    if left:  # a test ran graft without its state dir: the user's own tables would have changed
        print(f"\nFAILED: tests left containers in the system state dir (removed now): {left}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _egress_tables_of_the_test(tmp_path):
    """Stores a test made under its tmp_path (not only `state_dir`): their kernel tables go with it."""
    yield
    from sockgraft.host import egress

    prefix = os.path.realpath(str(tmp_path)) + os.sep
    egress.sweep(keep=lambda d: not d.startswith(prefix))


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> str:
    from sockgraft.host import egress

    d = str(tmp_path / "state")
    monkeypatch.setenv("GRAFT_STATE_DIR", d)
    yield d
    try:
        egress.remove(d)  # whatever the test left in its store: its kernel table goes
    except egress.EgressError:
        pass


_counter = iter(range(1, 1 << 30))


@pytest.fixture
def make_netns():
    """Factory for fresh named netns (only `lo`, up); all removed at teardown."""
    from sockgraft.host import netns

    made = []

    def make() -> str:
        name = f"{NETNS_PREFIX}{os.getpid()}-{next(_counter)}"
        netns.create(name)
        made.append(name)
        return name

    yield make
    for name in made:
        netns.remove(name)


@pytest.fixture
def ns(make_netns) -> str:
    return make_netns()


@pytest.fixture
def procs():
    """Processes started by a test; each stopped at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        stop(p)
