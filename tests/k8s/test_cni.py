"""The `graft` CNI plugin run as a container runtime runs it (CNI_* environment, configuration on
stdin, result or error object on stdout) against real network namespaces: every verb, idempotence,
exact DEL, and one error object per bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from sockgraft.host.store import Store
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
        "ips": [{"address": "10.251.9.2/24", "interface": 0}], "dns": {}}


def plugin_cmd() -> list[str]:
    exe = shutil.which("graft-cni")
    return [exe] if exe else [sys.executable, "-m", "sockgraft.cni"]


def cni(command: str, conf: dict | str | None, netns: str | None = None, cid: str = "c1",
        ifname: str = "eth0", env: dict | None = None) -> tuple[int, dict | None, str]:
    """Run the plugin once with a bare environment, as a runtime does."""
    e = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_PATH": "/usr/lib/cni",
         "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod1"}
    if netns:
        e["CNI_NETNS"] = f"/run/netns/{netns}"
    e.update(env or {})
    e = {k: v for k, v in e.items() if v is not None}
    data = conf if isinstance(conf, str) else json.dumps(conf or {})
    p = subprocess.run(plugin_cmd(), input=data, env=e, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr, p.stderr
    out = json.loads(p.stdout) if p.stdout.strip() else None
    if p.returncode != 0:  # one error object on stdout, one line on stderr
        assert len(p.stdout.strip().splitlines()) == 1 and set(out) >= {"cniVersion", "code", "msg"}
        assert p.stderr.strip() == f"graft: {out['msg']}"
    return p.returncode, out, p.stderr


def conf_for(state: str, mappings: list[dict], annotations: dict | None = None, **extra) -> dict:
    rc = {"portMappings": mappings}
    if annotations is not None:
        rc["io.kubernetes.cri.pod-annotations"] = annotations
    return {"cniVersion": "1.0.0", "name": "net", "type": "graft", "stateDir": state, "prevResult": PREV,
            "runtimeConfig": rc, **extra}


def table(state: str, netns: str) -> tuple[list[str], list[str], list[str]] | None:
    ino = os.stat(f"/run/netns/{netns}").st_ino
    with Store(state) as s:
        for row in s.containers():
            if row.netns_ino == ino:
                pol = s.policy(row.key)
                return (sorted(ep.line() for ep in pol.endpoints.values()), [str(p) for p in pol.ingress],
                        [str(r) for r in pol.egress])
    return None


def test_version():
    code, out, _ = cni("VERSION", None)
    assert code == 0 and "1.0.0" in out["supportedVersions"] and out["cniVersion"] == "1.0.0"


def test_add_check_del_idempotent(state_dir, make_netns):
    ns = make_netns()
    h = free_port()
    ann = {"io.sockgraft.endpoints": "out type ipv4 addr 127.0.0.1 port dynamic", "io.sockgraft.egress": "127.0.0.1/32=out",
           "other": "ignored"}
    # containerd writes the mapping's keys capitalised, the kubelet's CNI convention camel-case
    conf = conf_for(state_dir, [{"HostPort": h, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": ""},
                                {"hostPort": h, "containerPort": 8080, "protocol": "udp"},
                                {"hostPort": 0, "containerPort": 9090}], ann)
    code, out, _ = cni("ADD", conf, ns)
    assert code == 0 and out == dict(PREV)  # the previous result, passed on
    want = ([f"hp-{h} type ipv4 addr 127.0.0.1 port {h}", f"hp6-{h} type ipv6 addr ::1 port {h}",
             "out type ipv4 addr 127.0.0.1 port dynamic"],
            [f"0.0.0.0:8080=hp-{h}", f"[::]:8080=hp6-{h}"], ["127.0.0.1/32=out"])
    assert table(state_dir, ns) == want
    assert cni("ADD", conf, ns)[0] == 0 and table(state_dir, ns) == want  # again: the same
    assert cni("CHECK", conf, ns)[0] == 0
    # someone removed an endpoint: CHECK says what is missing
    subprocess.run(["graft", "-n", ns, "del", f"hp-{h}"], env=dict(os.environ, GRAFT_STATE_DIR=state_dir), check=True,
                   capture_output=True)
    code, out, _ = cni("CHECK", conf, ns)
    assert code == 1 and out["code"] == 102 and f"endpoint missing: hp-{h}" in out["msg"]
    assert cni("ADD", conf, ns)[0] == 0 and table(state_dir, ns) == want  # ADD repairs it
    # CHECK with another configuration than ADD's
    other = conf_for(state_dir, [{"hostPort": h, "containerPort": 8081}], ann)
    assert cni("CHECK", other, ns)[1]["code"] == 102
    assert cni("DEL", conf, ns)[0] == 0
    assert table(state_dir, ns) is None and os.listdir(os.path.join(state_dir, "cni")) == []
    assert cni("DEL", conf, ns)[0] == 0  # again: nothing to do
    assert cni("DEL", conf, None, env={"CNI_NETNS": None})[0] == 0  # DEL without a netns (it may be gone)
    code, out, _ = cni("CHECK", conf, ns)
    assert out["code"] == 102 and "no graft table was added" in out["msg"]


def test_del_removes_only_what_add_wrote(state_dir, make_netns):
    """A table that graft-runtime registered first keeps its own endpoints and rules."""
    ns = make_netns()
    h = free_port()
    env = dict(os.environ, GRAFT_STATE_DIR=state_dir)
    subprocess.run(["graft", "-n", ns, "add", "mine", "type", "ipv4", "addr", "127.0.0.1", "port", "dynamic"],
                   env=env, check=True, capture_output=True)
    conf = conf_for(state_dir, [{"hostPort": h, "containerPort": 80}], hostIPv6="")
    assert cni("ADD", conf, ns)[0] == 0
    assert table(state_dir, ns)[0] == [f"hp-{h} type ipv4 addr 127.0.0.1 port {h}", "mine type ipv4 addr 127.0.0.1 port dynamic"]
    assert cni("DEL", conf, ns)[0] == 0
    assert table(state_dir, ns) == (["mine type ipv4 addr 127.0.0.1 port dynamic"], [], [])


def test_host_port_of_another_pod_is_refused(state_dir, make_netns):
    a, b = make_netns(), make_netns()
    h = free_port()
    conf = conf_for(state_dir, [{"hostPort": h, "containerPort": 8080}])
    assert cni("ADD", conf, a, cid="pod-a")[0] == 0
    code, out, _ = cni("ADD", conf, b, cid="pod-b")
    assert code == 1 and out["code"] == 101
    assert f"127.0.0.1 port {h}) is already granted to" in out["msg"]
    assert table(state_dir, b) is None  # nothing half-written
    assert cni("DEL", conf, b, cid="pod-b")[0] == 0 and table(state_dir, a) is not None
    assert cni("DEL", conf, a, cid="pod-a")[0] == 0


@pytest.mark.parametrize("conf, env, code, words", [
    ("{not json", {}, 6, "not JSON"),
    ({"cniVersion": "9.9.9"}, {}, 1, "cniVersion '9.9.9' is not supported"),
    ({"cniVersion": "1.0.0", "runtimeConfig": {"portMappings": [{"hostPort": 70000, "containerPort": 1}]}}, {}, 7,
     "hostPort 70000 is not a port number"),
    ({"cniVersion": "1.0.0", "runtimeConfig": {"portMappings": [{"hostPort": 8, "containerPort": 0}]}}, {}, 7,
     "hostPort 8 without a containerPort"),
    ({"cniVersion": "1.0.0", "runtimeConfig": {"portMappings": [{"hostPort": 8, "containerPort": 8, "protocol": "sctp"}]}},
     {}, 7, "cannot be grafted"),
    ({"cniVersion": "1.0.0", "runtimeConfig": {"portMappings": [{"hostPort": 8, "containerPort": 8, "hostIP": "nowhere"}]}},
     {}, 7, "hostIP 'nowhere' is not an IP address"),
    ({"cniVersion": "1.0.0", "hostIP": "::1"}, {}, 7, "hostIP must be an IPv4 address"),
    ({"cniVersion": "1.0.0", "stateDir": "relative"}, {}, 7, "stateDir must be an absolute path"),
    ({"cniVersion": "1.0.0", "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"io.sockgraft.egress": "10.0.0.0/8=nope"}}},
     {}, 7, "names endpoint 'nope'"),
    ({"cniVersion": "1.0.0"}, {"CNI_CONTAINERID": None}, 4, "CNI_CONTAINERID is not set"),
    ({"cniVersion": "1.0.0"}, {"CNI_COMMAND": "FROB"}, 4, "'FROB' is not one of"),
])
def test_bad_input_gives_one_error_object(state_dir, ns, conf, env, code, words):
    if isinstance(conf, dict):
        conf = {"stateDir": state_dir, **conf}
    env = dict(env)
    got, out, _ = cni(env.pop("CNI_COMMAND", "ADD"), conf, ns, env=env)
    assert got == 1 and out["code"] == code and words in out["msg"], out
