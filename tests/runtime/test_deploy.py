"""The deployment files: a structural schema check of the Kubernetes manifests (no cluster here),
the containerd snippet agreeing with the RuntimeClass, the Docker daemon.json and the systemd unit
agreeing with the commands they start."""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from sockgraft.cmd.graftd import cli as graftd_cli
from sockgraft.runtime import annotations
from sockgraft.host.paths import AGENT_SOCKET

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_yaml(name: str) -> list[dict]:
    with open(os.path.join(DEPLOY, "kubernetes", name)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


# A small structural schema: required keys and their types, nested; lists give their item schema.
OBJECT_META = {"name": str}
SCHEMAS = {
    ("node.k8s.io/v1", "RuntimeClass"): {"metadata": OBJECT_META, "handler": str},
    ("v1", "Pod"): {"metadata": OBJECT_META, "spec": {"containers": [{"name": str, "image": str}]}},
    ("apps/v1", "Deployment"): {
        "metadata": OBJECT_META,
        "spec": {"selector": {"matchLabels": dict},
                 "template": {"metadata": {"labels": dict}, "spec": {"containers": [{"name": str, "image": str}]}}},
    },
    ("apps/v1", "DaemonSet"): {
        "metadata": OBJECT_META,
        "spec": {"selector": {"matchLabels": dict},
                 "template": {"metadata": {"labels": dict},
                              "spec": {"containers": [{"name": str, "image": str}], "volumes": [{"name": str}]}}},
    },
}


def check(doc, schema, where: str) -> None:
    if isinstance(schema, type):
        assert isinstance(doc, schema), f"{where}: expected {schema.__name__}, got {type(doc).__name__}"
    elif isinstance(schema, list):
        assert isinstance(doc, list) and doc, f"{where}: expected a non-empty list"
        for i, item in enumerate(doc):
            check(item, schema[0], f"{where}[{i}]")
    else:
        assert isinstance(doc, dict), f"{where}: expected a mapping"
        for key, sub in schema.items():
            assert key in doc, f"{where}: missing {key}"
            check(doc[key], sub, f"{where}.{key}")


def all_docs() -> list[dict]:
    return [d for name in sorted(os.listdir(os.path.join(DEPLOY, "kubernetes"))) if name.endswith(".yaml")
            for d in load_yaml(name)]


@pytest.mark.parametrize("doc", all_docs(), ids=lambda d: f"{d.get('kind')}/{d.get('metadata', {}).get('name')}")
def test_manifest_schema(doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in SCHEMAS, f"unexpected apiVersion/kind {key}"
    check(doc, SCHEMAS[key], doc["kind"])
    assert DNS1123.match(doc["metadata"]["name"])
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec", "handler", "scheduling", "overhead"}


def test_runtimeclass_matches_containerd_handler():
    (rc,) = [d for d in load_yaml("runtimeclass.yaml") if d["kind"] == "RuntimeClass"]
    with open(os.path.join(DEPLOY, "kubernetes", "containerd-graft.toml"), "rb") as f:
        toml = tomllib.load(f)
    runtimes = toml["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert rc["handler"] in runtimes
    rt = runtimes[rc["handler"]]
    assert rt["runtime_type"] == "io.containerd.runc.v2"
    assert rt["options"]["BinaryName"] == "/usr/local/bin/graft-runtime"
    assert "io.sockgraft.*" in rt["pod_annotations"] and "io.sockgraft.*" in rt["container_annotations"]
    assert rt["cni_conf_dir"] == CNI_CONF_DIR
    # the example Deployment asks for this class, serves on a hostPort, and its annotations are a table
    (dep,) = load_yaml("deployment-example.yaml")
    pod = dep["spec"]["template"]
    assert pod["spec"]["runtimeClassName"] == rc["metadata"]["name"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert not annotations.parse(pod["metadata"]["annotations"]).empty()
    (port,) = pod["spec"]["containers"][0]["ports"]
    assert 0 < port["hostPort"] < 65536 and port["containerPort"] in (8080,)
    assert "-p" in pod["spec"]["containers"][0]["command"]  # the container listens on containerPort
    node_label = rc["scheduling"]["nodeSelector"]
    (ds,) = load_yaml("graftd-daemonset.yaml")
    assert ds["spec"]["template"]["spec"]["nodeSelector"] == node_label


def test_daemonset_runs_graftd_where_the_runtime_looks():
    (ds,) = load_yaml("graftd-daemonset.yaml")
    spec = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert spec["hostNetwork"] is True and spec["hostPID"] is True  # host sockets, container processes
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert set(mounts.values()) <= set(volumes)
    for path, name in mounts.items():  # host paths seen at the same place inside
        assert volumes[name]["hostPath"]["path"] == path
    # graftd accepts these arguments, and its agent socket is the runtime's default listenerPath
    ctx = graftd_cli.make_context("graftd", list(c["args"]))
    assert os.path.join(ctx.params["runtime_dir"], "agent.sock") == AGENT_SOCKET
    assert ctx.params["runtime_dir"] in mounts and ctx.params["state_dir"] in mounts
    port = int(ctx.params["metrics"].rsplit(":", 1)[1])
    assert c["livenessProbe"]["httpGet"]["port"] == port


def test_docker_daemon_json():
    with open(os.path.join(DEPLOY, "docker", "daemon.json")) as f:
        cfg = json.load(f)
    rt = cfg["runtimes"]["graft"]
    assert rt["path"] == "/usr/local/bin/graft-runtime" and os.access(rt["path"], os.X_OK)
    args = rt["runtimeArgs"]
    assert args[args.index("--graft-agent") + 1] == AGENT_SOCKET


def test_systemd_unit():
    path = os.path.join(DEPLOY, "graftd.service")
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(path)
    exec_start = unit["Service"]["ExecStart"].split()
    assert exec_start[0] == "/usr/local/bin/graftd" and os.access(exec_start[0], os.X_OK)
    ctx = graftd_cli.make_context("graftd", exec_start[1:])
    assert os.path.join(ctx.params["runtime_dir"], "agent.sock") == AGENT_SOCKET
    assert ctx.params["metrics"].startswith("127.0.0.1:")
    assert unit["Service"]["KillMode"] == "process"  # the listener keeper outlives a graftd restart
    if shutil.which("systemd-analyze"):
        p = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr


CNI_CONF_DIR = "/etc/cni/net.d/graft"  # install-node.sh's default, containerd-graft.toml's cni_conf_dir


def test_conflist_chains_graft_after_the_interface():
    with open(os.path.join(DEPLOY, "kubernetes", "graft.conflist")) as f:
        conf = json.load(f)
    assert conf["cniVersion"] == "1.0.0"
    types = [p["type"] for p in conf["plugins"]]
    assert types == ["bridge", "graft"]  # containerd's CRI needs an eth0 with an address; graft is chained after
    graft = conf["plugins"][1]
    assert graft["capabilities"] == {"portMappings": True, "io.kubernetes.cri.pod-annotations": True}
    (ds,) = load_yaml("graftd-daemonset.yaml")
    ctx = graftd_cli.make_context("graftd", list(ds["spec"]["template"]["spec"]["containers"][0]["args"]))
    assert graft["stateDir"] == ctx.params["state_dir"]
    # the init container installs it where containerd-graft.toml looks
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"]["path"] for v in ds["spec"]["template"]["spec"]["volumes"]}
    root = {e["name"]: e["value"] for e in init["env"]}["NODE_ROOT"]
    for node_path in ("/opt/cni/bin", "/usr/local/bin", CNI_CONF_DIR, "/opt/sockgraft"):
        assert any(node_path.startswith(volumes[name]) and path == root + volumes[name] for path, name in mounts.items()), node_path


def test_install_node_script(tmp_path):
    """install-node.sh puts a working graft-runtime and CNI plugin in place (here: from this
    machine's Python, through a prefix of links; paths under tmp instead of the node's)."""
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    real = os.path.realpath(sys.executable)
    os.symlink(real, prefix / "bin" / os.path.basename(real))
    os.symlink(os.path.join(sys.base_prefix, "lib"), prefix / "lib")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NODE_ROOT": "", "SOCKGRAFT_PREFIX": str(prefix),
           "SOCKGRAFT_DIR": str(tmp_path / "opt" / "sockgraft"), "RUNTIME_BIN_DIR": str(tmp_path / "bin"),
           "CNI_BIN_DIR": str(tmp_path / "cni"), "CNI_CONF_DIR": str(tmp_path / "conf")}
    script = os.path.join(DEPLOY, "kubernetes", "install-node.sh")
    for _ in range(2):  # again: an update in place
        p = subprocess.run(["sh", script], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    # the plugin with the bare environment a runtime gives it
    p = subprocess.run([str(tmp_path / "cni" / "graft")], env={"CNI_COMMAND": "VERSION"}, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "1.0.0" in json.loads(p.stdout)["supportedVersions"]
    p = subprocess.run([str(tmp_path / "bin" / "graft-runtime"), "--version"], env={"PATH": "/usr/sbin:/usr/bin"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("runc version"), p.stderr  # everything else is runc's
    with open(tmp_path / "conf" / "10-graft.conflist") as f:
        assert json.load(f)["plugins"][1]["type"] == "graft"
