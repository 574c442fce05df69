"""The fd service's native fast path for `connect`, `pool`, `bind` and `named` requests
(csrc/fdservice_fast.c, libgraft-fdfast.so).

The service's loop calls `FastPath.serve` for a readable connection instead of recvmsg: C reads the
request and the caller's netns, and answers a `connect` or `pool` whose outcome the engine's compiled
table (`Policy.egress_table()`) states - a grant (the host socket connected as
hostsock.open_connecting does, or for `pool` N sockets made as hostsock.pooled does, sent with the
reply) or `local`. A `pool` is served in C only while egress.pools_off says pools are on for the
container (asked again at most once a second: `pools_on`) and only for a marked socket of a dynamic
endpoint. A `bind` is judged from `Policy.ingress_table()`, a `named` bind (the graft API's, no
destination) from what `Policy.decide` grants each endpoint of the container (`compile_named`);
everything else comes back with its bytes and the Python service answers it as before. The policy
stays in Python: tables are compiled here from the container's cached policy (again whenever that
object changes) and, for requests that carry the caller's own rules (the preload library's
GRAFT_EGRESS), from those rules once Python has parsed them (keyed by their exact bytes).

`GRAFT_FDSERVICE_FAST=0` turns it off; a library that is missing or cannot be loaded is said once
and the Python path serves."""
from __future__ import annotations

import ctypes
import functools
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass, field

from sockgraft.core.engine import Op, Policy
from sockgraft.core.protocol import ProtocolError, parse_request

LIB_NAME = "libgraft-fdfast.so"
ENV = "GRAFT_FDSERVICE_FAST"
ABI = 4  # csrc/fdservice_fast.h FS_ABI
POOLS, UNBOUND_POOLS = 1, 2  # fs_serve flags: FS_POOLS, FS_UNBOUND_POOLS
CONNECT, POOL, BIND, NAMED, BINDPOOL, NAMEDPOOL = 0, 1, 2, 3, 4, 5  # FS_CONNECT ... FS_NAMEDPOOL
VERBS = ("connect", "pool", "bind", "named", "bindpool", "namedpool")
POOLS_RECHECK = 1.0  # seconds between two egress.pools_off answers for one container
SPIN_ENV = "GRAFT_FDSERVICE_SPIN"  # µs the C loop waits, awake, for a back-to-back caller's next request (0: never)
SPIN_US = 50
SPIN_GAP = 0.0005  # a caller that asks again within this many seconds of its last answer is back to back
MAX_BATCH = 32  # requests one call may answer back to back ...
BATCH_BUDGET_US = 2000  # ... and for at most this long: the tables it decides from are at most this old
MAX_TAILS = 32  # caller rule sets remembered per container (a caller cannot grow this without bound)
MAX_MESSAGE = 4096

DROP, HANDBACK, GRANT, LOCAL, FAIL, NOTHING = 0, 1, 2, 3, 4, -1


class Row(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint8), ("plen", ctypes.c_uint8), ("kind", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("ep_port", ctypes.c_uint16), ("pad2", ctypes.c_uint16),
                ("net", ctypes.c_uint8 * 16), ("ep_addr", ctypes.c_uint8 * 16)]


class InRow(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint8), ("wildcard", ctypes.c_uint8), ("kind", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("port_lo", ctypes.c_uint16), ("port_hi", ctypes.c_uint16),
                ("ep_port", ctypes.c_uint16), ("pad2", ctypes.c_uint16),
                ("addr", ctypes.c_uint8 * 16), ("ep_addr", ctypes.c_uint8 * 16)]


FOR_EGRESS, FOR_BIND, FOR_NAMED = 1, 2, 4  # fs_table.verbs (FS_FOR_*)


class Table(ctypes.Structure):
    _fields_ = [("tail", ctypes.c_char_p), ("tail_len", ctypes.c_uint32), ("nrows", ctypes.c_uint32),
                ("rows", ctypes.POINTER(Row)), ("verbs", ctypes.c_uint32), ("nin", ctypes.c_uint32),
                ("in_rows", ctypes.POINTER(InRow))]


class Req(ctypes.Structure):
    _fields_ = [("verb", ctypes.c_int32), ("count", ctypes.c_int32), ("flags", ctypes.c_int32),
                ("family", ctypes.c_int32), ("type", ctypes.c_int32), ("proto", ctypes.c_int32),
                ("port", ctypes.c_int32), ("addr", ctypes.c_uint8 * 16), ("table", ctypes.c_int32)]


