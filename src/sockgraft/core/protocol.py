"""The fd-service wire protocol. Pure code: parsing and formatting only.

One request per SOCK_SEQPACKET message, ASCII words separated by single spaces (endpoint names hold
no whitespace); one reply per request, with the grafted socket attached by SCM_RIGHTS.

Requests::

    named NAME FAMILY TYPE PROTO FLAGS       socket bound to endpoint NAME (FAMILY 0: the endpoint's)
    named NAME FAMILY TYPE PROTO FLAGS DEST DPORT
                                             the same endpoint as source, connected (or connecting)
                                             to DEST:DPORT, its port chosen at connect time
    dial NAME TYPE PROTO                     socket connected to endpoint NAME (unix, or a fixed ip port)
    bind FAMILY ADDR PORT TYPE PROTO FLAGS   ingress: a container-side bind address
    connect FAMILY ADDR PORT TYPE PROTO      egress: a destination; the service connects the socket
                                             (source: the endpoint, port chosen at connect time,
                                             IP_BIND_ADDRESS_NO_PORT) and hands it over connected
                                             or connecting, never bound and unconnected
    pool FAMILY ADDR PORT TYPE PROTO N       the same judgement as `connect`; a grant is answered
                                             with N host sockets of the endpoint, bound with NO_PORT
                                             and marked, NOT connected: only where the kernel guards
                                             them (host/bindguard: no re-bind; host/egress: only the
                                             container's destinations); else `err EOPNOTSUPP`
    bindpool FAMILY ADDR PORT TYPE PROTO FLAGS N
                                             the same judgement as `bind`; a grant is answered with
                                             N host sockets NOT bound, marked UNBOUND_TAG
                                             (core.tables), and the address to bind them to (the
                                             endpoint's): only where the kernel guards them
                                             (host/bindguard: a bind only to the container's
                                             endpoints; host/egress: nothing sent or served
                                             unbound); else `err EOPNOTSUPP`
    namedpool NAME FAMILY TYPE PROTO N       the same for `named` without a destination
    sendto FAMILY ADDR PORT TYPE PROTO       egress of an unconnected send: a socket bound to the
                                             source endpoint with a port of its own
    prefilter                                the caller's effective rules, flat (engine.Prefilter
                                             lines): what the caller may skip asking about
    resolve NAME                             the endpoint's line, no socket
    show                                     the caller's table, one line per endpoint

FLAGS is `-` or a comma list of: reuseaddr, reuseport, v6only.

Caller rules (optional, additive): `bind`, `bindpool`, `connect`, `sendto`, `pool` and `prefilter` may carry extra
words after their fixed arguments, the rules of the caller's environment (the preload library's
GRAFT_CONV_PAIRS, GRAFT_EGRESS, GRAFT_BBCONN)::

    bind ... FLAGS in:ADDR:PORT[-PORT]=NAME ...     ingress pairs, in order (bindpool: the same)
    connect ... PROTO out:PREFIX/LEN=NAME ... bbconn:NAME     (sendto, pool: the same)
    prefilter in:... out:... bbconn:...             all of them

When a request carries rules of its kind, they replace the container's stored rules of that kind
for this request only. They are evaluated by the same engine against the container's own table,
so they can only map onto endpoints the container owns. A malformed rule is answered with
`err 22 ...` naming the rule.

Replies::

    ok FAMILY ADDR PORT      fd attached; the host address the socket is bound to (unix: ok 1 PATH)
    ok [LINE ...]            for resolve, show and prefilter: lines after a newline
    local                    no pair or rule matches: the operation stays inside the container
    err ERRNO MESSAGE        denied or failed, with an errno for the caller to return
"""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field

from sockgraft.core.endpoint import SpecError, check_name, parse_ip
from sockgraft.core.rules import EgressRule, IngressPair, parse_egress, parse_ingress

MAX_MESSAGE = 4096
FLAGS = frozenset({"reuseaddr", "reuseport", "v6only"})
FAMILIES = {0, socket.AF_UNIX, socket.AF_INET, socket.AF_INET6}
_ARITY = {"named": 5, "dial": 3, "bind": 6, "connect": 5, "sendto": 5, "pool": 6, "bindpool": 7, "namedpool": 5,
          "prefilter": 0,
          "resolve": 1, "show": 0}
