"""The decision core: every attach mode asks this, and nothing else, what to graft.

Pure code, no syscalls. Given a container's policy (its endpoint table, ingress pairs and egress
rules) and an operation, return a Decision: graft onto a host address, stay inside the container's
own netns, or deny with an errno.
"""
from __future__ import annotations

import errno
import functools
import ipaddress
import socket
from dataclasses import dataclass, field

from .endpoint import Endpoint
from .rules import EgressRule, IngressPair

GRANT, LOCAL, DENY = "grant", "local", "deny"

IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
IP_TYPES = (socket.SOCK_STREAM, socket.SOCK_DGRAM)
IP_PROTOS = {socket.SOCK_STREAM: (0, socket.IPPROTO_TCP), socket.SOCK_DGRAM: (0, socket.IPPROTO_UDP)}
UNIX_TYPES = (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET)


@dataclass(frozen=True)
class Decision:
    verdict: str  # GRANT | LOCAL | DENY
    endpoint: Endpoint | None = None
    family: int = 0  # family of the host socket to create
    host: tuple | str | None = None  # host sockaddr to bind (source address for egress)
    errno: int = 0
    reason: str = ""

    @property
    def granted(self) -> bool:
        return self.verdict == GRANT


def _deny(code: int, reason: str) -> Decision:
    return Decision(DENY, errno=code, reason=reason)


LOCAL_DECISION = Decision(LOCAL, reason="no pair or rule matches: stays in the container")


@functools.lru_cache(maxsize=4096)
def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    # a v4-mapped destination is an IPv4 destination for matching purposes
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


@dataclass
class Policy:
    """One container's table and rules; the engine's whole input besides the operation."""

    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    ingress: list[IngressPair] = field(default_factory=list)
    egress: list[EgressRule] = field(default_factory=list)

    # -- socket type checks ------------------------------------------------------------------
    @staticmethod
    def _check_type(ep: Endpoint, sotype: int, proto: int) -> Decision | None:
        if ep.type == "unix":
            if sotype not in UNIX_TYPES or proto not in (0,):
                return _deny(errno.EPROTOTYPE, f"endpoint {ep.name} is a unix endpoint: no such socket type")
            return None
        if sotype not in IP_TYPES:
            return _deny(errno.EACCES, f"endpoint {ep.name}: only stream and datagram sockets are grafted")
        if proto not in IP_PROTOS[sotype]:
            return _deny(errno.EPROTONOSUPPORT, f"endpoint {ep.name}: protocol {proto} is not grafted")
        return None

    @staticmethod
    def _host_for(ep: Endpoint, family: int) -> tuple[int, tuple | str] | Decision:
        """Host socket family and bind address for a socket of `family` grafted onto `ep`."""
        if ep.type == "unix":
            if family not in (socket.AF_UNIX, 0):
                return _deny(errno.EAFNOSUPPORT, f"endpoint {ep.name} is a unix endpoint")
            return socket.AF_UNIX, ep.sockaddr()
        addr, port = ep.sockaddr()
        if family in (0, ep.family):
            return ep.family, (addr, port)
        if family == socket.AF_INET6 and ep.type == "ipv4":
            # an IPv6 socket on an IPv4 endpoint: bind the v4-mapped address (dual-stack socket)
            return socket.AF_INET6, (f"::ffff:{addr}", port)
        return _deny(errno.EAFNOSUPPORT, f"endpoint {ep.name} is {ep.type}: wrong address family")

    def _grant(self, ep: Endpoint, family: int, sotype: int, proto: int, why: str) -> Decision:
        bad = self._check_type(ep, sotype, proto)
        if bad:
            return bad
        host = self._host_for(ep, family)
        if isinstance(host, Decision):
            return host
        return Decision(GRANT, ep, host[0], host[1], reason=why)

    # -- operations --------------------------------------------------------------------------
    def named(self, name: str, family: int = 0, sotype: int = socket.SOCK_STREAM, proto: int = 0) -> Decision:
        """bind() by endpoint name (graft API, AF_GRAFT). family 0: the endpoint's own."""
        ep = self.endpoints.get(name)
        if ep is None:
            return _deny(errno.EADDRNOTAVAIL, f"no endpoint {name!r} in this container's table")
        return self._grant(ep, family, sotype, proto, f"endpoint {name}")

    def bind(self, family: int, addr: str, port: int, sotype: int, proto: int = 0) -> Decision:
        """bind() to a container-side address: the first matching ingress pair grafts it."""
        if family not in IP_FAMILIES:
            return LOCAL_DECISION
        ip = _ip(addr)
        for pair in self.ingress:
            if pair.matches(ip, port):
                ep = self.endpoints.get(pair.endpoint)
                if ep is None:
                    return _deny(errno.EADDRNOTAVAIL, f"ingress pair {pair} names an endpoint not in the table")
                return self._grant(ep, family, sotype, proto, f"ingress {pair}")
        return LOCAL_DECISION

    def connect(self, family: int, addr: str, port: int, sotype: int, proto: int = 0) -> Decision:
        """connect()/sendto() of an unbound socket: the longest matching egress prefix gives the
        source endpoint to bind before connecting. The destination itself is not rewritten."""
        if family not in IP_FAMILIES:
            return LOCAL_DECISION
        ip = _ip(addr)
        best: EgressRule | None = None
        for rule in self.egress:
            if rule.network.version == ip.version and ip in rule.network:
                if best is None or rule.network.prefixlen > best.network.prefixlen:
                    best = rule
        if best is None:
            return LOCAL_DECISION
        ep = self.endpoints.get(best.endpoint)
        if ep is None:
            return _deny(errno.EADDRNOTAVAIL, f"egress rule {best} names an endpoint not in the table")
        if ep.type == "unix":
            return _deny(errno.EAFNOSUPPORT, f"egress rule {best} names a unix endpoint")
        if ip.version != (4 if ep.type == "ipv4" else 6):
            return _deny(errno.EAFNOSUPPORT, f"egress rule {best}: endpoint {ep.name} is {ep.type}")
        return self._grant(ep, family, sotype, proto, f"egress {best}")

    sendto = connect


def bbconn_rules(ep: Endpoint) -> list[EgressRule]:
    """GRAFT_BBCONN=NAME: every destination of the endpoint's family leaves through it."""
    if ep.type == "unix":
        return []
    return [EgressRule(ipaddress.ip_network("0.0.0.0/0" if ep.type == "ipv4" else "::/0"), ep.name)]
