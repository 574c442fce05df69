"""The decision core: every attach mode asks this, and nothing else, what to graft.

Pure code, no syscalls. Given a container's policy (its endpoint table, ingress pairs and egress
rules) and one operation record (`Op`), `Policy.decide` returns a Decision: graft onto a host
address, stay inside the container's own netns, or deny with an errno. The modes only gather the
facts of the operation (they read the socket and the caller) and carry the decision out.

The rules every mode shares, decided here once:
- `named`/`dial` (graft API): the endpoint by name; `dial` needs a fixed port or a unix path.
- `bind`: the first ingress pair that matches the container-side address grafts it. A dual-stack
  IPv6 wildcard bind (`[::]:P`, V6ONLY off) is the program's IPv4 listener too: IPv4 pairs for P
  match it; a V6ONLY socket is matched by IPv6 pairs only.
- `connect`/`sendto` of a socket that has no address yet: the longest matching egress prefix names
  the source endpoint. A socket bound or connected inside the container stays there.
- `connect`/`sendto` on a socket that is grafted already (a host socket): allowed only to a
  destination an egress rule names; anything else is denied (a host socket cannot reach the
  container's own netns, and must not reach the rest of the host).
- A caller outside the container's netns (a netns nested in it, or any other) is never granted:
  what a rule would graft is denied with EPERM; what no rule matches stays where it is.
- Interface ioctls and SO_BINDTODEVICE on a grafted socket are denied.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import ipaddress
import socket
from dataclasses import dataclass, field

from sockgraft.core.endpoint import Endpoint
from sockgraft.core.rules import EgressRule, IngressPair

GRANT, LOCAL, DENY = "grant", "local", "deny"
VERBS = ("named", "dial", "bind", "connect", "sendto", "ioctl", "bindtodevice")

IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
IP_TYPES = (socket.SOCK_STREAM, socket.SOCK_DGRAM)
IP_PROTOS = {socket.SOCK_STREAM: (0, socket.IPPROTO_TCP), socket.SOCK_DGRAM: (0, socket.IPPROTO_UDP)}
UNIX_TYPES = (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET)


@dataclass(frozen=True, slots=True)
class Op:
    """One operation, as the mode saw it. Only the fields of its verb matter."""

    verb: str  # one of VERBS
    family: int = 0  # the socket's family (named: 0 = the endpoint's own)
    addr: str | None = None  # bind: the container-side address; connect/sendto: the destination
    port: int = 0
    type: int = socket.SOCK_STREAM
    proto: int = 0
    name: str | None = None  # named/dial: the endpoint
    bound: bool = False  # the socket has an address (or a peer) in the container already
    grafted: bool = False  # the socket is a host socket already
    v6only: bool = False  # IPV6_V6ONLY on an IPv6 socket
    foreign: bool = False  # the caller is not in the container's netns
    supported: bool = True  # ioctl: one the mode can perform for a native socket


@dataclass(frozen=True)
class Decision:
    verdict: str  # GRANT | LOCAL | DENY
    endpoint: Endpoint | None = None
    family: int = 0  # family of the host socket to create
    host: tuple | str | None = None  # host sockaddr to bind (source address for egress)
    errno: int = 0
    reason: str = ""
    mark: int = 0  # SO_MARK of the host socket (the container's: core.tables.MARK_TAG | n; 0: none)

    @property
    def granted(self) -> bool:
        return self.verdict == GRANT


def _deny(code: int, reason: str) -> Decision:
    return Decision(DENY, errno=code, reason=reason)


_LOCAL = Decision(LOCAL, reason="no pair or rule matches: stays in the container")
_LOCAL_BOUND = Decision(LOCAL, reason="socket already bound in the container: egress rules are for unbound sockets")
_LOCAL_NATIVE = Decision(LOCAL, reason="a socket of the container: performed in its own netns")


@functools.lru_cache(maxsize=4096)
def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    # a v4-mapped destination is an IPv4 destination for matching purposes
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def _dual_stack(op: Op) -> bool:
    """A bind that listens on every IPv4 address too: `[::]:P` with V6ONLY off."""
    return op.family == socket.AF_INET6 and not op.v6only and op.addr is not None and _ip(op.addr).is_unspecified \
        and _ip(op.addr).version == 6


@dataclass(frozen=True)
class Prefilter:
    """What a client side may know of a policy to skip asking when nothing can match: the ingress
    pairs' (version, address, ports) and the egress prefixes, flattened. It decides only "might a
    rule apply?" — a superset of what the engine grants; the engine still decides every match.
    The preload library mirrors `might_graft` in C from `lines()` (a test holds the two equal)."""

    binds: tuple[tuple[int, str, int, int], ...] = ()  # (4|6, address, port_lo, port_hi)
    egress: tuple[tuple[int, str, int], ...] = ()  # (4|6, network address, prefix length)
    version: str = ""  # changes with anything of the policy: the library drops its pools (csrc/pool.c)

    def might_graft(self, op: Op) -> bool:
        if op.grafted:
            return True
        if op.family not in IP_FAMILIES or op.verb not in ("bind", "connect", "sendto"):
            return op.verb in ("named", "dial")
        ip = _ip(op.addr)
        if op.verb == "bind":
            dual = _dual_stack(op)
            for version, addr, lo, hi in self.binds:
                if lo <= op.port <= hi and ((version == ip.version and (addr in ("0.0.0.0", "::") or
                                                                        _ip(addr) == ip)) or (dual and version == 4)):
                    return True
            return False
        return any(version == ip.version and ip in ipaddress.ip_network(f"{net}/{plen}")
                   for version, net, plen in self.egress)

    def lines(self) -> tuple[str, ...]:
        return tuple([f"bind {v} {a} {lo} {hi}" for v, a, lo, hi in self.binds] +
                     [f"egress {v} {n} {plen}" for v, n, plen in self.egress] +
                     ([f"version {self.version}"] if self.version else []))


@dataclass(frozen=True)
class EgressTable:
    """The egress rules compiled for a native fast path (the seccomp supervisor's C loop): rows in
    the order the engine matches them (longest prefix first; among equal lengths, the rule listed
    first), each naming what the engine grants an unbound IP socket of the container's own netns
    connecting there. `lookup` is the reference the C code mirrors (a test holds the two equal);
    it answers a grant exactly as `Policy.decide` would, "local" where no rule matches, and "ask"
    wherever the engine might answer anything else (a denial, a caller elsewhere, a bound or
    grafted socket, another socket type): the Python engine decides those."""

    rows: tuple[tuple[int, str, int, str, str, int], ...] = ()  # (4|6, net, plen, ep type|"ask", ep addr, ep port)

    def lookup(self, op: Op) -> tuple:
        if op.verb != "connect" or op.family not in IP_FAMILIES or op.bound or op.grafted or op.foreign:
            return ("ask",)
        if op.type not in IP_TYPES or op.proto not in IP_PROTOS[op.type]:
            return ("ask",)
        ip = _ip(op.addr)
        for version, net, plen, ep_type, ep_addr, ep_port in self.rows:
            if version != ip.version or ip not in ipaddress.ip_network(f"{net}/{plen}"):
                continue
            if ep_type == "ask" or (ep_type == "ipv4") != (ip.version == 4):
                return ("ask",)
            if op.family == (socket.AF_INET if ep_type == "ipv4" else socket.AF_INET6):
                return ("grant", op.family, (ep_addr, ep_port))
            if op.family == socket.AF_INET6 and ep_type == "ipv4":
                return ("grant", socket.AF_INET6, (f"::ffff:{ep_addr}", ep_port))
            return ("ask",)
        return ("local",)

    def lines(self) -> tuple[str, ...]:
        return tuple(f"{v} {n} {plen} {t} {a or '-'} {port}" for v, n, plen, t, a, port in self.rows)


@dataclass(frozen=True)
class IngressTable:
    """The ingress pairs compiled for a native fast path (the fd service's C `bind`): rows in the
    order the engine matches them, each naming what the engine grants a bind there. `lookup` is the
    reference the C code mirrors (a test holds the two equal, and equal to `Policy.decide`): a grant
    exactly as `Policy.decide` would answer it, "local" where no pair matches, "ask" wherever the
    engine might answer anything else (a denial, a caller elsewhere, another socket type)."""

    rows: tuple[tuple[int, str, int, int, str, str, int], ...] = ()  # (4|6, addr, lo, hi, ep type|"ask", ep addr, ep port)

    def lookup(self, op: Op) -> tuple:
        if op.verb != "bind" or op.family not in IP_FAMILIES or op.foreign:
            return ("ask",)
        if op.type not in IP_TYPES or op.proto not in IP_PROTOS[op.type]:
            return ("ask",)
        ip, dual = _ip(op.addr), _dual_stack(op)
        for i, (version, addr, lo, hi, ep_type, ep_addr, ep_port) in enumerate(self.rows):
            if not lo <= op.port <= hi:
                continue
            if not ((version == ip.version and (_ip(addr).is_unspecified or _ip(addr) == ip)) or (dual and version == 4)):
                continue
            if ep_type == "ask":
                return ("ask",)
            if op.family == (socket.AF_INET if ep_type == "ipv4" else socket.AF_INET6):
                return ("grant", op.family, (ep_addr, ep_port), i, dual and version == 4)
            if op.family == socket.AF_INET6 and ep_type == "ipv4":
                return ("grant", socket.AF_INET6, (f"::ffff:{ep_addr}", ep_port), i, dual and version == 4)
            return ("ask",)
        return ("local",)


@dataclass
class Policy:
    """One container's table and rules; the engine's whole input besides the operation."""

    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    ingress: list[IngressPair] = field(default_factory=list)
    egress: list[EgressRule] = field(default_factory=list)
    mark: int = 0  # the container's socket mark (Store allocates it), carried by every grant

    def with_caller_rules(self, ingress=(), egress=(), bbconn=()) -> "Policy":
        """This table with a caller's own rules (the preload library's environment) in place of
        the stored rules of the same kind: what may be granted stays this table's endpoints.
        GRAFT_BBCONN=NAME sends every destination of the endpoint's family through it."""
        out = list(egress)
        for name in bbconn:
            ep = self.endpoints.get(name)
            families = [ep.type] if ep is not None else ["ipv4", "ipv6"]  # unknown: the engine says so
            if ep is None or ep.type != "unix":
                out += [EgressRule(ipaddress.ip_network("0.0.0.0/0" if f == "ipv4" else "::/0"), name) for f in families]
        return Policy(self.endpoints, list(ingress) or self.ingress, out or self.egress, self.mark)

    def prefilter(self) -> Prefilter:
        return Prefilter(tuple((p.addr.version, str(p.addr), p.port_lo, p.port_hi) for p in self.ingress),
                         tuple((r.network.version, str(r.network.network_address), r.network.prefixlen)
                               for r in self.egress), self.version())

    def version(self) -> str:
        """A short digest of everything in this policy (endpoints, rules, mark)."""
        text = repr((sorted(ep.line() for ep in self.endpoints.values()), [str(p) for p in self.ingress],
                     [str(r) for r in self.egress], self.mark))
        return hashlib.blake2s(text.encode(), digest_size=8).hexdigest()

    def egress_table(self) -> EgressTable:
        rows = []
        for rule in sorted(self.egress, key=lambda r: -r.network.prefixlen):
            ep = self.endpoints.get(rule.endpoint)
            if ep is None or ep.type == "unix":
                rows.append((rule.network.version, str(rule.network.network_address), rule.network.prefixlen, "ask", "", 0))
            else:
                rows.append((rule.network.version, str(rule.network.network_address), rule.network.prefixlen,
                             ep.type, ep.addr, ep.port or 0))
        return EgressTable(tuple(rows))

    def ingress_table(self) -> IngressTable:
        rows = []
        for pair in self.ingress:
            ep = self.endpoints.get(pair.endpoint)
            kind = "ask" if ep is None or ep.type == "unix" else ep.type
            rows.append((pair.addr.version, str(pair.addr), pair.port_lo, pair.port_hi, kind,
                         ep.addr if kind != "ask" else "", (ep.port or 0) if kind != "ask" else 0))
        return IngressTable(tuple(rows))

    def decide(self, op: Op) -> Decision:
        """The one entry point: what to do with `op`."""
        if op.verb in ("ioctl", "bindtodevice"):
            return self._sidedoor(op)
        if op.grafted and op.verb in ("connect", "sendto"):
            return self._on_grafted(op)
        d = self._match(op)
        if d.verdict == GRANT and op.foreign:
            return _deny(errno.EPERM, "caller outside the container's netns: never grafted")
        return d

    def _match(self, op: Op) -> Decision:
        if op.verb == "named":
            return self._by_name(op.name, op.family, op.type, op.proto)
        if op.verb == "dial":
            d = self._by_name(op.name, 0, op.type, op.proto)
            if d.granted and d.endpoint.dynamic:
                return _deny(errno.EINVAL, f"endpoint {op.name} has a dynamic port: nothing to dial")
            return d
        if op.verb == "bind":
            return self._bind(op)
        if op.verb in ("connect", "sendto"):
            d = self._egress(op)
            if d.verdict == GRANT and op.bound:
                return _LOCAL_BOUND  # bound or connected in the container: it stays there
            return d
        return _deny(errno.EINVAL, f"unknown operation {op.verb!r}")

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
        return Decision(GRANT, ep, host[0], host[1], reason=why, mark=self.mark)

    # -- the operations ----------------------------------------------------------------------
    def _by_name(self, name: str | None, family: int, sotype: int, proto: int) -> Decision:
        ep = self.endpoints.get(name or "")
        if ep is None:
            return _deny(errno.EADDRNOTAVAIL, f"no endpoint {name!r} in this container's table")
        return self._grant(ep, family, sotype, proto, f"endpoint {name}")

    def _bind(self, op: Op) -> Decision:
        if op.family not in IP_FAMILIES:
            return _LOCAL
        ip = _ip(op.addr)
        dual = _dual_stack(op)
        for pair in self.ingress:
            if pair.matches(ip, op.port) or (dual and pair.addr.version == 4 and pair.port_lo <= op.port <= pair.port_hi):
                ep = self.endpoints.get(pair.endpoint)
                if ep is None:
                    return _deny(errno.EADDRNOTAVAIL, f"ingress pair {pair} names an endpoint not in the table")
                why = f"ingress {pair}" + (" (dual-stack [::] bind)" if dual and pair.addr.version == 4 else "")
                return self._grant(ep, op.family, op.type, op.proto, why)
        return _LOCAL

    def _rule_for(self, addr: str) -> EgressRule | None:
        """The longest egress prefix that holds `addr`."""
        ip = _ip(addr)
        best: EgressRule | None = None
        for rule in self.egress:
            if rule.network.version == ip.version and ip in rule.network:
                if best is None or rule.network.prefixlen > best.network.prefixlen:
                    best = rule
        return best

    def _egress(self, op: Op) -> Decision:
        """The source endpoint an unbound socket leaves by. The destination is not rewritten."""
        if op.family not in IP_FAMILIES:
            return _LOCAL
        best = self._rule_for(op.addr)
        if best is None:
            return _LOCAL
        ep = self.endpoints.get(best.endpoint)
        if ep is None:
            return _deny(errno.EADDRNOTAVAIL, f"egress rule {best} names an endpoint not in the table")
        if ep.type == "unix":
            return _deny(errno.EAFNOSUPPORT, f"egress rule {best} names a unix endpoint")
        if _ip(op.addr).version != (4 if ep.type == "ipv4" else 6):
            return _deny(errno.EAFNOSUPPORT, f"egress rule {best}: endpoint {ep.name} is {ep.type}")
        return self._grant(ep, op.family, op.type, op.proto, f"egress {best}")

    def _on_grafted(self, op: Op) -> Decision:
        """connect/sendto on a host socket: only to what an egress rule names."""
        if op.foreign:
            return _deny(errno.EPERM, "caller outside the container's netns: never grafted")
        best = self._rule_for(op.addr) if op.family in IP_FAMILIES else None
        if best is None or best.endpoint not in self.endpoints:
            return _deny(errno.EPERM, f"grafted socket: no egress rule names {op.addr} port {op.port}")
        return Decision(GRANT, self.endpoints[best.endpoint], op.family, reason=f"egress {best} (grafted socket)")

    @staticmethod
    def _sidedoor(op: Op) -> Decision:
        if op.grafted:
            if op.verb == "ioctl":
                return _deny(errno.EPERM, "interface and namespace ioctls are refused on grafted sockets")
            return _deny(errno.EPERM, "binding a grafted socket to a device is refused")
        if not op.supported:
            return _deny(errno.EPERM, "socket ioctl not supported under seccomp mode (use netlink)")
        return _LOCAL_NATIVE