class Out(ctypes.Structure):
    _fields_ = [("result", ctypes.c_int32), ("err", ctypes.c_int32), ("table", ctypes.c_int32),
                ("row", ctypes.c_int32), ("family", ctypes.c_int32), ("port", ctypes.c_int32),
                ("addr", ctypes.c_uint8 * 16), ("ino_ok", ctypes.c_int32), ("trunc", ctypes.c_int32),
                ("send_failed", ctypes.c_int32), ("host_port", ctypes.c_int32), ("verb", ctypes.c_int32),
                ("count", ctypes.c_int32), ("dual", ctypes.c_int32), ("ino", ctypes.c_uint64),
                ("host", ctypes.c_char * 64), ("len", ctypes.c_uint32), ("data", ctypes.c_char * (MAX_MESSAGE + 1))]


def lib_path() -> str:
    prefix = os.environ.get("GRAFT_PREFIX", "/usr/local")  # the Makefile's PREFIX (as modes/preload)
    return os.path.join(prefix, "lib", "sockgraft", LIB_NAME)


_said = False


def open_library(path: str | None = None) -> ctypes.CDLL:
    """The library with its entry points declared (OSError when it cannot be loaded)."""
    lib = ctypes.CDLL(path or lib_path())
    abi = getattr(lib, "fs_abi", None)
    if abi is None or abi() != ABI:
        raise OSError(f"{path or lib_path()}: another interface than this sockgraft's (run scripts/setup)")
    lib.fs_serve.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32,
                             ctypes.POINTER(Table), ctypes.c_int, ctypes.POINTER(Out)]
    lib.fs_serve.restype = ctypes.c_int
    lib.fs_serve_batch.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32,
                                   ctypes.POINTER(Table), ctypes.c_int, ctypes.POINTER(Out), ctypes.c_int,
                                   ctypes.c_int, ctypes.c_int]
    lib.fs_serve_batch.restype = ctypes.c_int
    lib.fs_parse.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(Table), ctypes.c_int, ctypes.POINTER(Req)]
    lib.fs_parse.restype = ctypes.c_int
    lib.fs_lookup.argtypes = [ctypes.POINTER(Table), ctypes.POINTER(Req), ctypes.POINTER(ctypes.c_int),
                              ctypes.POINTER(ctypes.c_int), ctypes.c_uint8 * 16, ctypes.POINTER(ctypes.c_int)]
    lib.fs_lookup.restype = ctypes.c_int
    lib.fs_lookup_bind.argtypes = [ctypes.POINTER(Table), ctypes.POINTER(Req), ctypes.POINTER(ctypes.c_int),
                                   ctypes.POINTER(ctypes.c_int), ctypes.c_uint8 * 16, ctypes.POINTER(ctypes.c_int),
                                   ctypes.POINTER(ctypes.c_int)]
    lib.fs_lookup_bind.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL | None:
    """The library for the service, or None: off by GRAFT_FDSERVICE_FAST=0, or missing/unloadable
    (said once per process)."""
    global _said
    if os.environ.get(ENV, "1") == "0":
        return None
    try:
        return open_library()
    except (OSError, AttributeError) as e:  # AttributeError: a library without these entry points
        if not _said:
            _said = True
            sys.stderr.write(f"graft: fd service fast path unavailable ({e}): requests are served by Python\n")
        return None


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def compile_rows(policy: Policy) -> tuple[ctypes.Array, list[tuple[str, str]]]:
    """The rows of `policy.egress_table()` for C, and per row what the audit names: the endpoint
    and the engine's reason for a grant by that rule."""
    rows = policy.egress_table().rows
    rules = sorted(policy.egress, key=lambda r: -r.network.prefixlen)  # egress_table's order
    arr = (Row * max(1, len(rows)))()
    meta = []
    for i, ((version, net, plen, ep_type, ep_addr, ep_port), rule) in enumerate(zip(rows, rules, strict=True)):
        if (version, net, plen) != (rule.network.version, str(rule.network.network_address), rule.network.prefixlen):
            raise AssertionError("egress_table rows are not in the order of the rules")
        r = arr[i]
        r.version, r.plen, r.ep_port = version, plen, ep_port
        r.kind = {"ipv4": 4, "ipv6": 6}.get(ep_type, 0)
        ctypes.memmove(r.net, _packed(net), 4 if version == 4 else 16)
        if r.kind:
            ctypes.memmove(r.ep_addr, _packed(ep_addr), 4 if r.kind == 4 else 16)
        meta.append((rule.endpoint, f"egress {rule}"))
    return arr, meta


