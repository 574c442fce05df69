"""The fd service's native fast path for `connect` requests (csrc/fdservice_fast.c, libgraft-fdfast.so).

The service's loop calls `FastPath.serve` for a readable connection instead of recvmsg: C reads the
request and the caller's netns, and answers a `connect` whose outcome the engine's compiled table
(`Policy.egress_table()`) states - a grant (the host socket connected as hostsock.open_connecting
does, sent with the reply) or `local`. Everything else comes back with its bytes and the Python
service answers it as before. The policy stays in Python: tables are compiled here from the
container's cached policy (again whenever that object changes) and, for requests that carry the
caller's own rules (the preload library's GRAFT_EGRESS), from those rules once Python has parsed
them (keyed by their exact bytes).

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
ABI = 2  # csrc/fdservice_fast.h FS_ABI
MAX_TAILS = 32  # caller rule sets remembered per container (a caller cannot grow this without bound)
MAX_MESSAGE = 4096

DROP, HANDBACK, GRANT, LOCAL, FAIL, NOTHING = 0, 1, 2, 3, 4, -1


class Row(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint8), ("plen", ctypes.c_uint8), ("kind", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("ep_port", ctypes.c_uint16), ("pad2", ctypes.c_uint16),
                ("net", ctypes.c_uint8 * 16), ("ep_addr", ctypes.c_uint8 * 16)]


class Table(ctypes.Structure):
    _fields_ = [("tail", ctypes.c_char_p), ("tail_len", ctypes.c_uint32), ("nrows", ctypes.c_uint32),
                ("rows", ctypes.POINTER(Row))]


class Req(ctypes.Structure):
    _fields_ = [("family", ctypes.c_int32), ("type", ctypes.c_int32), ("proto", ctypes.c_int32),
                ("port", ctypes.c_int32), ("addr", ctypes.c_uint8 * 16), ("table", ctypes.c_int32)]


class Out(ctypes.Structure):
    _fields_ = [("result", ctypes.c_int32), ("err", ctypes.c_int32), ("table", ctypes.c_int32),
                ("row", ctypes.c_int32), ("family", ctypes.c_int32), ("port", ctypes.c_int32),
                ("addr", ctypes.c_uint8 * 16), ("ino_ok", ctypes.c_int32), ("trunc", ctypes.c_int32),
                ("send_failed", ctypes.c_int32), ("host_port", ctypes.c_int32), ("ino", ctypes.c_uint64),
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
    lib.fs_serve.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32, ctypes.POINTER(Table),
                             ctypes.c_int, ctypes.POINTER(Out)]
    lib.fs_serve.restype = ctypes.c_int
    lib.fs_parse.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(Table), ctypes.c_int, ctypes.POINTER(Req)]
    lib.fs_parse.restype = ctypes.c_int
    lib.fs_lookup.argtypes = [ctypes.POINTER(Table), ctypes.POINTER(Req), ctypes.POINTER(ctypes.c_int),
                              ctypes.POINTER(ctypes.c_int), ctypes.c_uint8 * 16, ctypes.POINTER(ctypes.c_int)]
    lib.fs_lookup.restype = ctypes.c_int
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


@dataclass
class _Compiled:
    policy: Policy
    tails: dict[bytes, Policy] = field(default_factory=dict)  # caller rule words -> the effective policy
    tables: ctypes.Array | None = None
    meta: list = field(default_factory=list)  # per table: per row (endpoint, reason)
    keep: list = field(default_factory=list)  # what the C tables point to
    local: object = None  # the engine's decision for a connect no rule matches (for the audit)

    def build(self) -> None:
        sets = [(b"", self.policy), *self.tails.items()]
        self.tables = (Table * len(sets))()
        self.meta, self.keep = [], []
        for t, (tail, pol) in zip(self.tables, sets):
            rows, meta = compile_rows(pol)
            t.tail, t.tail_len, t.nrows = tail, len(tail), len(meta)
            t.rows = ctypes.cast(rows, ctypes.POINTER(Row))
            self.meta.append(meta)
            self.keep += [tail, rows]
        self.local = self.policy.decide(Op("connect", socket.AF_UNIX))  # no rule can match: local


def _tail(data: bytes) -> bytes:
    """The bytes after a connect request's 5th argument (its caller rules, with the space before)."""
    words = data.split(b" ", 6)
    return b" " + words[6] if len(words) == 7 else b""


@functools.lru_cache(maxsize=4096)
def dest_text(family: int, packed: bytes) -> str:
    """The destination as protocol.parse_request writes it (ipaddress's compressed form)."""
    return ipaddress.ip_address(packed[:4] if family == socket.AF_INET else packed).compressed


class FastPath:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.out = Out()
        self._out_ref = ctypes.byref(self.out)
        self._by_key: dict[str, _Compiled] = {}
        self.stats = {"grant": 0, "local": 0, "fail": 0, "handback": 0}

    def compiled(self, key: str, policy: Policy) -> _Compiled:
        c = self._by_key.get(key)
        if c is None or c.policy is not policy:
            c = _Compiled(policy, {tail: self._with_rules(policy, tail) for tail in (c.tails if c else ())})
            c.build()
            self._by_key[key] = c
        return c

    @staticmethod
    def _with_rules(policy: Policy, tail: bytes) -> Policy:
        req = parse_request(b"connect 2 0.0.0.0 0 1 0" + tail)
        return policy.with_caller_rules(req.ingress, req.egress, req.bbconn)

    def learn(self, key: str, policy: Policy, data: bytes) -> None:
        """After Python answered a handed-back `connect` with caller rules: compile them for next time."""
        if not data.startswith(b"connect "):
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

    def request_bytes(self) -> bytes:
        """The request C handed back."""
        return ctypes.string_at(ctypes.addressof(self.out) + Out.data.offset, self.out.len)

    def serve(self, fd: int, pidfd: int, container_ino: int, c: _Compiled | None) -> Out:
        tables, n = (c.tables, len(c.tables)) if c is not None else (None, 0)
        self.lib.fs_serve(fd, pidfd, container_ino, c.policy.mark if c is not None else 0, tables, n, self._out_ref)
        return self.out
