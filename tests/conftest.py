"""Fixtures shared by every test: an isolated state dir, namespaces that are always removed,
free loopback ports, and the `graft` command as a user runs it."""
from __future__ import annotations

import os
import subprocess

import pytest

from sockgraft.host.netns import pid_alive
from tests.helpers import stop

NETNS_PREFIX = "sgt"  # every netns a test creates is named sgt<PID>-<N>


def pytest_sessionstart(session):
    """Remove namespaces that an earlier, killed test run left behind (its pid is gone)."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return
    for name in names:
        head, dash, _ = name.partition("-")
        if name.startswith(NETNS_PREFIX) and dash and head[len(NETNS_PREFIX):].isdigit():
            if not pid_alive(int(head[len(NETNS_PREFIX):])):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> str:
    d = str(tmp_path / "state")
    monkeypatch.setenv("GRAFT_STATE_DIR", d)
    return d


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
