"""Podman: `podman run --runtime graft-runtime --network none --annotation ...` with Debian's
podman and runc; its storage under a temp dir (the system store is never touched)."""
from __future__ import annotations

import pytest

from tests.runtime.engines import IMAGE, Podman

pytestmark = pytest.mark.e2e

# root here lacks CAP_SYS_RESOURCE: podman's default limits cannot be applied
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]


@pytest.fixture(scope="module")
def podman(tmp_path_factory, graftd, rootfs):
    p = Podman(str(tmp_path_factory.mktemp("podman")), graftd, rootfs)
    yield p
    p.close()


def test_podman_run_graft_runtime(podman, graftd, scenario):
    ann = [a for k, v in scenario.annotations().items() for a in ("--annotation", f"{k}={v}")]
    cid = podman("run", "-d", "--network", "none", *LIMITS, *ann, IMAGE, *scenario.command()).stdout.strip()
    try:
        key = scenario.check(graftd)
        rec = [c for c in graftd.status()["containers"] if c["key"] == key][0]
        assert rec["oci_id"] == cid
    finally:
        podman("rm", "-f", "-t", "0", cid)
    scenario.check_gone(graftd, key)
