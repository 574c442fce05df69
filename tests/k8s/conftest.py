"""Fixtures of the CRI tests: a graftd with the OCI agent and a private containerd node (module
scope: starting containerd and importing the images takes a few seconds)."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.runtime.common import Graftd


def _why_no_containerd() -> str | None:
    for tool in ("containerd", "ctr", "runc", "gcc", "iptables-save"):
        if not shutil.which(tool):
            return f"{tool} is not installed (scripts/setup installs it)"
    if not os.path.isdir("/usr/lib/cni") or not os.path.exists("/usr/lib/cni/bridge"):
        return "the CNI reference plugins are not installed (Debian's containernetworking-plugins)"
    if os.geteuid() != 0:
        return "containerd's CRI needs root"
    try:
        import grpc  # noqa: F401
    except ImportError:
        return "grpcio is not installed (pip install -e .[test])"
    return None


@pytest.fixture(scope="module")
def k8s_graftd(tmp_path_factory):
    d = Graftd(str(tmp_path_factory.mktemp("graftd")), metrics=True)
    yield d
    d.close()


@pytest.fixture(scope="module")
def node(k8s_graftd):
    why = _why_no_containerd()
    if why:
        pytest.skip(f"no CRI node: {why}")
    from tests.k8s.node import Node

    try:
        n = Node(k8s_graftd)
    except RuntimeError as e:  # containerd did not start or answer: say why
        pytest.skip(f"containerd cannot start here: {e}")
    yield n
    n.close()
