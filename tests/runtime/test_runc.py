"""runc directly, with a bundle, through graft-runtime: the lifecycle containerd and conmon drive."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import socket
import tempfile
import urllib.request

import pytest

from sockgraft.runtime import ociconfig
from tests.helpers import free_port
from tests.runtime.common import GRAFT_RUNTIME, PAGE, HostServer, http_get
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
        assert key == f"graft-oci-{cid}"  # a named netns: `graft -n graft-oci-ID show` works
        check_metrics(graftd)
        text = subprocess.run(["graft", "status", "--state-dir", graftd.state, "--runtime-dir", graftd.runtime],
                              capture_output=True, text=True, timeout=30).stdout.splitlines()
        assert text[0].startswith("graftd: pid ") and f"metrics 127.0.0.1:{graftd.metrics_port}" in text[0]
        (line,) = [i for i, t in enumerate(text) if t.startswith(f"{key} mode seccomp oci {cid} ")]
        assert f"  tcp 127.0.0.1:{scenario.http_port} LISTEN pid " in "\n".join(text[line + 1:])
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
    assert not os.path.exists(f"/run/netns/graft-oci-{cid}")
    assert all(c["key"] != f"graft-oci-{cid}" for c in graftd.status()["containers"])


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


def scrape(graftd) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{graftd.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def check_metrics(graftd) -> None:
    m = scrape(graftd)
    assert m['sockgraft_grants_total{mode="seccomp",op="bind"}'] >= 1
    assert m['sockgraft_grants_total{mode="seccomp",op="connect"}'] >= 1
    assert m['sockgraft_denials_total{mode="seccomp",op="bind"}'] >= 1
    assert m['sockgraft_notification_latency_seconds_count{mode="seccomp"}'] >= 3
    assert m['sockgraft_active_containers{mode="seccomp"}'] >= 1
    assert m["sockgraft_supervised_containers"] >= 1


def test_agent_without_graft_runtime(tmp_path, rootfs, graftd):
    """A bundle that names graftd's agent itself (plain runc, no wrapper): the agent registers the
    table from the annotations under the new netns and forgets it when the container ends."""
    server = HostServer()
    try:
        bundle = make_bundle(tmp_path, rootfs, ["sh", "-c", f"echo via-agent | nc 127.0.0.1 {server.port}"], {
            "io.sockgraft.endpoints": "out type ipv4 addr 127.0.0.1 port dynamic",
            "io.sockgraft.egress": "127.0.0.0/8=out"})
        config = json.loads(open(os.path.join(bundle, "config.json")).read())
        ociconfig.merge_seccomp(config, graftd.agent)
        open(os.path.join(bundle, "config.json"), "w").write(json.dumps(config))
        p = subprocess.run(["runc", "--root", str(tmp_path / "root"), "run", "-b", bundle, container_id()],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert p.returncode == 0, p.stderr
        assert server.wait()[1] == b"via-agent\n"
        e = graftd.wait_event(lambda e: e["event"] == "grant" and e.get("endpoint") == "out" and
                              e["container"].startswith("netns:"))
        graftd.wait_event(lambda ev: ev["event"] == "agent-forget" and ev["container"] == e["container"])
        assert all(c["key"] != e["container"] for c in graftd.status()["containers"])
    finally:
        server.close()


def test_agent_refuses_what_is_not_a_seccomp_listener(graftd):
    r, w = os.pipe()
    try:
        state = {"ociVersion": "1.0.2", "fds": ["seccompFd"], "pid": os.getpid(),
                 "state": {"id": "fake", "status": "creating", "pid": os.getpid(), "bundle": "/"}}
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(graftd.agent)
            socket.send_fds(s, [json.dumps(state).encode()], [r])
        graftd.wait_event(lambda e: e["event"] == "agent-refused" and e["container_id"] == "fake"
                          and "not a seccomp listener" in e["error"])
    finally:
        os.close(r)
        os.close(w)


def test_pod_containers_share_one_table(tmp_path, rootfs, graftd):
    """Like a Kubernetes pod: a second container joins the first one's netns by path and shares
    its table; a different table is refused; the table goes with the last container."""
    root = str(tmp_path / "runc-root")
    ann = {"io.sockgraft.endpoints": "web type ipv4 addr 127.0.0.1 port dynamic"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    first, second, third = container_id(), container_id(), container_id()
    bundle_a = make_bundle(tmp_path / "a", rootfs, ["sleep", "600"], ann)
    runtime(graftd, root, "create", "-b", bundle_a, first)
    try:
        def joining(sub, annotations):
            bundle = make_bundle(tmp_path / sub, rootfs, ["sleep", "600"], annotations)
            config = json.loads(open(os.path.join(bundle, "config.json")).read())
            for ns in config["linux"]["namespaces"]:
                if ns["type"] == "network":
                    ns["path"] = f"/run/netns/graft-oci-{first}"
            open(os.path.join(bundle, "config.json"), "w").write(json.dumps(config))
            return bundle

        bad = runtime(graftd, root, "create", "-b", joining("c", {"io.sockgraft.endpoints": "x type ipv4 addr 127.0.0.1 port dynamic"}),
                      third, check=False)
        assert bad.returncode == 1 and "whose graft table differs" in bad.stderr
        runtime(graftd, root, "create", "-b", joining("b", {}), second)
        (shared,) = [c for c in graftd.status()["containers"] if c["key"] == f"graft-oci-{first}"]
        assert shared["oci_ids"] == [first, second]
        runtime(graftd, root, "delete", "--force", first)
        st = graftd.status()["containers"]
        assert [c["key"] for c in st if c["key"] == f"graft-oci-{first}"]  # still used by the second
        runtime(graftd, root, "delete", "--force", second)
        assert all(c["key"] != f"graft-oci-{first}" for c in graftd.status()["containers"])
    finally:
        for cid in (first, second):
            runtime(graftd, root, "delete", "--force", cid, check=False)


def test_exec_is_grafted_too(tmp_path, rootfs, graftd):
    """`runc exec` applies the container's profile: its listener reaches graftd under the same key."""
    root = str(tmp_path / "runc-root")
    port = free_port()
    bundle = make_bundle(tmp_path, rootfs, ["sleep", "600"], {
        "io.sockgraft.endpoints": f"http type ipv4 addr 127.0.0.1 port {port}",
        "io.sockgraft.ingress": "0.0.0.0:8080=http"})
    cid = container_id()
    runtime(graftd, root, "run", "-d", "-b", bundle, cid)
    try:
        runtime(graftd, root, "exec", "-d", cid, "httpd", "-p", "0.0.0.0:8080", "-h", "/www")
        assert http_get(port) == PAGE
        key = f"graft-oci-{cid}"
        assert graftd.graftd_view()["seccomp_listeners"][key] == 2
    finally:
        runtime(graftd, root, "delete", "--force", cid, check=False)
    assert key not in graftd.graftd_view()["seccomp_listeners"]