def compile_in_rows(policy: Policy) -> tuple[ctypes.Array, list[tuple[str, str]]]:
    """The rows of `policy.ingress_table()` for C, and per row the endpoint and the reason the engine
    gives a grant by that pair (fdservice adds " (dual-stack [::] bind)" where C says `dual`)."""
    rows = policy.ingress_table().rows
    arr = (InRow * max(1, len(rows)))()
    meta = []
    for i, ((version, addr, lo, hi, ep_type, ep_addr, ep_port), pair) in enumerate(zip(rows, policy.ingress, strict=True)):
        r = arr[i]
        r.version, r.port_lo, r.port_hi, r.ep_port = version, lo, hi, ep_port
        r.wildcard = int(ipaddress.ip_address(addr).is_unspecified)
        r.kind = {"ipv4": 4, "ipv6": 6}.get(ep_type, 0)
        ctypes.memmove(r.addr, _packed(addr), 4 if version == 4 else 16)
        if r.kind:
            ctypes.memmove(r.ep_addr, _packed(ep_addr), 4 if r.kind == 4 else 16)
        meta.append((pair.endpoint, f"ingress {pair}"))
    return arr, meta


def compile_named(policy: Policy) -> list[tuple[bytes, ctypes.Array, tuple[str, str]]]:
    """Per endpoint, the table of a `named` request (fdservice_fast.h FS_FOR_NAMED): its name, one
    InRow holding the host address the engine grants a socket of the endpoint's own family (kind 0:
    none, the engine decides: a unix endpoint) and what the audit names (endpoint, reason). C
    carries the family over (v4-mapped for an IPv6 socket on an ipv4 endpoint) as for `bind`."""
    out = []
    for name in policy.endpoints:
        d = policy.decide(Op("named", 0, name=name))
        row = (InRow * 1)()
        if d.granted and d.family in (socket.AF_INET, socket.AF_INET6):
            row[0].kind = 4 if d.family == socket.AF_INET else 6
            row[0].ep_port = d.host[1]
            ctypes.memmove(row[0].ep_addr, _packed(d.host[0]), 4 if d.family == socket.AF_INET else 16)
        out.append((name.encode(), row, (name, d.reason)))
    return out


@dataclass
class _Compiled:
    policy: Policy
    tails: dict[bytes, Policy] = field(default_factory=dict)  # caller rule words -> the effective policy
    tables: ctypes.Array | None = None
    meta: list = field(default_factory=list)  # per table: per row (endpoint, reason)
    in_meta: list = field(default_factory=list)  # per table: per ingress row (endpoint, reason)
    keep: list = field(default_factory=list)  # what the C tables point to
    local: object = None  # the engine's decision for a connect no rule matches (for the audit)
    pools_on: int = 0  # fs_serve flags: what egress.pools_off answered "" to for this container (at pools_at)
    pools_at: float = -1e9

    def build(self) -> None:
        sets = [(b"", self.policy), *self.tails.items()]
        named = compile_named(self.policy)
        self.tables = (Table * (len(sets) + len(named)))()
        self.meta, self.in_meta, self.keep = [], [], []
        for t, (tail, pol) in zip(self.tables[:len(sets)], sets):
            rows, meta = compile_rows(pol)
            in_rows, in_meta = compile_in_rows(pol)
            t.tail, t.tail_len, t.nrows = tail, len(tail), len(meta)
            t.rows = ctypes.cast(rows, ctypes.POINTER(Row))
            t.verbs = tail_verbs(tail)
            t.nin, t.in_rows = len(in_meta), ctypes.cast(in_rows, ctypes.POINTER(InRow))
            self.meta.append(meta)
            self.in_meta.append(in_meta)
            self.keep += [tail, rows, in_rows]
        for t, (name, row, meta) in zip(self.tables[len(sets):], named):
            t.tail, t.tail_len, t.verbs, t.nin = name, len(name), FOR_NAMED, 1
            t.in_rows = ctypes.cast(row, ctypes.POINTER(InRow))
            self.meta.append([])
            self.in_meta.append([meta])
            self.keep += [name, row]
        self.local = self.policy.decide(Op("connect", socket.AF_UNIX))  # no rule can match: local


def _is_bind_tail(tail: bytes) -> bool:
    return tail.startswith(b" in:")  # a bind's rules are ingress pairs only (protocol._RULE_PREFIXES)


def tail_verbs(tail: bytes) -> int:
    """The requests a table of these caller rules may serve (fs_table.verbs): the container's own
    table (no rules) all of them; a bind's pairs only `bind` and `bindpool`; egress rules `connect`
    and `pool`."""
    return (FOR_EGRESS | FOR_BIND) if not tail else FOR_BIND if _is_bind_tail(tail) else FOR_EGRESS


