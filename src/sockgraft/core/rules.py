"""Ingress pairs (`ADDR:PORT[-PORT]=NAME`) and egress rules (`PREFIX/LEN=NAME`). Pure code."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sockgraft.core.endpoint import SpecError, check_name, parse_ip, parse_port


def _split_name(spec: str, what: str) -> tuple[str, str]:
    left, sep, name = spec.rpartition("=")
    if not sep or not left:
        raise SpecError(f"bad {what} {spec!r}: expected {'ADDR:PORT[-PORT]=NAME' if what == 'ingress pair' else 'PREFIX/LEN=NAME'}")
    return left, check_name(name)


@dataclass(frozen=True)
class IngressPair:
    """Container-side bind addresses (one family, a port range) grafted onto an endpoint."""

    addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    port_lo: int
    port_hi: int
    endpoint: str

    @property
    def wildcard(self) -> bool:
        return self.addr.is_unspecified

    def matches(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        if addr.version != self.addr.version or not self.port_lo <= port <= self.port_hi:
            return False
        return self.wildcard or addr == self.addr

    def __str__(self) -> str:
        host = f"[{self.addr}]" if self.addr.version == 6 else str(self.addr)
        ports = str(self.port_lo) if self.port_lo == self.port_hi else f"{self.port_lo}-{self.port_hi}"
        return f"{host}:{ports}={self.endpoint}"


def parse_ingress(spec: str) -> IngressPair:
    """`0.0.0.0:80=ep`, `127.0.0.1:8000-8100=ep`, `[::]:80=ep` or `:::80=ep`."""
    left, name = _split_name(spec.strip(), "ingress pair")
    if left.startswith("["):
        host, sep, ports = left[1:].partition("]:")
        if not sep:
            raise SpecError(f"bad ingress pair {spec!r}: expected [ADDR]:PORT")
    else:
        host, sep, ports = left.rpartition(":")
        if not sep or not host:
            raise SpecError(f"bad ingress pair {spec!r}: expected ADDR:PORT[-PORT]=NAME")
    addr = parse_ip(host)
    lo_text, dash, hi_text = ports.partition("-")
    lo = parse_port(lo_text, allow_dynamic=False)
    hi = parse_port(hi_text, allow_dynamic=False) if dash else lo
    if hi < lo:
        raise SpecError(f"bad ingress pair {spec!r}: port range {lo}-{hi} is empty")
    return IngressPair(addr, lo, hi, name)


@dataclass(frozen=True)
class EgressRule:
    """Destinations inside `network` leave through the source endpoint `endpoint`."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    endpoint: str

    def __str__(self) -> str:
        return f"{self.network}={self.endpoint}"


def parse_egress(spec: str) -> EgressRule:
    """`10.0.0.0/8=ep-out`, `::/0=ep6`; a bare address is a host route."""
    left, name = _split_name(spec.strip(), "egress rule")
    try:
        net = ipaddress.ip_network(left, strict=True)
    except ValueError as e:
        raise SpecError(f"bad egress rule {spec!r}: {e}") from None
    return EgressRule(net, name)

