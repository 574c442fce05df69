"""The binding of `libgraft-seccomp.so` (csrc/seccomp_fast.c, .h): where it is, its prototypes and
the layouts of the structures it shares with Python (checked against the library's `gs_abi` when
loaded), the answers it gives, and the compiling of a Policy into its Table (`make_table`: the
egress rows here, the ingress rows the fd service's, modes/api/fast.compile_in_rows). What is done
with it - the tables per target, the pools, the records - is modes/seccomp/fast.py."""
from __future__ import annotations

import ctypes
import ipaddress
import os
import sys

from sockgraft.modes.api.fast import InRow, compile_in_rows
from sockgraft.modes.seccomp import kernel as K

LIB_NAME = "libgraft-seccomp.so"
PREFIX = os.environ.get("GRAFT_PREFIX", "/usr/local")  # the Makefile's PREFIX
LIB_DIR = os.path.join(PREFIX, "lib", "sockgraft")
ENV = "GRAFT_SECCOMP_FAST"

NOTHING, HANDBACK, DONE, PARK, HUP, ERROR = 0, 1, 2, 3, 4, 5
FALLBACK = object()  # serve(): receive this one in Python
BATCH = 16  # notifications served in one call at most (other listeners wait no longer than that)
DONE_GRANT, DONE_LOCAL, DONE_FAILED, DONE_GONE, DONE_CONTINUE = 1, 2, 3, 4, 5
LOCAL, GRANT, ASK = 0, 1, 2
MODE = "seccomp"


class Row(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint8), ("plen", ctypes.c_uint8), ("eptype", ctypes.c_uint8),
                ("pad", ctypes.c_uint8), ("epport", ctypes.c_uint16), ("pad2", ctypes.c_uint16),
                ("net", ctypes.c_uint8 * 16), ("epaddr", ctypes.c_uint8 * 16)]


POOL = 64  # csrc/seccomp_fast.h GS_POOL (the layout check in load() holds it)
POOL_LOW = POOL // 2  # a row's pool is filled again once it holds fewer


class Pool(ctypes.Structure):
    _fields_ = [("family", ctypes.c_int32), ("type", ctypes.c_int32), ("n", ctypes.c_uint32),
                ("fds", ctypes.c_int32 * POOL)]


class Table(ctypes.Structure):
    _fields_ = [("host_cookie", ctypes.c_uint64), ("version", ctypes.c_uint64), ("target_netns_ino", ctypes.c_uint64),
                ("nrows", ctypes.c_uint32), ("mark", ctypes.c_uint32), ("rows", ctypes.POINTER(Row)),
                ("pools", ctypes.POINTER(Pool)), ("ningress", ctypes.c_uint32), ("optmap", ctypes.c_int32),
                ("ingress", ctypes.POINTER(InRow))]


class Out(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("nr", ctypes.c_int32), ("arch", ctypes.c_uint32), ("ip", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6),
                ("what", ctypes.c_int32), ("decided", ctypes.c_int32), ("row", ctypes.c_int32),
                ("err", ctypes.c_int32), ("family", ctypes.c_int32), ("type", ctypes.c_int32),
                ("proto", ctypes.c_int32), ("hostfd", ctypes.c_int32), ("appfd", ctypes.c_int32),
                ("cloexec", ctypes.c_int32), ("sndtimeo_us", ctypes.c_int64), ("addrlen", ctypes.c_uint32),
                ("addr", ctypes.c_uint8 * 128), ("ns", ctypes.c_uint32 * 8), ("kind", ctypes.c_int32),
                ("pooled", ctypes.c_uint32), ("slot", ctypes.c_int32), ("stale", ctypes.c_int32),
                ("v6only", ctypes.c_int32), ("dual", ctypes.c_int32), ("host_ino", ctypes.c_uint64),
                ("hostlen", ctypes.c_uint32), ("host", ctypes.c_uint8 * 28)]


_ADDR, _HOST = Out.addr.offset, Out.host.offset
QROWS = 8  # csrc/seccomp_fast.h GS_QROWS (the layout check below holds it)


class Quiet(ctypes.Structure):
    """What the C loop answered without a record (gs_loop_quiet): locals per verb (bind, connect),
    pooled grants per row, with the socket kind and destination of each row's last recorded grant."""
    _fields_ = [("locals", ctypes.c_uint64 * 2), ("grants", ctypes.c_uint64 * QROWS),
                ("family", ctypes.c_int32 * QROWS), ("type", ctypes.c_int32 * QROWS),
                ("proto", ctypes.c_int32 * QROWS), ("addrlen", ctypes.c_uint32 * QROWS),
                ("addr", (ctypes.c_uint8 * 28) * QROWS)]


def _notif(out: Out) -> K.Notif:
    """The notification of a record, for the Python handlers or the parking."""
    return K.Notif(out.id, out.pid, out.flags, out.nr, out.arch, out.ip, tuple(out.args))


# the steps gs_serve times (gs_out.ns; seccomp_fast.h GS_T_*): cost.py prints them
STEPS = ("pidfd_getfd", "sockopts+memory copy", "id_valid+lookup+netns+getsockname", "socket+bind+options",
         "connect (twice if in progress)", "fdinfo+addfd", "send")


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() not in ("0", "no", "off", "false")


def library_path() -> str:
    return os.path.join(LIB_DIR, LIB_NAME)