def _tail(data: bytes) -> bytes:
    """The bytes after a connect request's 5th argument, a pool or bind request's 6th or a bindpool
    request's 7th (its caller rules, with the space before)."""
    fixed = 7 if data.startswith(b"bindpool ") else 6 if data.startswith((b"pool ", b"bind ")) else 5
    words = data.split(b" ", fixed + 1)
    return b" " + words[fixed + 1] if len(words) == fixed + 2 else b""


def request_bytes(out: Out) -> bytes:
    """The request C handed back."""
    return ctypes.string_at(ctypes.addressof(out) + Out.data.offset, out.len)


@functools.lru_cache(maxsize=4096)
def dest_text(family: int, packed: bytes) -> str:
    """The destination as protocol.parse_request writes it (ipaddress's compressed form)."""
    return ipaddress.ip_address(packed[:4] if family == socket.AF_INET else packed).compressed


class FastPath:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.outs = (Out * MAX_BATCH)()
        self._outs_ref = ctypes.cast(self.outs, ctypes.POINTER(Out))
        try:
            self.spin_us = max(0, int(os.environ.get(SPIN_ENV, SPIN_US)))
        except ValueError:
            self.spin_us = SPIN_US
        self._by_key: dict[str, _Compiled] = {}
        self.stats = {"grant": 0, "pool": 0, "bind": 0, "named": 0, "bindpool": 0, "namedpool": 0, "local": 0, "fail": 0,
                      "handback": 0}  # grant: all
        self.back_to_back = 0  # answers given in C after the first of a call (fs_serve_batch)

    def compiled(self, key: str, policy: Policy) -> _Compiled:
        c = self._by_key.get(key)
        if c is None or c.policy is not policy:
            c = _Compiled(policy, {tail: self._with_rules(policy, tail) for tail in (c.tails if c else ())})
            c.build()
            self._by_key[key] = c
        return c

    @staticmethod
    def _with_rules(policy: Policy, tail: bytes) -> Policy:
        req = parse_request((b"bind 2 0.0.0.0 0 1 0 -" if _is_bind_tail(tail) else b"connect 2 0.0.0.0 0 1 0") + tail)
        return policy.with_caller_rules(req.ingress, req.egress, req.bbconn)

    def learn(self, key: str, policy: Policy, data: bytes) -> None:
        """After Python answered a handed-back `connect`, `pool`, `bind` or `bindpool` with caller
        rules: compile them for next time (a table is kept per exact tail: " out:..." for connect and
        pool, " in:..." for bind and bindpool)."""
        if not data.startswith((b"connect ", b"pool ", b"bind ", b"bindpool ")):
            return
        tail = _tail(data)
        c = self.compiled(key, policy)
        if not tail or tail in c.tails or len(c.tails) >= MAX_TAILS:
            return
        try:
            c.tails[tail] = self._with_rules(policy, tail)
        except ProtocolError:
            return
        c.build()

    def forget(self, key: str) -> None:
        self._by_key.pop(key, None)


    @staticmethod
    def pools(c: _Compiled, pools_off, now: float) -> int:
        """FS_POOLS when `pools_off(unbound=False)` (egress.pools_off of the container) says "", and
        FS_UNBOUND_POOLS too when `pools_off(unbound=True)` does - asked again at most once every
        POOLS_RECHECK seconds, and whenever the policy object changed (a new _Compiled)."""
        if now - c.pools_at >= POOLS_RECHECK:
            on = 0 if pools_off(unbound=False) else POOLS
            c.pools_on, c.pools_at = on | (UNBOUND_POOLS if on and not pools_off(unbound=True) else 0), now
        return c.pools_on

    def serve(self, fd: int, pidfd: int, container_ino: int, c: _Compiled | None, flags: int = 0,
              back_to_back: bool = False) -> list[Out]:
        """One request of a readable connection answered (or handed back) by C; for a back-to-back
        caller also those that follow within spin_us of each answer (fs_serve_batch). The answers, in
        order (reused buffers: read them before the next call)."""
        tables, n = (c.tables, len(c.tables)) if c is not None else (None, 0)
        spin = self.spin_us if back_to_back else 0
        k = self.lib.fs_serve_batch(fd, pidfd, container_ino, c.policy.mark if c is not None else 0, flags, tables, n,
                                    self._outs_ref, MAX_BATCH, spin, BATCH_BUDGET_US)
        return [self.outs[i] for i in range(k)]
