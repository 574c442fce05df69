"""Fixtures of the runtime tests: a busybox rootfs and a graftd serving the OCI agent."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import _alive
from tests.runtime.common import Graftd, Scenario, build_rootfs


_DEBRIS = re.compile(r"^graft-sgt(\d+)-\d+$")


def pytest_sessionstart(session):
    """Remove namespaces graft-runtime made for containers of an earlier, killed test run."""
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
        m = _DEBRIS.match(name)
        if m and not _alive(int(m[1])):
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
