"""Pods through containerd's CRI (`runtime.v1`, the calls the kubelet makes): the runtime handler
`graft` (graft-runtime) with the `graft` CNI plugin serves a pod on its hostPort with no DNAT and
no proxy; a plain runc pod with the standard portmap plugin runs beside it on the same containerd.

CRI calls made here: Version, ImageStatus, RunPodSandbox, PodSandboxStatus, ListPodSandbox,
CreateContainer, StartContainer, ContainerStatus, ExecSync, StopContainer, RemoveContainer,
StopPodSandbox, RemovePodSandbox."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request

import grpc
import pytest

from sockgraft.host.netns import pids_in_netns
from tests.helpers import free_port, graftd as start_graftd, wait_for
from tests.k8s import images
from tests.k8s.cri import M
from tests.runtime.common import HostServer

pytestmark = pytest.mark.e2e

GRAFT, RUNC = "graft", "runc"


def get(port: int, timeout: float = 15) -> str:
    """GET / on host loopback port `port`, retrying until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3) as r:
                return r.read().decode()
        except OSError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"127.0.0.1:{port}: {e}")
            time.sleep(0.1)


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


class Pod:
    """One pod as the kubelet makes it: sandbox (with port mappings, annotations) + containers."""

    def __init__(self, node, name: str, handler: str, host_port: int | None, annotations: dict | None = None,
                 command: list[str] | None = None):
        self.node, self.name = node, name
        mappings = [M["PortMapping"](protocol=0, container_port=8080, host_port=host_port)] if host_port else []
        self.config = M["PodSandboxConfig"](
            metadata=M["PodSandboxMetadata"](name=name, namespace="sgk", uid=f"uid-{name}-{os.getpid()}"),
            hostname=name, port_mappings=mappings, annotations=annotations or {},
            labels={"app": name}, log_directory=os.path.join(node.base, "logs", name))
        self.id = node.cri.RunPodSandbox(config=self.config, runtime_handler=handler).pod_sandbox_id
        node.remember(sandbox=self.id)
        self.containers: list[str] = []
        if command is not None:
            self.run("web", command)

    def run(self, name: str, command: list[str]) -> str:
        cfg = M["ContainerConfig"](metadata=M["ContainerMetadata"](name=name),
                                   image=M["ImageSpec"](image=images.BUSYBOX_IMAGE),
                                   command=command, log_path=f"{name}.log")
        cid = self.node.cri.CreateContainer(pod_sandbox_id=self.id, config=cfg, sandbox_config=self.config).container_id
        self.node.remember(container=cid)
        self.node.cri.StartContainer(container_id=cid)
        self.containers.append(cid)
        return cid

    def status(self):
        return self.node.cri.PodSandboxStatus(pod_sandbox_id=self.id, verbose=True)

    def pid(self) -> int:
        return json.loads(self.status().info["info"])["pid"]

    def netns_ino(self) -> int:
        return os.stat(f"/proc/{self.pid()}/ns/net").st_ino

    def exec(self, *cmd: str, timeout: int = 15):
        return self.node.cri.ExecSync(container_id=self.containers[0], cmd=list(cmd), timeout=timeout)

    def remove(self, containers_first: bool = True) -> None:
        """As the kubelet tears a pod down; without `containers_first`, StopPodSandbox and
        RemovePodSandbox alone (they must stop and remove the containers themselves)."""
        for cid in self.containers if containers_first else ():
            self.node.cri.StopContainer(container_id=cid, timeout=2)
            self.node.cri.RemoveContainer(container_id=cid)
        self.node.cri.StopPodSandbox(pod_sandbox_id=self.id)
        self.node.cri.RemovePodSandbox(pod_sandbox_id=self.id)


HTTPD = ["httpd", "-f", "-p", "8080", "-h", "/www"]  # busybox binds [::]:8080, dual-stack


def nat_rules_for(port: int) -> list[str]:
    """Rules of the nftables ruleset (iptables-nft writes there too) that DNAT connections to `port`:
    portmap's per-pod rule matches the host port (`dport H`) and jumps to its DNAT chain."""
    out = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, timeout=30).stdout
    return [line for line in out.splitlines()
            if re.search(rf"\bdport {port}\b", line) and re.search(r"dnat|DN-|HOSTPORT", line, re.I)]


