"""Fixtures of the runtime tests: a busybox rootfs and a graftd serving the OCI agent."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from sockgraft.host.netns import pid_alive, pids_in_netns
from tests.runtime.common import Graftd, Scenario, build_rootfs


_DEBRIS = re.compile(r"^graft-oci-(sgt(\d+)-\d+|[0-9a-f]{24})$")


def pytest_sessionstart(session):
    """Remove namespaces graft-runtime made for containers of an earlier, killed test run: ours
    (container ids sgt<PID>-N of a dead pid) and the engines' (hex ids) that no process uses."""
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
        m = _DEBRIS.match(name)
        if not m:
            continue
        if m[2] is not None:
            dead = not pid_alive(int(m[2]))
        else:
            try:
                dead = not pids_in_netns(os.stat(f"/run/netns/{name}").st_ino)
            except OSError:
                continue
        if dead:
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