def test_start_refused_when_an_interface_appeared(tmp_path, rootfs, graftd):
    """An engine that plugs an interface into the netns graft-runtime made (Docker without
    --network none) would open a second way out: start is refused."""
    root = str(tmp_path / "runc-root")
    bundle = make_bundle(tmp_path, rootfs, ["sleep", "60"], {})
    cid = container_id()
    runtime(graftd, root, "create", "-b", bundle, cid)
    try:
        # a veth pair with both ends inside the container's netns (the host is never touched)
        subprocess.run(["ip", "-n", f"graft-oci-{cid}", "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
        p = runtime(graftd, root, "start", cid, check=False)
        assert p.returncode == 1
        assert p.stderr.startswith(f"graft-runtime: container {cid} has network interfaces besides lo (")
        assert p.stderr.endswith("): run it with --network none\n") and "v0" in p.stderr and "v1" in p.stderr
    finally:
        runtime(graftd, root, "delete", "--force", cid)
    assert not os.path.exists(f"/run/netns/graft-oci-{cid}")


def test_dual_stack_server_with_an_ipv4_annotation(tmp_path, rootfs, graftd):
    """busybox httpd binds [::]:8080 dual-stack; annotations hold only an IPv4 pair, which grafts it
    (the engine counts a V6ONLY-off [::] bind as the program's IPv4 listener)."""
    root = str(tmp_path / "runc-root")
    port = free_port()
    bundle = make_bundle(tmp_path, rootfs, ["httpd", "-f", "-p", "8080", "-h", "/www"], {
        "io.sockgraft.endpoints": f"ep type ipv4 addr 127.0.0.1 port {port}",
        "io.sockgraft.ingress": "0.0.0.0:8080=ep"})
    cid = container_id()
    runtime(graftd, root, "run", "-d", "-b", bundle, cid)
    try:
        assert http_get(port) == PAGE
        e = graftd.wait_event(lambda e: e["event"] == "grant" and e["op"] == "bind" and e["container"] == f"graft-oci-{cid}")
        assert e["addr"] == "::" and e["port"] == 8080 and "dual-stack" in e["reason"]
    finally:
        runtime(graftd, root, "delete", "--force", cid, check=False)