MAX_POOL = 32  # host sockets one `pool`, `bindpool` or `namedpool` request may ask for (csrc/pool.c POOL_BATCH)
FIRST_POOL = MAX_POOL // 2  # what a client whose pool of a kind is empty asks for and waits (csrc/pool.c POOL_FIRST):
# a program that connects once pays for no more sockets than that; the batches asked for ahead are MAX_POOL
_RULE_PREFIXES = {"bind": ("in",), "bindpool": ("in",), "connect": ("out", "bbconn"), "sendto": ("out", "bbconn"), "pool": ("out", "bbconn"),
                  "prefilter": ("in", "out", "bbconn")}


class ProtocolError(ValueError):
    """A malformed request: answered with EINVAL, never a crash."""


@dataclass(slots=True)
class Request:
    verb: str
    name: str | None = None
    family: int = 0
    addr: str | None = None  # bind: container-side address; connect/sendto/named: the destination
    port: int = 0
    type: int = socket.SOCK_STREAM
    proto: int = 0
    flags: frozenset = field(default_factory=frozenset)
    # caller rules, parsed: ingress pairs (bind); egress rules and GRAFT_BBCONN names (connect)
    ingress: tuple[IngressPair, ...] = ()
    egress: tuple[EgressRule, ...] = ()
    bbconn: tuple[str, ...] = ()
    count: int = 0  # pool, bindpool, namedpool: how many host sockets

    @property
    def has_rules(self) -> bool:
        return bool(self.ingress or self.egress or self.bbconn)

    def encode(self) -> bytes:
        flags = ",".join(sorted(self.flags)) or "-"
        words = {
            "named": [self.name, self.family, self.type, self.proto, flags,
                      *((self.addr, self.port) if self.addr is not None else ())],
            "dial": [self.name, self.type, self.proto],
            "bind": [self.family, self.addr, self.port, self.type, self.proto, flags],
            "connect": [self.family, self.addr, self.port, self.type, self.proto],
            "sendto": [self.family, self.addr, self.port, self.type, self.proto],
            "pool": [self.family, self.addr, self.port, self.type, self.proto, self.count],
            "bindpool": [self.family, self.addr, self.port, self.type, self.proto, flags, self.count],
            "namedpool": [self.name, self.family, self.type, self.proto, self.count],
            "prefilter": [],
            "resolve": [self.name],
            "show": [],
        }[self.verb]
        rules = [*(f"in:{p}" for p in self.ingress), *(f"out:{r}" for r in self.egress),
                 *(f"bbconn:{n}" for n in self.bbconn)]
        return " ".join([self.verb, *map(str, words), *rules]).encode()


def _int(word: str, lo: int, hi: int, what: str) -> int:
    if not word.isdigit() or len(word) > 10 or not lo <= int(word) <= hi:
        raise ProtocolError(f"bad {what} {word[:32]!r}")
    return int(word)


def _flags(word: str) -> frozenset:
    if word == "-":
        return frozenset()
    flags = frozenset(word.split(","))
    if not flags <= FLAGS:
        raise ProtocolError(f"unknown flags {word[:64]!r}")
    return flags


def _name(word: str) -> str:
    try:
        return check_name(word)
    except SpecError as e:
        raise ProtocolError(str(e)) from None


def parse_request(data: bytes) -> Request:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError("request too long")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("request is not ASCII") from None
    words = text.split(" ")
    verb, args = words[0], words[1:]
    if verb not in _ARITY:
        raise ProtocolError(f"unknown request {verb[:32]!r}")
    extra = args[_ARITY[verb]:] if verb in _RULE_PREFIXES else []
    args = args[:len(args) - len(extra)]
    dest = args[5:] if verb == "named" and len(args) == 7 else []
    if len(args) - len(dest) != _ARITY[verb]:
        raise ProtocolError(f"{verb} takes {_ARITY[verb]} arguments, got {len(args)}")
    if verb == "show":
        return Request("show")
    if verb == "prefilter":
        return Request("prefilter", **_rules(verb, extra))
    if verb == "resolve":
        return Request("resolve", name=_name(args[0]))
    if verb in ("named", "namedpool"):
        family = _int(args[1], 0, 65535, "family")
        if family not in FAMILIES:
            raise ProtocolError(f"bad family {family}")
        if verb == "namedpool":
            return Request("namedpool", name=_name(args[0]), family=family, type=_int(args[2], 0, 15, "type"),
                           proto=_int(args[3], 0, 65535, "protocol"), count=_int(args[4], 1, MAX_POOL, "count"))
        req = Request("named", name=_name(args[0]), family=family, type=_int(args[2], 0, 15, "type"),
                      proto=_int(args[3], 0, 65535, "protocol"), flags=_flags(args[4]))
        if dest:
            try:
                req.addr = parse_ip(dest[0]).compressed
            except SpecError as e:
                raise ProtocolError(str(e)) from None
            req.port = _int(dest[1], 1, 65535, "destination port")
        return req
    if verb == "dial":
        return Request("dial", name=_name(args[0]), type=_int(args[1], 0, 15, "type"),
                       proto=_int(args[2], 0, 65535, "protocol"))
    family = _int(args[0], 0, 65535, "family")
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ProtocolError(f"bad family {family} for {verb}")
    try:
        ip = parse_ip(args[1], 4 if family == socket.AF_INET else 6)
    except SpecError as e:
        raise ProtocolError(str(e)) from None
    return Request(verb, family=family, addr=ip.compressed, port=_int(args[2], 0, 65535, "port"),
                   type=_int(args[3], 0, 15, "type"), proto=_int(args[4], 0, 65535, "protocol"),
                   flags=_flags(args[5]) if verb in ("bind", "bindpool") else frozenset(),
                   count=_int(args[-1], 1, MAX_POOL, "count") if verb in ("pool", "bindpool") else 0, **_rules(verb, extra))