def listener_of(port: int) -> tuple[int, str]:
    """The pid (and its name) holding the host's listening socket on 127.0.0.1:port (v4 or v4-mapped)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                w = line.split()
                if w[3] == "0A" and int(w[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(w[9])
    assert inodes, f"nothing listens on port {port} in the host netns"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    with open(f"/proc/{pid}/comm") as f:
                        return int(pid), f.read().strip()
        except OSError:
            continue
    raise AssertionError(f"no process holds the listener on {port}")


def restart_graftd(g) -> None:
    """kill -9 graftd and start it again on the same state and runtime dirs."""
    g.proc.send_signal(signal.SIGKILL)
    g.proc.wait()
    g.proc = start_graftd(g.state, g.runtime, "--metrics", f"127.0.0.1:{g.metrics_port}", log=g._logf)


def test_graft_pods_on_their_host_ports(node, k8s_graftd):
    g = k8s_graftd
    assert node.cri.Version(version="v1").runtime_name == "containerd"
    assert node.cri.ImageStatus(image=M["ImageSpec"](image=images.BUSYBOX_IMAGE)).image.id
    h1, h2 = free_port(), free_port()
    host = HostServer()  # a host service on 127.0.0.1 that the egress rule names
    ticks = HostServer()  # another one, reached by a pod's container every 0.2 s across the restart
    other = socket.socket()  # one on 127.0.0.2 that no rule names
    other.bind(("127.0.0.2", 0))
    other.listen(4)
    other.settimeout(0.5)
    egress = {"io.sockgraft.endpoints": "out type ipv4 addr 127.0.0.1 port dynamic",
              "io.sockgraft.egress": "127.0.0.1/32=out"}
    pods: list[Pod] = []
    try:
        a = Pod(node, "web-a", GRAFT, h1, egress, HTTPD)
        pods.append(a)
        # the host gets the page on 127.0.0.1:H, from the pod's own httpd: no DNAT, no proxy
        assert get(h1) == images.PAGE
        assert nat_rules_for(h1) == []
        pid, comm = listener_of(h1)
        assert comm == "httpd" and os.stat(f"/proc/{pid}/ns/net").st_ino == a.netns_ino()
        st = a.status().status
        assert st.network.ip.startswith(node.subnet_graft.rsplit(".", 1)[0] + ".")  # the pod network (bridge + host-local) is there too
        # the table: hostPort endpoints and pairs from CNI, egress from the pod annotation
        key = f"netns:{a.netns_ino()}"
        shown = subprocess.run(["graft", "--pid", str(pid), "show"], env=g.env(), capture_output=True,
                               text=True, timeout=30).stdout
        assert f"hp-{h1} type ipv4 addr 127.0.0.1 port {h1}" in shown and "out type ipv4 addr 127.0.0.1 port dynamic" in shown
        # every container of the pod is supervised (pause and web); status names them the CRI way
        wait_for(lambda: g.graftd_view()["seccomp_listeners"].get(key) == 2, 10, "graftd to supervise pause and web")
        (c,) = [c for c in g.status()["containers"] if c["key"] == key]
        assert c["mode"] == "seccomp"
        assert sorted(c["cri"]) == ["sgk/web-a", "sgk/web-a/web"]
        assert any(s["state"] == "LISTEN" and s["local"].endswith(f":{h1}") for s in c["sockets"])
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{g.metrics_port}/metrics", timeout=5).read().decode()
        assert f'sockgraft_pod_info{{container="{key}",namespace="sgk",pod="web-a"}} 1.0' in metrics

        # egress: the annotation's rule reaches the host service; an unmapped destination does not
        r = a.exec("sh", "-c", f"echo hello-from-pod | nc 127.0.0.1 {host.port}")
        assert r.exit_code == 0, r.stderr
        peer, data = host.wait()
        assert data == b"hello-from-pod\n" and peer[0] == "127.0.0.1"
        r = a.exec("sh", "-c", f"echo x | nc 127.0.0.2 {other.getsockname()[1]}")
        assert r.exit_code != 0  # 127.0.0.2 is the pod's own loopback: refused there
        with pytest.raises(socket.timeout):
            other.accept()

        # a second pod of the same spec on another hostPort runs beside it
        b = Pod(node, "web-b", GRAFT, h2, egress, HTTPD)
        pods.append(b)
        assert get(h2) == images.PAGE and get(h1) == images.PAGE
        # the first pod's hostPort again: refused by our CNI plugin, with its message
        with pytest.raises(grpc.RpcError) as err:
            pods.append(Pod(node, "web-c", GRAFT, h1, egress, HTTPD))
        msg = err.value.details()
        assert f"127.0.0.1 port {h1}" in msg and "already granted" in msg, msg
        assert [p.metadata.name for p in node.cri.ListPodSandbox().items if p.metadata.name == "web-c"
                and p.state == 0] == []
        assert get(h1) == images.PAGE

        # graftd restarts in the middle: both pods keep their tables and their host ports, a pod
        # started before the restart keeps being supervised (the listener keeper held its seccomp
        # listeners; the new graftd adopted them: its next trapped connect is served, not ENOSYS),
        # and a pod started afterwards is supervised by the new graftd
        a.run("ticker", ["sh", "-c", f"while :; do echo tick | nc 127.0.0.1 {ticks.port}; sleep 0.2; done"])
        wait_for(lambda: len(ticks.received) >= 2, 15, "the ticker's connects")
        restart_graftd(g)
        n0 = len(ticks.received)
        wait_for(lambda: len(ticks.received) >= n0 + 3, 15, "the ticker's connects after the restart")
        assert all(data == b"tick\n" and peer[0] == "127.0.0.1" for peer, data in ticks.received)
        adopt = g.wait_event(lambda e: e["event"] == "keeper-adopt")
        assert key in adopt["containers"] and adopt["listeners"] >= 5  # a: pause, web, ticker; b: pause, web
        assert g.graftd_view()["seccomp_listeners"].get(key) == 3
        assert get(h1) == images.PAGE and get(h2) == images.PAGE
        keys = {c["key"] for c in g.status()["containers"]}
        assert key in keys and f"netns:{b.netns_ino()}" in keys
        h3 = free_port()
        d = Pod(node, "web-d", GRAFT, h3, egress, HTTPD)
        pods.append(d)
        assert get(h3) == images.PAGE
        kd = f"netns:{d.netns_ino()}"
        wait_for(lambda: g.graftd_view()["seccomp_listeners"].get(kd) == 2, 10, "graftd to supervise the new pod")

        # stop and remove: no table rows, CNI or OCI records, sockets, netns or processes left
        for p in list(pods):
            ino, pid, netns_path = p.netns_ino(), p.pid(), json.loads(p.status().info["info"])["runtimeSpec"]
            netns_path = [n for n in netns_path["linux"]["namespaces"] if n["type"] == "network"][0]["path"]
            p.remove(containers_first=p is not d)
            pods.remove(p)
            assert not os.path.exists(netns_path)
            assert pids_in_netns(ino) == [] and not os.path.exists(f"/proc/{pid}")
        for port in (h1, h2, h3):
            assert refused(port)
        st = g.status()
        assert st["containers"] == [], st["containers"]
        assert os.listdir(os.path.join(g.state, "cni")) == [] and os.listdir(os.path.join(g.state, "oci")) == []
        assert wait_for(lambda: not g.graftd_view()["seccomp_listeners"], 10, "graftd to drop the listeners")
        assert [p for p in node.cri.ListPodSandbox().items] == []
    finally:
        for p in pods:
            try:
                p.remove()
            except grpc.RpcError:
                pass
        host.close()
        ticks.close()
        other.close()


def test_plain_runc_pod_beside_graft_pods(node, k8s_graftd):
    """The default handler (runc) with the standard bridge + portmap network: DNAT as usual, and
    graft never sees it."""
    h = free_port()
    before = {c["key"] for c in k8s_graftd.status()["containers"]}
    p = Pod(node, "plain", RUNC, h, {"io.sockgraft.endpoints": "x type ipv4 addr 127.0.0.1 port dynamic"}, HTTPD)
    try:
        assert get(h) == images.PAGE
        assert nat_rules_for(h), "portmap should have written its DNAT rule"
        assert {c["key"] for c in k8s_graftd.status()["containers"]} == before
        events = k8s_graftd.events()
        assert not [e for e in events if e.get("container_id") in (p.id, *p.containers)]
        r = p.exec("sh", "-c", "ifconfig eth0")
        assert node.subnet_std.rsplit(".", 1)[0] + "." in r.stdout.decode()
    finally:
        p.remove()
    assert refused(h)
