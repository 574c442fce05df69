"""Facts that more than one part of sockgraft needs, in one place (pure data, Linux x86_64 values).

- COPIED_OPTIONS: the socket options an application may have set on its socket before it was
  grafted; the seccomp supervisor and the preload library copy those that differ from a fresh
  socket's onto the host socket (the Python side through `host.hostsock.copy_options`, the C side
  through `csrc/options.h`, which `python3 -m sockgraft.core.tables --c-options` writes and a test
  keeps equal). The api mode replays the program's own setsockopt calls instead
  (`modes.api.graftsocket`): it sees them.
- SOCKET_FLAGS: the flags of a bind the fd-service protocol carries, read from the socket.
- TRAPPED / REFUSED: the syscalls seccomp mode sends to its supervisor (with the argument
  conditions under which it does) and those it refuses outright. The seccomp mode's BPF filter
  (`modes.seccomp.bpf`) and the OCI profile merged into a bundle's config.json
  (`runtime.ociconfig`) are both derived from this one list.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

SOL_SOCKET, IPPROTO_IP, IPPROTO_TCP, IPPROTO_IPV6 = 1, 0, 6, 41
LEVEL_NAMES = {SOL_SOCKET: "SOL_SOCKET", IPPROTO_IP: "IPPROTO_IP", IPPROTO_TCP: "IPPROTO_TCP", IPPROTO_IPV6: "IPPROTO_IPV6"}


@dataclass(frozen=True)
class SockOpt:
    level: int
    name: str  # the C name (<sys/socket.h>, <netinet/tcp.h>, <netinet/in.h>)
    number: int
    size: int = 4  # bytes of its value
    halved: bool = False  # reads back doubled (buffer sizes): set half of what was read


COPIED_OPTIONS: tuple[SockOpt, ...] = (
    SockOpt(SOL_SOCKET, "SO_KEEPALIVE", 9), SockOpt(SOL_SOCKET, "SO_BROADCAST", 6),
    SockOpt(SOL_SOCKET, "SO_LINGER", 13, 8), SockOpt(SOL_SOCKET, "SO_OOBINLINE", 10),
    SockOpt(SOL_SOCKET, "SO_RCVLOWAT", 18), SockOpt(SOL_SOCKET, "SO_RCVTIMEO", 20, 16),
    SockOpt(SOL_SOCKET, "SO_SNDTIMEO", 21, 16), SockOpt(SOL_SOCKET, "SO_PRIORITY", 12),
    SockOpt(SOL_SOCKET, "SO_RCVBUF", 8, halved=True), SockOpt(SOL_SOCKET, "SO_SNDBUF", 7, halved=True),
    SockOpt(SOL_SOCKET, "SO_TIMESTAMP", 29), SockOpt(SOL_SOCKET, "SO_TIMESTAMPNS", 35),
    SockOpt(SOL_SOCKET, "SO_BUSY_POLL", 46),
    SockOpt(IPPROTO_TCP, "TCP_NODELAY", 1), SockOpt(IPPROTO_TCP, "TCP_KEEPIDLE", 4),
    SockOpt(IPPROTO_TCP, "TCP_KEEPINTVL", 5), SockOpt(IPPROTO_TCP, "TCP_KEEPCNT", 6),
    SockOpt(IPPROTO_TCP, "TCP_DEFER_ACCEPT", 9), SockOpt(IPPROTO_TCP, "TCP_FASTOPEN", 23),
    SockOpt(IPPROTO_TCP, "TCP_USER_TIMEOUT", 18), SockOpt(IPPROTO_TCP, "TCP_NOTSENT_LOWAT", 25),
    SockOpt(IPPROTO_TCP, "TCP_MAXSEG", 2), SockOpt(IPPROTO_TCP, "TCP_QUICKACK", 12),
    SockOpt(IPPROTO_IP, "IP_TOS", 1), SockOpt(IPPROTO_IP, "IP_TTL", 2), SockOpt(IPPROTO_IP, "IP_RECVERR", 11),
    SockOpt(IPPROTO_IP, "IP_PKTINFO", 8), SockOpt(IPPROTO_IP, "IP_RECVTOS", 13),
    SockOpt(IPPROTO_IP, "IP_MTU_DISCOVER", 10),
    SockOpt(IPPROTO_IPV6, "IPV6_TCLASS", 67), SockOpt(IPPROTO_IPV6, "IPV6_UNICAST_HOPS", 16),
    SockOpt(IPPROTO_IPV6, "IPV6_RECVERR", 25), SockOpt(IPPROTO_IPV6, "IPV6_RECVPKTINFO", 49),
    SockOpt(IPPROTO_IPV6, "IPV6_MTU_DISCOVER", 23),
)

SOCKET_FLAGS = ("reuseaddr", "reuseport", "v6only")

# Every host socket made for a container carries SO_MARK = MARK_TAG | n, n its container's number
# (host/store.py allocates it, 1..MARK_MAX): the kernel's egress check (host/egress.py) finds the
# container's rules by it. A container cannot change the mark of a host socket (SO_MARK needs
# CAP_NET_ADMIN in the host's user namespace). Clusters whose other software claims these bits
# (Calico's default mask is 0xffff0000) would need another tag.
MARK_TAG = 0x5CA0_0000
MARK_MASK = 0xFFFF_0000
MARK_MAX = 0xFFFF
# A host socket handed over unbound, for its receiver to bind to one of its container's endpoints
# (the fd service's `bindpool`, `namedpool`), carries UNBOUND_TAG | n instead: the bind guard lets it bind only
# to an endpoint of container n and then gives it the mark MARK_TAG | n; until then the egress
# table refuses every packet it would send and drops every packet sent to it.
UNBOUND_TAG = 0x5CA1_0000

# -- the syscalls seccomp mode traps -----------------------------------------------------------
# A condition is None (always trapped) or {arg index: POINTER | [(mask, value), ...]}:
# - POINTER: the 64-bit argument is not NULL;
# - cubes: the argument's low 32 bits (the kernel's `int`/`unsigned int` arguments) masked with
#   `mask` equal `value`, for one of the cubes.
# All indexes of a condition must hold. Why each one is trapped:
# - bind, connect: the decisions (ingress pairs, egress rules);
# - getsockname: a grafted socket shows the application the address it bound;
# - sendto only with a destination (arg 4 != NULL): glibc's send() stays off the slow path;
# - ioctl with a socket ioctl number 0x89xx (interface, route and SIOCGSKNS ioctls);
# - setsockopt(SOL_SOCKET, SO_BINDTODEVICE | SO_BINDTOIFINDEX).
# Refused with ENOSYS: io_uring_setup (its socket/connect operations would bypass seccomp).
SO_BINDTODEVICE, SO_BINDTOIFINDEX = 25, 62
POINTER = "nonnull"
LOW32 = 0xFFFFFFFF
TRAPPED: Mapping[str, Mapping | None] = MappingProxyType({
    "bind": None,
    "connect": None,
    "getsockname": None,
    "sendto": MappingProxyType({4: POINTER}),
    "ioctl": MappingProxyType({1: ((0xFFFFFF00, 0x8900),)}),
    "setsockopt": MappingProxyType({1: ((LOW32, SOL_SOCKET),),
                                    2: ((LOW32, SO_BINDTODEVICE), (LOW32, SO_BINDTOIFINDEX))}),
})
REFUSED: tuple[str, ...] = ("io_uring_setup",)

# What a container's policy needs trapped (`trapped_for`): the filter of `graft run --mode seccomp`
# and the OCI profile of graft-runtime are generated from the container's table at launch.
# - nothing can be grafted (no endpoints: no pair, rule or named socket can exist): nothing trapped
#   (io_uring stays refused);
# - anything can be grafted: bind, connect, sendto and the side doors stay trapped, whatever the
#   rules. A grafted socket must stay judged: connect(AF_UNSPEC) dissolves a grafted TCP socket's
#   state (a listener's too) and a second connect would then reach any host address; a grafted
#   UDP server's replies (sendto) reach only what an egress rule names; and a grafted socket whose
#   connect failed has lost its port (the kernel releases a port not bound explicitly) and must
#   not be re-bound on the host (bind is the guard, also where no ingress pair exists);
# - getsockname only with ingress pairs: a socket grafted by `bind` shows the app the address it
#   bound; one grafted by `connect` shows its real source, which the kernel answers anyway.
def trapped_for(endpoints: bool, ingress: bool) -> Mapping[str, Mapping | None]:
    """The subset of TRAPPED a container needs: `endpoints` (its table has any), `ingress` (it has
    ingress pairs)."""
    if not endpoints:
        return MappingProxyType({})
    return MappingProxyType({name: cond for name, cond in TRAPPED.items() if name != "getsockname" or ingress})


def c_options() -> str:
    """csrc/options.h: the same list for the preload library."""
    rows = [f"\t{{ {LEVEL_NAMES[o.level]}, {o.name}, {o.size}, {int(o.halved)} }}, /* {o.number} */"
            for o in COPIED_OPTIONS]
    return ("/* Generated by `python3 -m sockgraft.core.tables --c-options` from sockgraft/core/tables.py:\n"
            " * do not edit; tests/core/test_tables.py keeps the two equal. */\n"
            "#ifndef GRAFT_OPTIONS_H\n#define GRAFT_OPTIONS_H\n"
            "struct graft_opt { int level, name, size, halved; };\n"
            "static const struct graft_opt graft_copied_options[] = {\n" + "\n".join(rows) + "\n};\n#endif\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--c-options"]:
        sys.stdout.write(c_options())
    else:
        sys.exit("usage: python3 -m sockgraft.core.tables --c-options")
