"""Fixtures of the runtime tests: a busybox rootfs and a graftd serving the OCI agent."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.runtime.common import Graftd, Scenario, build_rootfs


def pytest_sessionstart(session):
    """Namespaces graft-runtime made for containers of an earlier, killed test run (ids sgt<PID>-N)."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return
    for name in names:
        head, dash, _ = name.removeprefix("graft-").partition("-")
        if name.startswith("graft-sgt") and dash and head[3:].isdigit():
            try:
                os.kill(int(head[3:]), 0)
            except ProcessLookupError:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory) -> str:
    return build_rootfs(str(tmp_path_factory.mktemp("rootfs")))


@pytest.fixture(scope="module")
def graftd(tmp_path_factory):
    d = Graftd(str(tmp_path_factory.mktemp("graftd")), metrics=True)
    yield d
    d.close()


@pytest.fixture
def scenario(tmp_path):
    s = Scenario(str(tmp_path))
    yield s
    s.close()


_ids = iter(range(1, 1 << 30))


def container_id() -> str:
    return f"sgt{os.getpid()}-{next(_ids)}"
