"""docker: real dockerd's bridge. Reported, never measured: the bench never starts a dockerd, and a
running one has no image with the workload tools."""
from __future__ import annotations

import os
import subprocess

from sockgraft.bench.system import TopologyError
from sockgraft.bench.topologies.base import Listener, Topology


class Docker(Topology):
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

    def describe(self) -> str:
        return "dockerd's docker0 bridge (not measured)"

    def listen(self, side: str, port: int) -> Listener:
        raise TopologyError("docker is not measured")

    def target(self, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
        raise TopologyError("docker is not measured")

    def check_route(self, client_side: str, addr: str) -> None:
        raise TopologyError(f"refusing destination {addr}: docker is not measured")
