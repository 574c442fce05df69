"""Topologies for `graft bench`, built by code and always torn down.

Every object this module creates carries the name prefix ``sgb<PID>`` (netns, links, nft table,
state dir) and every process it starts carries ``SGB_OWNER=<PID>`` in its environment, where PID is
the bench process. `sweep()` removes what a killed earlier run left behind: objects whose owner pid
is dead.

Sides: ``host`` is the host netns; ``c1`` and ``c2`` are two containers. A topology starts a
command on a side (`popen`) and tells a client where a server on another side is reached (`target`);
before any client starts it checks that the destination is loopback or routes via its own links.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from sockgraft.host import netns as sg_netns
from sockgraft.host.netns import pid_alive as alive

PREFIX = "sgb"
OWNER_ENV = "SGB_OWNER"
LOCK_PATH = "/run/sockgraft-bench.lock"
FORWARD_STATE = "/run/sockgraft-bench.ip_forward.json"
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")
SIDES = ("host", "c1", "c2")
_NETNS_SERIAL = itertools.count(1)


class TopologyError(Exception):
    """A topology cannot be built or used safely."""


def tag(pid: int | None = None) -> str:
    return f"{PREFIX}{os.getpid() if pid is None else pid}"


def owner_of(name: str) -> int | None:
    m = re.match(rf"^{PREFIX}(\d+)", name)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def _locked():
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _alarm(seconds: int, what: str):
    """Never hang forever in a netlink call: SIGALRM turns into a TopologyError."""
    def fire(_s, _f):
        raise TopologyError(f"timed out after {seconds}s {what}")

    try:
        old = signal.signal(signal.SIGALRM, fire)
    except ValueError:  # not the main thread: no watchdog
        yield
        return
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _sh(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), capture_output=True, text=True, input=input)
    if check and p.returncode != 0:
        raise TopologyError(f"{' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p


# -- ip_forward: shared by concurrent bench runs, restored by the last one ------------------------------
def _forward_path() -> str:
    return "/proc/sys/net/ipv4/ip_forward"


def _read_forward() -> str:
    with open(_forward_path()) as f:
        return f.read().strip()


def _write_forward(value: str) -> None:
    with open(_forward_path(), "w") as f:
        f.write(value)


def _forward_update(add: int | None = None, remove: int | None = None) -> None:
    """Owners of ip_forward=1 are listed in FORWARD_STATE with the value found before the first."""
    with _locked():
        try:
            with open(FORWARD_STATE) as f:
                state = json.load(f)
        except (FileNotFoundError, ValueError):
            state = None
        if state is None:
            if add is None:
                return
            state = {"original": _read_forward(), "owners": []}
        owners = [p for p in state["owners"] if alive(p) and p != remove]
        if add is not None and add not in owners:
            owners.append(add)
        if owners:
            state["owners"] = owners
            with open(FORWARD_STATE, "w") as f:
                json.dump(state, f)
            _write_forward("1")
        else:
            _write_forward(state["original"])
            os.unlink(FORWARD_STATE)


# -- debris of killed runs ---------------------------------------------------------------------------
def _proc_owner(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(OWNER_ENV.encode() + b"="):
            try:
                return int(item.split(b"=", 1)[1])
            except ValueError:
                return None
    return None


def owned_processes(owner: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _proc_owner(int(entry)) == owner:
            pids.append(int(entry))
    return pids


def debris(owner_alive=alive) -> dict[str, list]:
    """What earlier runs whose owner is dead left behind (or, with owner_alive=lambda p: False and a
    filter by the caller, what any run left)."""
    found: dict[str, list] = {"processes": [], "netns": [], "links": [], "nft": [], "dirs": []}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            owner = _proc_owner(int(entry))
            if owner is not None and owner != os.getpid() and not owner_alive(owner):
                found["processes"].append(int(entry))
    with contextlib.suppress(FileNotFoundError):
        found["netns"] = [n for n in os.listdir("/run/netns") if (o := owner_of(n)) and not owner_alive(o)]
    for link in json.loads(_sh("ip", "-j", "link", "show").stdout or "[]"):
        o = owner_of(link["ifname"])
        if o and not owner_alive(o):
            found["links"].append(link["ifname"])
    tables = json.loads(_sh("nft", "-j", "list", "tables").stdout or '{"nftables": []}')["nftables"]
    for t in tables:
        if "table" in t and (o := owner_of(t["table"]["name"])) and not owner_alive(o):
            found["nft"].append((t["table"]["family"], t["table"]["name"]))
    tmp = tempfile.gettempdir()
    for d in os.listdir(tmp):
        if (o := owner_of(d)) and not owner_alive(o) and os.path.isdir(os.path.join(tmp, d)):
            found["dirs"].append(os.path.join(tmp, d))
    return found


def sweep() -> dict[str, list]:
    """Remove the debris of killed earlier runs (owner pid dead); returns what was removed."""
    found = debris()
    for pid in found["processes"]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in found["netns"]:
        sg_netns.remove(name)
    for name in found["links"]:
        _sh("ip", "link", "del", name, check=False)
    for family, name in found["nft"]:
        _sh("nft", "delete", "table", family, name, check=False)
    for d in found["dirs"]:
        shutil.rmtree(d, ignore_errors=True)
    _forward_update()  # drops dead owners, restores the original value if none is left
    return found


# -- processes ---------------------------------------------------------------------------------------
def _pdeathsig() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a process we started, and its process group (it leads a session of its own)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


@dataclass
class Listener:
    """Where a server on `side` listens inside its own view (bind address, port)."""

    side: str
    bind: str
    port: int


class Topology:
    """Base: both ends anywhere in the host netns over loopback."""

    name = "native"
    kind = "native"
    graft_api = False  # peers written in Python use sockgraft's API in this topology
    binaries = True  # unmodified binaries can run here
    mtu: int | None = 65536  # MTU on the data path (lo)

    def __init__(self, state_dir: str | None = None):
        self.procs: list[subprocess.Popen] = []
        self.state_dir = state_dir

    # lifecycle
    def unavailable(self) -> str | None:
        """Why this topology cannot run on this machine, or None."""
        return None

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        for p in self.procs:
            stop(p)
        self.procs.clear()

    def na(self, workload_kind: str) -> str | None:
        """Why a workload kind makes no sense here, or None."""
        return None

    # addressing
    def listen(self, side: str, port: int) -> Listener:
        return Listener(side, "127.0.0.1", port)

    def target(self, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
        return "127.0.0.1", listener.port

    def check_route(self, client_side: str, addr: str) -> None:
        """Refuse any destination that is not loopback (or, in subclasses, our own links)."""
        if not ipaddress.ip_address(addr).is_loopback:
            raise TopologyError(f"refusing non-loopback destination {addr} in topology {self.name}")

    # processes
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[OWNER_ENV] = str(os.getpid())
        return env

    def command(self, side: str, cmd: list[str], ports: list[int]) -> list[str]:
        return cmd

    def preexec(self, side: str):
        return _pdeathsig

    def popen(self, side: str, cmd: list[str], ports: list[int] = (), **kw) -> subprocess.Popen:
        full = self.command(side, list(cmd), list(ports))
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(full, env=self.env(), preexec_fn=self.preexec(side), start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def run(self, side: str, cmd: list[str], ports: list[int] = (), timeout: float = 120, stderr: bool = False) -> str:
        """Run a client to completion; its stdout (and stderr after it, with stderr=True); raises on failure."""
        p = self.popen(side, cmd, ports, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(p)
            raise TopologyError(f"{shlex.join(cmd)} timed out after {timeout}s in {self.name}/{side}")
        finally:
            with contextlib.suppress(ValueError):
                self.procs.remove(p)
        if p.returncode != 0:
            last = (err or out).strip().splitlines()[-3:]
            raise TopologyError(f"{os.path.basename(cmd[0])} exited {p.returncode} in {self.name}/{side}: {' | '.join(last)}")
        return out + err if stderr else out

    def client_port(self, side: str) -> int:
        """A port a client on `side` may bind (the control-path bind benchmark)."""
        from sockgraft.bench.ports import free_port

        return free_port()

    def release(self, proc: subprocess.Popen) -> None:
        stop(proc)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def describe(self) -> str:
        return "both ends in the host netns over loopback"


class Nat(Topology):
    """docker0-like: a bridge, one veth per container netns, MASQUERADE for container egress, and a
    DNAT port publish (like `docker run -p`) for host->container."""

    kind = "nat"

    def __init__(self, state_dir: str | None = None, mtu: int = 1500, name: str | None = None):
        super().__init__(state_dir)
        self.mtu = mtu
        self.name = name or ("nat" if mtu == 1500 else f"nat-mtu{mtu}")
        self.suffix = "n" if mtu == 1500 else "m"
        self.tag = tag() + self.suffix
        self.bridge = f"{self.tag}br"
        self.table = self.tag
        self.netns = {"c1": f"{self.tag}-c1", "c2": f"{self.tag}-c2"}
        self.subnet: ipaddress.IPv4Network | None = None
        self.addr: dict[str, str] = {}
        self._undo: list = []
        self._published: dict[tuple[int, str], int] = {}
        self.counters_seen = False

    def describe(self) -> str:
        return (f"bridge {self.bridge} {self.subnet}, veth MTU {self.mtu}, nft table ip {self.table}: "
                "masquerade for container egress, DNAT publish host:HP -> container:P")

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = []
        for r in json.loads(_sh("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]"):
            dst = r.get("dst")
            if dst and dst != "default":
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False))
        for a in json.loads(_sh("ip", "-j", "-4", "addr").stdout or "[]"):
            for info in a.get("addr_info", []):
                used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
        subnets = list(SUBNET_POOL.subnets(new_prefix=24))
        start = os.getpid() % len(subnets)
        for i in range(len(subnets)):
            net = subnets[(start + i) % len(subnets)]
            if not any(net.overlaps(u) for u in used):
                return net
        raise TopologyError(f"no free /24 in {SUBNET_POOL}")

    def setup(self) -> None:
        _forward_update(add=os.getpid())
        self._undo.append(lambda: _forward_update(remove=os.getpid()))
        with _locked(), _alarm(30, "building the nat topology (netlink)"):
            self.subnet = net = self._pick_subnet()
            hosts = list(net.hosts())
            self.addr = {"host": str(hosts[0]), "c1": str(hosts[1]), "c2": str(hosts[2])}
            for ns in self.netns.values():
                sg_netns.create(ns)
                self._undo.append(lambda ns=ns: sg_netns.remove(ns))
            self._links()
            for side, ns in self.netns.items():
                self._inside(side, ns)
        ruleset = f"""
