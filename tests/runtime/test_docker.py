"""Docker: Debian's dockerd (started here) runs the graft runtime: `docker run --runtime graft
--network none`. Docker 20.10 (API 1.41) cannot pass annotations (`--annotation` needs API 1.43),
so the table comes in the SOCKGRAFT_* environment variables graft-runtime also reads."""
from __future__ import annotations

import os

import pytest

from tests.runtime.engines import IMAGE, Dockerd

pytestmark = pytest.mark.e2e


def socket_holders(inode: int) -> set[int]:
    """Every process with an fd on this socket."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    out.add(int(pid))
            except OSError:
                continue
    return out


@pytest.fixture(scope="module")
def docker(tmp_path_factory, graftd, rootfs):
    d = Dockerd(str(tmp_path_factory.mktemp("docker")), graftd, rootfs)
    yield d
    d.close()


def test_docker_run_graft_runtime(docker, graftd, scenario):
    env = [a for k, v in scenario.env().items() for a in ("-e", f"{k}={v}")]
    cid = docker("run", "-d", "--runtime", "graft", "--network", "none", *env, IMAGE, *scenario.command()).stdout.strip()
    try:
        key = scenario.check(graftd)
        rec = [c for c in graftd.status()["containers"] if c["key"] == key][0]
        assert rec["oci_id"] == cid
        # no proxy: every process holding the host socket that serves 127.0.0.1:P is in the container
        (listener,) = [s for s in rec["sockets"] if s["local"] == f"127.0.0.1:{scenario.http_port}"]
        holders = socket_holders(listener["inode"])
        assert holders and all(os.stat(f"/proc/{pid}/ns/net").st_ino == rec["netns_ino"] for pid in holders)
    finally:
        docker("rm", "-f", cid)
    scenario.check_gone(graftd, key)


def test_docker_bad_table_is_one_line(docker, graftd):
    p = docker.cli + ["run", "--rm", "--runtime", "graft", "--network", "none",
                      "-e", "SOCKGRAFT_ENDPOINTS=web type ipv4 addr 127.0.0.1 port 99999", IMAGE, "true"]
    import subprocess

    r = subprocess.run(p, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "graft-runtime: annotation io.sockgraft.endpoints: " in r.stderr and "99999" in r.stderr
