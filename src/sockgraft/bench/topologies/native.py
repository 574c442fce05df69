"""native: both ends in the host netns over loopback (the baseline)."""
from __future__ import annotations

from sockgraft.bench.topologies.base import Listener, Topology, loopback_only


class Native(Topology):
    name = "native"
    kind = "native"
    mtu = 65536  # lo

    def describe(self) -> str:
        return "both ends in the host netns over loopback"

    def listen(self, side: str, port: int) -> Listener:
        return Listener(side, "127.0.0.1", port)

    def target(self, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
        return "127.0.0.1", listener.port

    def check_route(self, client_side: str, addr: str) -> None:
        loopback_only(addr, self.name)
