"""rootless-*: the container side runs as a real unprivileged user the bench makes for the run
(`sgb<PID>u<x>`, useradd; removed at teardown, and swept with its processes by the next run when
the bench was killed: debris). The host side (servers) stays root, as in every topology.

- rootless-graft (`--mode preload`, and rootless-graft-seccomp): `graft run` as that user, its
  own state under its XDG dirs and its own fd service / supervisor; clients leave by the endpoint
  `out` (host 127.0.0.1, dynamic port).
- rootless-slirp4netns: a user + net namespace made by the user (`unshare --user --map-root-user
  --net`, held by a sleeping process per container) whose network is slirp4netns (`--configure
  --mtu=65520 --enable-seccomp`, as rootless Podman runs it, without `--disable-host-loopback`):
  the host's loopback is 10.0.2.2 there. Commands join it with nsenter as the user.
- rootless-pasta: the same with pasta (Debian's passt) instead: a user + net namespace per command
  (`pasta --config-net`), address 10.0.2.100/24, gateway 10.0.2.2 mapped to the host's loopback, no
  port forwarding of its own (`-t/-u/-T/-U none`: only the gateway path, like slirp4netns).

Only the container → host direction is built (issue 13's comparison; slirp4netns and pasta would
need port forwarding inbound, and servers in the container files the user may write): other
directions are n/a.
Traffic stays on loopback: `check_route` admits only the host's loopback (graft) or the gateway
address that these tools map to it, and an nftables table (`sgb<PID>r<x>`) drops, and counts,
every packet the user's host sockets would send anywhere but the loopback; a non-zero count fails
the teardown."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time

from sockgraft.bench import users
from sockgraft.bench.debris import OWNER_ENV, tag
from sockgraft.bench.sysctl import tun_update
from sockgraft.bench.system import TopologyError, sh
from sockgraft.bench.topologies.base import Listener, Topology, loopback_only, stop

GATEWAY = "10.0.2.2"  # slirp4netns's and (as configured here) pasta's name for the host's loopback
GRAFT = "/usr/local/bin/graft"  # installed for every user (scripts/setup)


class Rootless(Topology):
    """What the rootless topologies share: the user, the loopback guard, commands run as the user."""

    kind = "rootless"
    mtu = 65520
    default = False  # measured when named (--topologies rootless-...)
    suffix = "x"
    tool = ""  # the program the topology needs
    needs_tun = False  # a user-mode network's tap device: /dev/net/tun opened to the user for the run

    def __init__(self, state_dir: str | None = None):
        super().__init__(state_dir)
        self.user: users.User | None = None
        self.guard = f"{tag()}r{self.suffix}"

    def unavailable(self) -> str | None:
        if os.geteuid() != 0:
            return "needs root (it makes a user for the run)"
        for prog in ("useradd", "setpriv", self.tool):
            if not shutil.which(prog):
                return f"{prog} is not installed"
        return None

    def setup(self) -> None:
        if self.needs_tun:
            tun_update(add=os.getpid())
        try:
            self.user = users.create_user(f"{tag()}u{self.suffix}")
            self._guard()
            self.start()
        except BaseException:
            self.teardown()
            raise

    def start(self) -> None:
        """Check, as the user, that the topology works (setup's last step)."""

    def _guard(self) -> None:
        sh("nft", "-f", "-", input=f"""table inet {self.guard} {{
    chain out {{
        type filter hook output priority -300; policy accept;
        meta skuid {self.user.uid} ip daddr != 127.0.0.0/8 counter drop
        meta skuid {self.user.uid} ip6 daddr != ::1 counter drop
    }}
}}
""")

    def guard_drops(self) -> int:
        """Packets of the user's host sockets that headed anywhere but the loopback (dropped)."""
        out = sh("nft", "list", "table", "inet", self.guard, check=False).stdout
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))

    def teardown(self) -> None:
        try:
            super().teardown()
            drops = 0
            if self.user is not None:
                users.remove_user(self.user.name)
                self.user = None
                drops = self.guard_drops()
            sh("nft", "delete", "table", "inet", self.guard, check=False)
            if drops:
                raise TopologyError(f"the loopback guard dropped {drops} packets of the user's sockets")
        finally:
            if self.needs_tun:
                tun_update(remove=os.getpid())

    def na(self, workload_kind: str) -> str | None:
        if workload_kind in ("python", "python-peer"):
            return "the bench's Python peers run the bench's interpreter, which the run's user may not read"
        return None

    def na_direction(self, direction: str) -> str | None:
        if direction != "c2h":
            return ("only container → host is built for the rootless topologies (slirp4netns and pasta would "
                    "need port forwarding inbound; servers in the container would need files the user may write)")
        return None

    def listen(self, side: str, port: int) -> Listener:
        return Listener(side, "127.0.0.1" if side == "host" else "0.0.0.0", port)

    def target(self, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
        if client_side == "host":
            return "127.0.0.1", listener.port
        return GATEWAY, listener.port

    def check_route(self, client_side: str, addr: str) -> None:
        if client_side == "host" or addr != GATEWAY:
            loopback_only(addr, self.name)

    def as_user(self, argv: list[str]) -> list[str]:
        """`argv` run as the run's user, with only the user's environment (and the bench's owner mark)."""
        if self.user is None:
            raise TopologyError(f"{self.name} is not set up")
        env = self.user.env(**{OWNER_ENV: str(os.getpid()), "GRAFT_EGRESS_ENFORCE": "0",
                               "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
        return self.user.argv("env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv, pdeathsig=True)

    def command(self, side: str, cmd: list[str], ports: list[int]) -> list[str]:
        return cmd if side == "host" else self.as_user(self.inside(side, cmd, ports))

    def inside(self, side: str, cmd: list[str], ports: list[int]) -> list[str]:
        raise NotImplementedError


class RootlessGraft(Rootless):
    """`graft run --mode MODE` as the run's user."""

    tool = GRAFT

    def __init__(self, mode: str = "preload", state_dir: str | None = None):
        self.mode = mode
        self.suffix = {"preload": "g", "seccomp": "c", "api": "a"}[mode]  # distinct from slirp's and pasta's
        self.name = "rootless-graft" if mode == "preload" else f"rootless-graft-{mode}"
        super().__init__(state_dir)
        self.mtu = 65536  # the data path is the host's lo

    def describe(self) -> str:
        return (f"`graft run --mode {self.mode}` as an unprivileged user made for the run (its own user+net "
                "namespace, fd service and state); clients dial host 127.0.0.1 through the endpoint `out`")

    def unavailable(self) -> str | None:
        from sockgraft.modes.registry import MODES

        if self.mode not in MODES:
            return f"graft run has no mode {self.mode!r} in this checkout"
        if not os.access(GRAFT, os.X_OK):
            return f"{GRAFT} is missing (scripts/setup installs it for every user)"
        return super().unavailable()

    def start(self) -> None:
        p = subprocess.run(self.as_user(self.inside("c1", ["true"], [])), capture_output=True, text=True,
                           timeout=60, cwd="/")
        if p.returncode != 0:
            raise TopologyError(f"`graft run --mode {self.mode} -- true` as {self.user.name} failed: "
                                f"{' | '.join(p.stderr.strip().splitlines()[-2:]) or p.returncode}")

    def target(self, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
        return "127.0.0.1", listener.port  # a grafted server is bound to host 127.0.0.1:P

    def check_route(self, client_side: str, addr: str) -> None:
        loopback_only(addr, self.name)

    def inside(self, side: str, cmd: list[str], ports: list[int]) -> list[str]:
        args = [GRAFT, "run", "--mode", self.mode,
                "--endpoint", "out type ipv4 addr 127.0.0.1 port dynamic", "--egress", "127.0.0.0/8=out"]
        for port in ports:
            args += ["--endpoint", f"s{port} type ipv4 addr 127.0.0.1 port {port}",
                     "--ingress", f"0.0.0.0:{port}=s{port}", "--ingress", f"127.0.0.1:{port}=s{port}"]
        return [*args, "--", *cmd]


class RootlessSlirp(Rootless):
    """A user + net namespace per container side, networked by slirp4netns."""

    name = "rootless-slirp4netns"
    suffix = "s"
    tool = "slirp4netns"
    needs_tun = True

    def __init__(self, state_dir: str | None = None):
        super().__init__(state_dir)
        self.holders: dict[str, tuple[subprocess.Popen, subprocess.Popen]] = {}

    def describe(self) -> str:
        return ("user+net namespace of an unprivileged user made for the run, networked by slirp4netns "
                "(--configure --mtu=65520 --enable-seccomp, host loopback allowed: 10.0.2.2), as rootless "
                "Podman's default network")

    def start(self) -> None:
        self._holder("c1")

    def _holder(self, side: str) -> int:
        """The pid holding the namespaces of `side` (made, and networked, at first use)."""
        if side in self.holders and self.holders[side][0].poll() is None:
            return self.holders[side][0].pid
        ns = self.popen("host", self.as_user(["unshare", "--user", "--map-root-user", "--net", "sleep", "infinity"]),
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{ns.pid}/ns/net") != own and os.readlink(f"/proc/{ns.pid}/exe").endswith("sleep"):
                    break
            if ns.poll() is not None or time.monotonic() > deadline:
                err = ns.stderr.read().decode(errors="replace").strip().splitlines()[-1:] if ns.poll() is not None else []
                raise TopologyError(f"unshare as {self.user.name} failed (exit {ns.poll()}): {err}")
            time.sleep(0.02)
        ns.stderr.close()
        r, w = os.pipe()
        try:
            slirp = self.popen("host", self.as_user(["slirp4netns", "--configure", "--mtu=65520", "--enable-seccomp",
                                                     f"--ready-fd={w}", str(ns.pid), "tap0"]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(w,))
            os.close(w)
            w = -1
            with os.fdopen(r, "rb", closefd=False) as f:
                ready = f.read(1)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        if ready != b"1":
            err = slirp.stderr.read().decode(errors="replace").strip().splitlines()[-1:] if slirp.poll() is not None else []
            raise TopologyError(f"slirp4netns did not come up: {err or 'not ready'}")
        self.holders[side] = (ns, slirp)
        return ns.pid

    def teardown(self) -> None:
        for ns, slirp in self.holders.values():
            stop(slirp)
            stop(ns)
        self.holders.clear()
        super().teardown()

    def inside(self, side: str, cmd: list[str], ports: list[int]) -> list[str]:
        # the user's uid is root there (--map-root-user); no setgroups, which that map denies
        return ["nsenter", "-t", str(self._holder(side)), "-U", "-n", "--preserve-credentials", "--", *cmd]


class RootlessPasta(Rootless):
    """A user + net namespace per command, networked by pasta."""

    name = "rootless-pasta"
    suffix = "p"
    tool = "pasta"
    needs_tun = True

    def describe(self) -> str:
        return ("user+net namespace of an unprivileged user made for the run, networked by pasta (Debian's "
                "passt; --config-net, 10.0.2.100/24, gateway 10.0.2.2 mapped to the host's loopback, "
                "-t/-u/-T/-U none)")

    def start(self) -> None:
        p = subprocess.run(self.as_user(self.inside("c1", ["ip", "-4", "-o", "addr", "show", "eth0"], [])),
                           capture_output=True, text=True, timeout=30, cwd="/")
        if p.returncode != 0 or "10.0.2.100/24" not in p.stdout:
            raise TopologyError(f"pasta did not configure its namespace: {(p.stderr or p.stdout).strip()[-200:]}")

    def inside(self, side: str, cmd: list[str], ports: list[int]) -> list[str]:
        return ["pasta", "--config-net", "--quiet", "-4", "-a", "10.0.2.100", "-n", "24", "-g", GATEWAY,
                "-t", "none", "-u", "none", "-T", "none", "-U", "none", "--no-dhcp", "--", *cmd]