def load(path: str | None = None) -> ctypes.CDLL:
    """The library, its prototypes set and its struct layout checked (OSError otherwise)."""
    lib = ctypes.CDLL(path or library_path(), use_errno=True)
    lib.gs_abi.restype = ctypes.c_int
    if lib.gs_abi() != ctypes.sizeof(Table) * 1000000 + ctypes.sizeof(Out) * 1000 + ctypes.sizeof(Row):
        raise OSError(f"{path or library_path()}: struct layout differs from fastlib.py (rebuild: scripts/setup)")
    try:
        for name, kind in (("gs_quiet", Quiet), ("gs_pool", Pool)):
            if getattr(lib, f"{name}_size")() != ctypes.sizeof(kind):
                raise OSError(f"{path or library_path()}: struct {name} differs from fastlib.py (rebuild: scripts/setup)")
    except AttributeError:
        raise OSError(f"{path or library_path()}: no gs_quiet_size or gs_pool_size (rebuild: scripts/setup)") from None
    lib.gs_serve.argtypes = [ctypes.c_int, ctypes.POINTER(Table), ctypes.POINTER(Out)]
    lib.gs_serve.restype = ctypes.c_int
    lib.gs_serve_batch.argtypes = [ctypes.c_int, ctypes.POINTER(Table), ctypes.POINTER(Out), ctypes.c_int]
    lib.gs_serve_batch.restype = ctypes.c_int
    lib.gs_lookup.argtypes = [ctypes.POINTER(Table), ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                              ctypes.c_uint8 * 16, ctypes.POINTER(ctypes.c_uint16)]
    lib.gs_lookup.restype = ctypes.c_int
    lib.gs_lookup_bind.argtypes = [ctypes.POINTER(Table), ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                   ctypes.POINTER(ctypes.c_int), ctypes.c_uint8 * 16, ctypes.POINTER(ctypes.c_uint16)]
    lib.gs_lookup_bind.restype = ctypes.c_int
    for name in ("gs_bind_local", "gs_connect_local"):
        getattr(lib, name).restype = ctypes.c_int
    P = ctypes.c_void_p
    for name, args, res in (("gs_loop_new", [ctypes.c_char_p], P), ("gs_loop_fd", [P], ctypes.c_int),
                            ("gs_loop_add", [P, ctypes.c_int, ctypes.POINTER(Table)], ctypes.c_int),
                            ("gs_loop_set_table", [P, ctypes.c_int, ctypes.POINTER(Table), ctypes.POINTER(Quiet)], P),
                            ("gs_loop_remove", [P, ctypes.c_int], ctypes.c_int), ("gs_loop_run", [P], ctypes.c_int),
                            ("gs_loop_stop", [P], None), ("gs_loop_take", [P, ctypes.POINTER(Out), ctypes.c_int], ctypes.c_int),
                            ("gs_loop_counts", [P, ctypes.c_uint64 * 4], None),
                            ("gs_loop_quiet", [P, ctypes.c_int, ctypes.POINTER(Quiet)], None), ("gs_loop_lock", [P], None),
                            ("gs_loop_unlock", [P], None), ("gs_version", [P], ctypes.c_uint64),
                            ("gs_loop_free", [P], None),
                            ("gs_pool_fill", [P, ctypes.POINTER(Table), ctypes.c_int, ctypes.c_int, ctypes.c_uint8 * 16,
                                              ctypes.c_uint32], ctypes.c_int)):
        try:
            fn = getattr(lib, name)
        except AttributeError:  # an older library
            raise OSError(f"{path or library_path()}: no {name} (rebuild: scripts/setup)") from None
        fn.argtypes, fn.restype = args, res
    return lib


_said = False


def try_load() -> ctypes.CDLL | None:
    """The library if the fast path is on and it loads; None otherwise (said once per process)."""
    global _said
    if not enabled():
        return None
    try:
        return load()
    except OSError as e:
        if not _said:
            _said = True
            print(f"graft: seccomp supervisor: no native fast path ({e}): connects served in Python",
                  file=sys.stderr)
        return None


def _bytes16(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed.ljust(16, b"\0")


def compile_rows(table) -> tuple[ctypes.Array, list[int]]:
    """The C rows of an EgressTable (a row whose endpoint address C cannot hold: "ask")."""
    rows = (Row * max(1, len(table.rows)))()
    for i, (version, net, plen, ep_type, ep_addr, ep_port) in enumerate(table.rows):
        r = rows[i]
        r.version, r.plen = version, plen
        r.net[:] = list(_bytes16(net))
        r.eptype = 0
        if ep_type != "ask":
            try:
                r.epaddr[:] = list(_bytes16(ep_addr))
                r.eptype = 4 if ep_type == "ipv4" else 6
                r.epport = ep_port
            except ValueError:  # e.g. a scoped address: the engine decides
                r.eptype = 0
    return rows, len(table.rows)


def make_table(policy, host_cookie: int = 0, netns_ino: int = 0, mark: int = 0, version: int = 0, optmap: int = -1):
    """(Table, the arrays it points to: keep them alive together) for a Policy: its egress and
    ingress tables; `optmap`: the option watch's map fd (host/optwatch.py; -1: none)."""
    rows, n = compile_rows(policy.egress_table())
    ins, in_meta = compile_in_rows(policy)  # the fd service's rows (fdservice_fast.h struct fs_in_row)
    ni = len(in_meta)
    t = Table(host_cookie, version, netns_ino or 0, n, mark, ctypes.cast(rows, ctypes.POINTER(Row)), None, ni, optmap,
              ctypes.cast(ins, ctypes.POINTER(InRow)))
    return t, (rows, ins)
