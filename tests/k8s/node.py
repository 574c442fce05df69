"""A private Kubernetes node for the CRI tests: Debian's containerd (its CRI plugin built in) with its
own root, state, socket and config, two runtime handlers (`runc`, and `graft` = graft-runtime on the
test's graftd), two CNI networks (the handler `graft`'s conflist: bridge + host-local + our `graft`
plugin; the default one: bridge + host-local + the standard `portmap`), and the images the test
builds. Everything it makes is removed by `close()`; what a killed run left is swept by `sweep()`
at the next start (its pid is dead): processes by pid, mounts, netns, bridges, portmap's
iptables chains, cgroups, the ip_forward setting the bridge plugin turns on.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib

from sockgraft.host.netns import pid_alive
from tests.k8s import images
from tests.k8s.cri import Client

CNI_PLUGINS = "/usr/lib/cni"
INSTALLED_PLUGIN = "/opt/cni/bin/graft"  # scripts/setup puts it there
GRAFT_RUNTIME = "/usr/local/bin/graft-runtime"
BASE_PREFIX = "/tmp/sgk"  # /tmp/sgk<PID>: one node per test process
MARKS = "/run/sockgraft-k8s-tests"  # <PID>.json: what a run made outside its base, for sweep()
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "kubernetes")
NAT_CHAIN = re.compile(r"^(CNI-HOSTPORT-\w+|CNI-DN-\w+)$")


def _run(argv: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {p.stderr.strip()}")
    return p


# -- what lies outside the base dir: recorded, undone -------------------------------------------------
NAT_TABLES = (("ip", "nat"), ("ip6", "nat"))  # iptables-nft's, made by portmap and by listing them


def nat_tables() -> list[str]:
    """The iptables-nft nat tables there are (looked at with nft: iptables-save would make them)."""
    p = _run(["nft", "list", "tables"], check=False)
    return [f"{f} {n}" for f, n in NAT_TABLES if f"table {f} {n}" in p.stdout.splitlines()]


def remove_nat_tables(before: list[str]) -> None:
    """The nat tables this node made, once empty: an iptables-nft nat table, even with no rule,
    hooks NAT into the host's netns and so turns connection tracking on for all of its traffic."""
    for t in nat_tables():
        if t in before:
            continue
        p = _run(["nft", "list", "table", *t.split()], check=False)
        if p.returncode == 0 and not any(line.strip().startswith(("ip", "meta", "counter", "jump", "tcp", "udp"))
                                         for line in p.stdout.splitlines()):
            subprocess.run(["nft", "delete", "table", *t.split()], capture_output=True)


def nat_chains() -> set[str]:
    p = _run(["iptables-save", "-t", "nat"], check=False)
    return {line[1:].split()[0] for line in p.stdout.splitlines() if line.startswith(":") and NAT_CHAIN.match(line[1:].split()[0])}


def remove_nat_chains(chains: set[str]) -> None:
    """portmap's chains (its DEL leaves the shared CNI-HOSTPORT-* ones) and the jumps to them."""
    if not chains:
        return
    p = _run(["iptables-save", "-t", "nat"], check=False)
    for line in p.stdout.splitlines():
        if not line.startswith("-A "):
            continue
        words = shlex.split(line)
        if words[1] not in chains and "-j" in words and words[words.index("-j") + 1] in chains:
            subprocess.run(["iptables", "-t", "nat", "-D", *words[1:]], capture_output=True)
    for c in chains:
        subprocess.run(["iptables", "-t", "nat", "-F", c], capture_output=True)
    for c in chains:
        subprocess.run(["iptables", "-t", "nat", "-X", c], capture_output=True)


def _cgroup_dirs(ids: list[str]) -> list[str]:
    out = []
    for cid in ids:
        out += glob.glob(f"/sys/fs/cgroup/*/k8s.io/{cid}") + glob.glob(f"/sys/fs/cgroup/*/*/k8s.io/{cid}")
    return out


def _rmdir_cgroups(ids: list[str]) -> None:
    for d in sorted(_cgroup_dirs(ids), key=len, reverse=True):
        try:
            os.rmdir(d)
        except OSError:
            pass


