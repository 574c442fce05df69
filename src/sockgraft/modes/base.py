"""What every attach mode has in common: the run it attaches to, and the four steps of attaching.

Imports no mode: the modes build on this module, `modes.registry` lists them.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

from sockgraft.core.endpoint import Endpoint
from sockgraft.core.rules import EgressRule, IngressPair
from sockgraft.host import netns


@dataclass
class RunSpec:
    cmd: list[str]
    netns: str | None = None
    mode: str = "api"
    endpoints: list[Endpoint] = field(default_factory=list)
    ingress: list[IngressPair] = field(default_factory=list)
    egress: list[EgressRule] = field(default_factory=list)
    state_dir: str | None = None
    userns: bool = False  # root: run the command as root of a user namespace (rootless: always)


@dataclass
class RunContext:
    spec: RunSpec
    container: netns.Container
    socket_path: str
    workdir: str
    env: dict[str, str]


class Attach:
    """How a mode attaches the command: the fd service is already serving the container when
    `prepare` runs; a mode adds what it needs around the command's start."""

    name = ""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def prepare(self) -> None:
        """Before the command starts: adjust ctx.env, start helpers."""

    def preexec(self) -> None:
        """In the child, after entering the netns, before exec."""

    def spawn(self, preexec) -> subprocess.Popen:
        return subprocess.Popen(self.ctx.spec.cmd, env=self.ctx.env, preexec_fn=preexec)

    def cleanup(self) -> None:
        """After the command ended (always called)."""