table ip {self.table} {{
    chain pre {{ type nat hook prerouting priority dstnat; policy accept; }}
    chain out {{ type nat hook output priority -100; policy accept; }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {self.subnet} oifname != "{self.bridge}" counter masquerade
    }}
}}
"""
        _sh("nft", "-f", "-", input=ruleset)
        self._undo.append(lambda: _sh("nft", "delete", "table", "ip", self.table, check=False))
        for side in ("c1", "c2"):
            self._check_dev(side, self.addr["host"])
        self._check_dev("host", self.addr["c1"])

    def _links(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            self._undo.append(lambda: _sh("ip", "link", "del", self.bridge, check=False))
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.link("set", index=br, mtu=self.mtu)
            ipr.addr("add", index=br, address=self.addr["host"], prefixlen=24)
            ipr.link("set", index=br, state="up")
            for side, ns in self.netns.items():
                host_if, cont_if = f"{self.tag}{side}", f"{self.tag}{side}x"
                ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": cont_if})
                self._undo.append(lambda n=host_if: _sh("ip", "link", "del", n, check=False))
                h = ipr.link_lookup(ifname=host_if)[0]
                c = ipr.link_lookup(ifname=cont_if)[0]
                ipr.link("set", index=h, mtu=self.mtu, master=br)
                ipr.link("set", index=c, mtu=self.mtu)
                ipr.link("set", index=c, net_ns_fd=ns)
                ipr.link("set", index=h, state="up")

    def _inside(self, side: str, ns: str) -> None:
        from pyroute2 import NetNS

        with NetNS(ns) as nsr:
            c = nsr.link_lookup(ifname=f"{self.tag}{side}x")[0]
            nsr.link("set", index=c, ifname="eth0")
            nsr.addr("add", index=c, address=self.addr[side], prefixlen=24)
            nsr.link("set", index=c, state="up")
            nsr.route("add", dst="default", gateway=self.addr["host"])

    def teardown(self) -> None:
        super().teardown()
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep going
                errors.append(str(e))
        if errors:
            raise TopologyError("teardown: " + "; ".join(errors))

    def listen(self, side: str, port: int) -> Listener:
        return Listener(side, self.addr["host"] if side == "host" else "0.0.0.0", port)

    def publish(self, listener: Listener, proto: str) -> int:
        """A host port DNATed to the container's listener (like `docker run -p HP:P`)."""
        key = (listener.port, listener.side)
        if key not in self._published:
            from sockgraft.bench.ports import free_port

            hp = free_port()
            cip = self.addr[listener.side]
            rule = (f"ip daddr {self.addr['host']} meta l4proto {{ tcp, udp }} th dport {hp} counter "
                    f"dnat to {cip}:{listener.port}")
            for chain in ("pre", "out"):
                _sh("nft", "add", "rule", "ip", self.table, chain, *shlex.split(rule))
            self._published[key] = hp
        return self._published[key]

    def target(self, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
        if listener.side == "host":
            return self.addr["host"], listener.port
        if client_side == "host":
            return self.addr["host"], self.publish(listener, proto)
        return self.addr[listener.side], listener.port

    def _check_dev(self, side: str, addr: str) -> None:
        cmd = ["ip", "-j", "route", "get", addr]
        if side != "host":
            cmd[1:1] = ["-n", self.netns[side]]
        routes = json.loads(_sh(*cmd).stdout)
        dev = routes[0].get("dev") if routes else None
        rtype = routes[0].get("type", "unicast") if routes else None
        if side == "host":
            ok = dev == self.bridge or (rtype == "local" and addr in self.addr.values())
        else:
            ok = dev == "eth0" or (rtype == "local" and addr == self.addr[side])
        if not ok:
            raise TopologyError(f"{addr} from {side} routes via {dev or rtype}, not via {self.bridge}: refusing")

    def check_route(self, client_side: str, addr: str) -> None:
        if addr not in self.addr.values():
            raise TopologyError(f"refusing destination {addr}: not an address of {self.name}")
        self._check_dev(client_side, addr)

    def command(self, side: str, cmd: list[str], ports: list[int]) -> list[str]:
        return cmd

    def preexec(self, side: str):
        if side == "host":
            return _pdeathsig
        path = sg_netns.netns_path(self.netns[side])

        def enter() -> None:
            _pdeathsig()
            sg_netns.enter(path)

        return enter

    def link_bytes(self) -> int:
        """Bytes the host ends of our veths carried (both directions)."""
        total = 0
        for side in ("c1", "c2"):
            with open(f"/sys/class/net/{self.tag}{side}/statistics/rx_bytes") as f:
                total += int(f.read())
            with open(f"/sys/class/net/{self.tag}{side}/statistics/tx_bytes") as f:
                total += int(f.read())
        return total

    def dnat_packets(self) -> int:
        out = json.loads(_sh("nft", "-j", "list", "chain", "ip", self.table, "out").stdout)
        n = 0
        for item in out["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    n += expr["counter"]["packets"]
        return n


class Graft(Topology):
    """Containers with only `lo`; their sockets grafted onto host sockets by `graft run --mode M`.
    Every process gets a netns of its own (graft run creates and removes it)."""

    kind = "graft"

    def __init__(self, mode: str, state_dir: str | None = None):
        super().__init__(state_dir)
        self.mode = mode
        self.name = f"graft-{mode}"
        self.graft_api = mode == "api"
        self.binaries = mode != "api"
        self.agents: dict[str, tuple[subprocess.Popen, int]] = {}

    def client_port(self, side: str) -> int:
        return self._agent(side)[1]

    def _agent(self, side: str) -> tuple[subprocess.Popen, int]:
        """The long-lived client runner in the container of `side` (see agent.py)."""
        if side not in self.agents or self.agents[side][0].poll() is not None:
            from sockgraft.bench.ports import free_port

            port = free_port()
            p = self.popen(side, [sys.executable, "-m", "sockgraft.bench.incontainer"], [port],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.agents[side] = (p, port)
        return self.agents[side]

    def run(self, side: str, cmd: list[str], ports: list[int] = (), timeout: float = 120, stderr: bool = False) -> str:
        if side == "host":
            return super().run(side, cmd, ports, timeout, stderr)
        agent, _port = self._agent(side)
        with _alarm(int(timeout) + 30, f"waiting for the {self.name} agent"):
            agent.stdin.write(json.dumps({"cmd": cmd, "timeout": timeout}) + "\n")
            agent.stdin.flush()
            line = agent.stdout.readline()
        if not line:
            raise TopologyError(f"the {self.name} client agent in {side} died (exit {agent.wait()})")
        reply = json.loads(line)
        if reply["rc"] != 0:
            last = (reply["err"] or reply["out"]).strip().splitlines()[-3:]
            raise TopologyError(f"{os.path.basename(cmd[0])} exited {reply['rc']} in {self.name}/{side}: {' | '.join(last)}")
        return reply["out"] + reply["err"] if stderr else reply["out"]

    def teardown(self) -> None:
        for agent, _port in self.agents.values():
            with contextlib.suppress(OSError):
                agent.stdin.close()
        for agent, _port in self.agents.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(5)
        self.agents.clear()
        super().teardown()

    def describe(self) -> str:
        return (f"container netns with only lo, `graft run --mode {self.mode}`; servers bind 0.0.0.0:P "
                "(ingress pair onto host 127.0.0.1:P), clients dial 127.0.0.1 (egress rule 127.0.0.0/8)")

    def unavailable(self) -> str | None:
        from sockgraft.modes.registry import MODES

        if self.mode not in MODES:
            return f"graft run has no mode {self.mode!r} in this checkout"
        env = self.env()
        env["GRAFT_STATE_DIR"] = self.state_dir or tempfile.mkdtemp(prefix=tag() + "-probe")
        p = subprocess.run([*graft_cmd(), "run", "--mode", self.mode, "-n", f"{tag()}-probe", "--", "true"],
                           capture_output=True, text=True, env=env, timeout=60)
        if p.returncode != 0:
            return f"`graft run --mode {self.mode} -- true` failed: {p.stderr.strip().splitlines()[-1:] or p.returncode}"
        return None

    def na(self, workload_kind: str) -> str | None:
        if self.mode == "api" and workload_kind == "binary":
            return "unmodified binaries cannot use the graft API (only Python peers written for it)"
        return None

    def listen(self, side: str, port: int) -> Listener:
        return Listener(side, "127.0.0.1" if side == "host" else "0.0.0.0", port)

    def env(self) -> dict[str, str]:
        env = super().env()
        if self.state_dir:
            env["GRAFT_STATE_DIR"] = self.state_dir
        return env

    def command(self, side: str, cmd: list[str], ports: list[int]) -> list[str]:
        if side == "host":
            return cmd
        ns = f"{tag()}-g{next(_NETNS_SERIAL)}"  # one netns per process, unique across topologies
        args = [*graft_cmd(), "run", "--mode", self.mode, "-n", ns,
                "--endpoint", "out type ipv4 addr 127.0.0.1 port dynamic", "--egress", "127.0.0.0/8=out"]
        for port in ports:
            args += ["--endpoint", f"s{port} type ipv4 addr 127.0.0.1 port {port}",
                     "--ingress", f"0.0.0.0:{port}=s{port}", "--ingress", f"127.0.0.1:{port}=s{port}"]
        return [*args, "--", *cmd]


def graft_cmd() -> list[str]:
    exe = shutil.which("graft")
    return [exe] if exe else [sys.executable, "-m", "sockgraft"]


def all_topologies(state_dir: str | None) -> list[Topology]:
    return [Topology(state_dir), Nat(state_dir), Nat(state_dir, mtu=65520), Graft("api", state_dir),
            Graft("preload", state_dir), Graft("seccomp", state_dir), Docker(state_dir)]


class Docker(Topology):
    """Real dockerd's bridge: only when a dockerd is already running (never started by the bench)."""

    name = "docker"
    kind = "docker"

    def unavailable(self) -> str | None:
        for sock in ("/run/docker.sock", "/var/run/docker.sock"):
            if os.path.exists(sock):
                p = subprocess.run(["docker", "-H", f"unix://{sock}", "info"], capture_output=True, timeout=20)
                if p.returncode == 0:
                    return ("a dockerd is running, but the bench has no image with the workload tools; "
                            "not measured")
        return "no dockerd running (the bench never starts one)"


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TopologyError(f"timed out waiting for {what}")
        time.sleep(0.02)
