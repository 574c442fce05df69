"""Fixtures of the runtime tests: a busybox rootfs and a graftd serving the OCI agent (namespaces
that killed runs left are swept by tests/conftest.py)."""
from __future__ import annotations

import os

import pytest

from tests.runtime.common import Graftd, Scenario, build_rootfs


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