_PARSERS = {"in": ("ingress", parse_ingress), "out": ("egress", parse_egress), "bbconn": ("bbconn", _name)}


def _rules(verb: str, words: list[str]) -> dict[str, tuple]:
    """The caller rules of a bind/connect request, parsed once, by kind."""
    kinds: dict[str, list] = {"ingress": [], "egress": [], "bbconn": []}
    for word in words:
        prefix, sep, spec = word.partition(":")
        if not sep or prefix not in _RULE_PREFIXES[verb]:
            raise ProtocolError(f"bad rule {word[:64]!r} for {verb}")
        kind, parse = _PARSERS[prefix]
        try:
            kinds[kind].append(parse(spec))
        except SpecError as e:
            raise ProtocolError(f"{str(e)[:200]} (from the caller's environment)") from None
    return {k: tuple(v) for k, v in kinds.items()}


# -- replies -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    kind: str  # ok | local | err
    family: int = 0
    addr: str | None = None
    port: int = 0
    errno: int = 0
    message: str = ""
    lines: tuple = ()

    def encode(self) -> bytes:
        if self.kind == "local":
            return b"local"
        if self.kind == "err":
            return f"err {self.errno} {self.message}".encode("ascii", "replace")[:MAX_MESSAGE]
        if self.addr is None:
            return "\n".join(["ok", *self.lines]).encode("ascii", "replace")[:MAX_MESSAGE]
        if self.family == socket.AF_UNIX:
            return f"ok {self.family} {self.addr}".encode("ascii", "replace")
        return f"ok {self.family} {self.addr} {self.port}".encode()


def parse_reply(data: bytes) -> Reply:
    """Decode one reply of the fd service. Anything but a well-formed reply raises ProtocolError (and
    nothing else): an `err` reply whose errno is not a number is kept, with errno EIO."""
    text = data.decode("ascii", "replace")
    if text == "local":
        return Reply("local")
    if text.startswith("err "):
        code, _, message = text[4:].partition(" ")
        return Reply("err", errno=int(code) if code.isdigit() and len(code) <= 4 else errno.EIO, message=message)
    head, _, rest = text.partition("\n")
    words = head.split(" ")
    if words[0] != "ok":
        raise ProtocolError(f"bad reply {text[:64]!r}")
    if len(words) == 1:
        return Reply("ok", lines=tuple(rest.split("\n")) if rest else ())
    family = _int(words[1], 0, 65535, "family in reply")
    if family == socket.AF_UNIX:
        path = head.split(" ", 2)[2] if len(words) >= 3 else ""
        if not path:
            raise ProtocolError(f"reply without a path {text[:64]!r}")
        return Reply("ok", family=family, addr=path)
    if family not in (socket.AF_INET, socket.AF_INET6) or len(words) != 4:
        raise ProtocolError(f"bad reply {text[:64]!r}")
    try:
        parse_ip(words[2], 4 if family == socket.AF_INET else 6)
    except SpecError as e:
        raise ProtocolError(f"bad address in reply: {e}") from None
    return Reply("ok", family=family, addr=words[2], port=_int(words[3], 0, 65535, "port in reply"))
