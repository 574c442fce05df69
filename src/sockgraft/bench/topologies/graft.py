"""graft-MODE: containers with only `lo`, their sockets grafted onto host sockets by
`graft run --mode MODE`. Every process gets a netns of its own (graft run creates and removes it);
clients in a container run through one long-lived runner there (sockgraft.bench.incontainer)."""
from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile

from sockgraft.bench.debris import tag
from sockgraft.bench.system import TopologyError, alarm
from sockgraft.bench.topologies.base import Listener, Topology, loopback_only
from sockgraft.host.children import python

_NETNS_SERIAL = itertools.count(1)


def graft_cmd() -> list[str]:
    exe = shutil.which("graft")
    return [exe] if exe else python("-m", "sockgraft")



class Graft(Topology):
    """Containers with only `lo`; their sockets grafted onto host sockets by `graft run --mode M`.
    Every process gets a netns of its own (graft run creates and removes it)."""

    kind = "graft"
    mtu = 65536  # the data path is the host's lo

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
        """The long-lived client runner in the container of `side` (sockgraft.bench.incontainer)."""
        if side not in self.agents or self.agents[side][0].poll() is not None:
            from sockgraft.bench.ports import free_port

            port = free_port()
            p = self.popen(side, python("-m", "sockgraft.bench.incontainer"), [port],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.agents[side] = (p, port)
        return self.agents[side]

    def run(self, side: str, cmd: list[str], ports: list[int] = (), timeout: float = 120, stderr: bool = False) -> str:
        if side == "host":
            return super().run(side, cmd, ports, timeout, stderr)
        agent, _port = self._agent(side)
        with alarm(int(timeout) + 30, f"waiting for the {self.name} agent"):
            agent.stdin.write(json.dumps({"cmd": cmd, "timeout": timeout}) + "\n")
            agent.stdin.flush()
            line = agent.stdout.readline()
        if not line:
            raise TopologyError(f"the {self.name} client agent in {side} died (exit {agent.wait()})")
        reply = json.loads(line)
        return self.settle(side, cmd, timeout, bool(reply.get("timeout")), reply["rc"], reply["out"], reply["err"],
                           stderr)

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

    def target(self, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
        return "127.0.0.1", listener.port  # a grafted server is bound to host 127.0.0.1:P

    def check_route(self, client_side: str, addr: str) -> None:
        loopback_only(addr, self.name)

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