def _kill_under(base: str) -> list[str]:
    """Kill (SIGKILL, by pid) every process whose command line names `base` (containerd, shims) and
    the shims' children; returns the container ids the shims served."""
    me, procs = os.getpid(), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        procs[int(pid)] = (ppid, cmd)
    ids, victims = [], []
    for pid, (_pp, cmd) in procs.items():
        if pid != me and any(base.encode() + b"/" in a or a == base.encode() for a in cmd):
            victims.append(pid)
            if b"-id" in cmd:
                ids.append(cmd[cmd.index(b"-id") + 1].decode())
    tree = set(victims)
    changed = True
    while changed:  # the containers under the shims, all the way down
        changed = False
        for pid, (pp, _c) in procs.items():
            if pp in tree and pid not in tree:
                tree.add(pid)
                changed = True
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return ids


def _unmount_under(base: str) -> None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for mp in sorted((m for m in points if m.startswith(base + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def undo(mark: dict, dead: bool = False) -> None:
    """Remove what a node (alive or dead) made outside and inside its base dir; for a dead run's
    node, also the graftd its test started (named by its state dir)."""
    base = mark["base"]
    if dead and mark.get("graftd_state"):
        _kill_under(mark["graftd_state"])
    ids = _kill_under(base) + mark.get("sandboxes", [])
    time.sleep(0.2)
    _unmount_under(base)
    for br in mark.get("bridges", []):
        subprocess.run(["ip", "link", "del", br], capture_output=True)
    remove_nat_chains(set(mark.get("nat_chains_made", [])) | (nat_chains() - set(mark.get("nat_chains_before", []))
                                                               if mark.get("nat_chains_before") is not None else set()))
    if mark.get("nat_tables_before") is not None:
        remove_nat_tables(mark["nat_tables_before"])
    _rmdir_cgroups(ids + mark.get("containers", []))
    for net in mark.get("networks", []):  # libcni's cache of each ADD: our networks, containerd's loopback
        for p in glob.glob(f"/var/lib/cni/results/{net}-*"):
            os.unlink(p)
    for sid in mark.get("sandboxes", []):
        for p in glob.glob(f"/var/lib/cni/results/cni-loopback-{sid}-*"):
            os.unlink(p)
    for d in mark.get("dirs_made", []):
        try:
            os.rmdir(d)
        except OSError:
            pass
    for sock in mark.get("shim_sockets", []):
        try:
            os.unlink(sock)
        except OSError:
            pass
    if mark.get("ip_forward") is not None:
        with open(IP_FORWARD, "w") as f:
            f.write(mark["ip_forward"])
    shutil.rmtree(base, ignore_errors=True)


def sweep() -> None:
    """Undo what killed runs left (their test process is dead)."""
    try:
        names = os.listdir(MARKS)
    except FileNotFoundError:
        return
    for name in names:
        m = re.match(r"^(\d+)\.json$", name)
        if not m or pid_alive(int(m[1])) and int(m[1]) != os.getpid():
            continue
        path = os.path.join(MARKS, name)
        try:
            with open(path) as f:
                mark = json.load(f)
            undo(mark, dead=True)
        except (OSError, ValueError):
            pass
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _toml_table(name: str, values: dict) -> str:
    """One TOML table of strings, booleans, integers and lists of strings."""
    lines = [f"[{name}]"]
    for k, v in values.items():
        lines.append(f"  {k} = {json.dumps(v)}")  # JSON's strings, true/false, numbers, lists are TOML's
    return "\n".join(lines) + "\n"


class Node:
    """containerd + CNI + images; `cri` is the CRI client."""

    def __init__(self, graftd, plugin: str | None = None):
        sweep()
        pid = os.getpid()
        self.base = f"{BASE_PREFIX}{pid}"
        shutil.rmtree(self.base, ignore_errors=True)
        os.makedirs(self.base)
        self.graftd = graftd
        self.sock = os.path.join(self.base, "containerd.sock")
        self.bridge_graft, self.bridge_std = f"sgkg{pid}"[:15], f"sgks{pid}"[:15]
        self.net_graft, self.net_std = f"sgk-graft-{pid}", f"sgk-std-{pid}"
        n = (pid % 120) * 2  # two /24s per test process: runs side by side do not share a subnet
        self.subnet_graft, self.subnet_std = f"10.251.{n}.0/24", f"10.251.{n + 1}.0/24"
        self.gateway_std = f"10.251.{n + 1}.1"
        with open(IP_FORWARD) as f:
            ip_forward = f.read().strip()
        self.mark = {"base": self.base, "graftd_state": graftd.state, "bridges": [self.bridge_graft, self.bridge_std],
                     "networks": [self.net_graft, self.net_std], "ip_forward": ip_forward,
                     "nat_tables_before": nat_tables(), "nat_chains_before": sorted(nat_chains()), "sandboxes": [], "containers": [], "shim_sockets": [],
                     # made by containerd and CNI if not there yet: removed again when empty
                     "dirs_made": [d for d in [*(os.path.join(c, "k8s.io") for c in glob.glob("/sys/fs/cgroup/*")),
                                               "/var/lib/cni/results", "/var/lib/cni"] if not os.path.exists(d)]}
        self._save_mark()
        self.plugin = plugin or self._plugin()
        self._layout()
        self.log = open(os.path.join(self.base, "containerd.log"), "w")
        self.proc = subprocess.Popen(["containerd", "--config", os.path.join(self.base, "config.toml")],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.cri = Client(self.sock)
        try:
            self._wait_ready()
            self._import_images()
        except BaseException:
            self.close()
            raise

    # -- setup ------------------------------------------------------------------------------------
    def _save_mark(self) -> None:
        os.makedirs(MARKS, mode=0o700, exist_ok=True)
        with open(os.path.join(MARKS, f"{os.getpid()}.json"), "w") as f:
            json.dump(self.mark, f)

    def _plugin(self) -> str:
        """The installed plugin; a shim with this interpreter when setup has not installed it."""
        if os.access(INSTALLED_PLUGIN, os.X_OK):
            return INSTALLED_PLUGIN
        shim = os.path.join(self.base, "graft-cni")
        with open(shim, "w") as f:
            f.write(f"#!/bin/sh\nexec {sys.executable} -m sockgraft.cni \"$@\"\n")
        os.chmod(shim, 0o755)
        return shim

    def conflist_graft(self) -> dict:
        """deploy/kubernetes/graft.conflist, pointed at this node's bridge, subnet, dirs and graftd;
        the bridge is no gateway here (no masquerading, no forwarding: the pods need no way out)."""
        with open(os.path.join(DEPLOY, "graft.conflist")) as f:
            conf = json.load(f)
        bridge, graft = conf["plugins"]
        assert (bridge["type"], bridge["ipam"]["type"], graft["type"]) == ("bridge", "host-local", "graft")
        conf["name"] = self.net_graft
        bridge.update(bridge=self.bridge_graft, isGateway=False, ipMasq=False)
        bridge["ipam"].update(ranges=[[{"subnet": self.subnet_graft}]], dataDir=os.path.join(self.base, "ipam"))
        graft["stateDir"] = self.graftd.state
        return conf

    def graft_runtime_section(self) -> dict:
        """The `graft` handler of deploy/kubernetes/containerd-graft.toml, pointed at this node."""
        with open(os.path.join(DEPLOY, "containerd-graft.toml"), "rb") as f:
            rt = tomllib.load(f)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["graft"]
        assert rt["options"]["BinaryName"] == GRAFT_RUNTIME
        rt["cni_conf_dir"] = os.path.join(self.base, "cni-graft")
        rt["options"].update(BinaryName=self.runtime_shim, Root=os.path.join(self.base, "runc"), SystemdCgroup=False)
        return rt

    def conflist_std(self) -> dict:
        return {"cniVersion": "1.0.0", "name": self.net_std, "plugins": [
            {"type": "bridge", "bridge": self.bridge_std, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet_std, "gateway": self.gateway_std}]],
                      "dataDir": os.path.join(self.base, "ipam")}},
            {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
        ]}

    def _layout(self) -> None:
        b = self.base
        bindir = os.path.join(b, "cni-bin")
        os.makedirs(bindir)
        for name in sorted(set(os.listdir(CNI_PLUGINS)) - {"graft"}):
            os.symlink(os.path.join(CNI_PLUGINS, name), os.path.join(bindir, name))
        os.symlink(self.plugin, os.path.join(bindir, "graft"))
        for d, conf in (("cni-graft", self.conflist_graft()), ("cni-std", self.conflist_std())):
            os.makedirs(os.path.join(b, d))
            with open(os.path.join(b, d, "10-net.conflist"), "w") as f:
                json.dump(conf, f, indent=1)
        self.runtime_shim = os.path.join(b, "graft-runtime")
        with open(self.runtime_shim, "w") as f:
            f.write(f"#!/bin/sh\nexec {GRAFT_RUNTIME} --graft-state-dir {self.graftd.state} "
                    f"--graft-agent {self.graftd.agent} \"$@\"\n")
        os.chmod(self.runtime_shim, 0o755)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{b}/root"
state = "{b}/state"
oom_score = 0
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  level = "info"
[{cri}]
  sandbox_image = "{images.PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
[{cri}.cni]
  bin_dir = "{bindir}"
  conf_dir = "{b}/cni-std"
  max_conf_num = 1
[{cri}.containerd]
  default_runtime_name = "runc"
  snapshotter = "overlayfs"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  Root = "{b}/runc"
"""
        rt = self.graft_runtime_section()
        options = rt.pop("options")
        config += _toml_table(f"{cri}.containerd.runtimes.graft", rt) + _toml_table(f"{cri}.containerd.runtimes.graft.options", options)
        with open(os.path.join(b, "config.toml"), "w") as f:
            f.write(config)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}: {self.log_tail()}")
            try:
                self.cri.Version(_timeout=2, version="v1")
                return
            except Exception as e:  # grpc.RpcError until it serves
                if time.monotonic() > deadline:
                    raise RuntimeError(f"containerd's CRI does not answer ({e}): {self.log_tail()}") from None
                time.sleep(0.2)

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log.name) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def _import_images(self) -> None:
        work = os.path.join(self.base, "images")
        os.makedirs(work)
        for archive in (images.busybox_archive(work), images.pause_archive(work)):
            _run(["ctr", "--address", self.sock, "-n", "k8s.io", "images", "import", archive], timeout=120)

    # -- helpers for the tests --------------------------------------------------------------------
    def remember(self, sandbox: str | None = None, container: str | None = None) -> None:
        """Ids whose cgroups and shim sockets a sweep must be able to remove."""
        for kind, cid in (("sandboxes", sandbox), ("containers", container)):
            if cid and cid not in self.mark[kind]:
                self.mark[kind].append(cid)
                # the shim's socket: containerd 1.6 names it by sha256(address/namespace/id)
                h = hashlib.sha256(os.path.join(self.sock, "k8s.io", cid).encode()).hexdigest()
                self.mark["shim_sockets"].append(f"/run/containerd/s/{h}")
        self._save_mark()

    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run(["ctr", "--address", self.sock, "-n", "k8s.io", *args], timeout=timeout)

    def close(self) -> None:
        try:
            for item in self.cri.ListPodSandbox(_timeout=10).items:  # a test that failed midway
                try:
                    self.cri.StopPodSandbox(_timeout=30, pod_sandbox_id=item.id)
                    self.cri.RemovePodSandbox(_timeout=30, pod_sandbox_id=item.id)
                except Exception:
                    pass
        except Exception:
            pass
        self.cri.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if os.environ.get("SGK_KEEP_LOG"):
            shutil.copy(self.log.name, os.environ["SGK_KEEP_LOG"])
        undo(self.mark)
        try:
            os.unlink(os.path.join(MARKS, f"{os.getpid()}.json"))
            os.rmdir(MARKS)  # the last node of all
        except OSError:
            pass
