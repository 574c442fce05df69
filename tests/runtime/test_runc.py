"""runc directly, with a bundle, through graft-runtime: the lifecycle containerd and conmon drive."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from tests.runtime.common import GRAFT_RUNTIME
from tests.runtime.conftest import container_id

pytestmark = pytest.mark.e2e


def make_bundle(tmp_path, rootfs: str, args: list[str], annotations: dict[str, str]) -> str:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copytree(rootfs, bundle / "rootfs", symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = False
    config["root"]["readonly"] = False
    config["process"]["args"] = args
    config["annotations"] = annotations
    (bundle / "config.json").write_text(json.dumps(config))
    return str(bundle)


def runtime(graftd, root: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """graft-runtime as a container manager runs it. Output goes to files, not pipes: the
    container's init inherits them and would hold a pipe open after `create` returns."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.run([GRAFT_RUNTIME, "--root", root, *args], env=graftd.env(), stdout=out, stderr=err,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        out.seek(0)
        err.seek(0)
        p.stdout, p.stderr = out.read(), err.read()
    if check:
        assert p.returncode == 0, f"graft-runtime {' '.join(args)}: {p.stderr}"
    return p


def test_runc_bundle(tmp_path, rootfs, graftd, scenario):
    root = str(tmp_path / "runc-root")
    bundle = make_bundle(tmp_path, rootfs, scenario.command(), scenario.annotations())
    cid = container_id()
    runtime(graftd, root, "create", "--bundle", bundle, "--pid-file", str(tmp_path / "pid"), cid)
    try:
        config = json.loads(open(os.path.join(bundle, "config.json")).read())
        assert config["linux"]["seccomp"]["listenerPath"] == graftd.agent
        runtime(graftd, root, "start", cid)
        key = scenario.check(graftd)
        assert key == f"graft-{cid}"  # a named netns: `graft -n graft-ID show` works
    finally:
        runtime(graftd, root, "kill", cid, "KILL", check=False)
        for _ in range(50):
            if json.loads(runtime(graftd, root, "state", cid).stdout)["status"] == "stopped":
                break
        runtime(graftd, root, "delete", cid)
    scenario.check_gone(graftd, key)


def test_runc_run_foreground_cleans_up(tmp_path, rootfs, graftd):
    """`runc run` (foreground) ends with the container: graft-runtime removes its table then."""
    root = str(tmp_path / "runc-root")
    bundle = make_bundle(tmp_path, rootfs, ["sh", "-c", "ifconfig -a | grep -c Link"], {
        "io.sockgraft.endpoints": "web type ipv4 addr 127.0.0.1 port dynamic"})
    cid = container_id()
    p = runtime(graftd, root, "run", "--bundle", bundle, cid)
    assert p.stdout.strip() == "1"  # lo only
    assert not os.path.exists(os.path.join(graftd.state, "oci", cid + ".json"))
    assert not os.path.exists(f"/run/netns/graft-{cid}")
    assert all(c["key"] != f"graft-{cid}" for c in graftd.status()["containers"])


def test_bad_annotation_fails_create(tmp_path, rootfs, graftd):
    root = str(tmp_path / "runc-root")
    bundle = make_bundle(tmp_path, rootfs, ["true"], {"io.sockgraft.endpoints": "web type ipv4 addr 127.0.0.1 port 99999"})
    log = tmp_path / "runc.log"
    p = runtime(graftd, root, "--log", str(log), "--log-format", "json", "create", "-b", bundle, container_id(), check=False)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "io.sockgraft.endpoints" in p.stderr and "99999" in p.stderr
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "99999" in entry["msg"]
    assert not os.listdir(os.path.join(graftd.state, "oci"))


def test_host_network_refused(tmp_path, rootfs, graftd):
    root = str(tmp_path / "runc-root")
    bundle = make_bundle(tmp_path, rootfs, ["true"], {})
    config = json.loads(open(os.path.join(bundle, "config.json")).read())
    config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
    open(os.path.join(bundle, "config.json"), "w").write(json.dumps(config))
    p = runtime(graftd, root, "create", "-b", bundle, container_id(), check=False)
    assert p.returncode == 1 and "host network namespace" in p.stderr
