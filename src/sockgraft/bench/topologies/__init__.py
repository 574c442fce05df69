"""The topologies `graft bench` compares, one module per kind: native (loopback), nat (docker0-like
bridge + NAT), graft (containers grafted by `graft run --mode M`), seccomp-floor (native under
seccomp mode's filter and a supervisor doing the least: graft-seccomp's floor), docker (real
dockerd; reported, not measured), and rootless-* (the container side as an unprivileged user: grafted by `graft run`,
or networked by slirp4netns or pasta; measured only when named). Each is built by code in `setup` and always torn down; what a killed run left is
swept (sockgraft.bench.debris)."""
from __future__ import annotations

from sockgraft.bench.system import TopologyError
from sockgraft.bench.topologies.base import SIDES, Listener, Topology
from sockgraft.bench.topologies.docker import Docker
from sockgraft.bench.topologies.floor import SeccompFloor
from sockgraft.bench.topologies.graft import Graft
from sockgraft.bench.topologies.nat import Nat
from sockgraft.bench.topologies.native import Native
from sockgraft.bench.topologies.rootless import RootlessGraft, RootlessPasta, RootlessSlirp

__all__ = ["SIDES", "Docker", "Graft", "Listener", "Nat", "Native", "RootlessGraft", "RootlessPasta", "RootlessSlirp",
           "SeccompFloor", "Topology", "TopologyError", "all_topologies"]


def all_topologies(state_dir: str | None) -> list[Topology]:
    """Every topology, in report order."""
    return [Native(state_dir), Nat(state_dir), Nat(state_dir, mtu=65520), Graft("api", state_dir),
            Graft("preload", state_dir), Graft("seccomp", state_dir), SeccompFloor(state_dir), Docker(state_dir),
            RootlessSlirp(state_dir), RootlessPasta(state_dir), RootlessGraft("preload", state_dir),
            RootlessGraft("seccomp", state_dir)]
