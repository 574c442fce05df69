"""Host-netns sockets for granted decisions. Called by the fd service and the seccomp supervisor,
both of which run in the host's netns, so a plain socket() here is a host socket."""
from __future__ import annotations

import errno
import os
import socket
import stat

from sockgraft.core.engine import Decision
from sockgraft.core.tables import COPIED_OPTIONS, IPPROTO_IP, IPPROTO_IPV6, IPPROTO_TCP, MARK_MAX, UNBOUND_TAG, SockOpt


def _unlink_stale_unix(path: str) -> None:
    """Remove a socket file nobody listens on any more (a dead server's), never anything else."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def _mark(s: socket.socket, d: Decision) -> None:
    """Mark a host socket as its container's (core.tables.MARK_TAG), once it is bound: the bind
    guard (host/bindguard.py) refuses every later bind() of a marked socket."""
    if d.mark and d.family != socket.AF_UNIX:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, d.mark)


def open_bound(d: Decision, sotype: int, proto: int = 0, flags: frozenset = frozenset()) -> socket.socket:
    """A host socket bound to the granted address. A port is always allocated at bind (never
    IP_BIND_ADDRESS_NO_PORT), so the receiver cannot bind it again elsewhere."""
    s = socket.socket(d.family, sotype | socket.SOCK_CLOEXEC, proto)
    try:
        if "reuseaddr" in flags:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if "reuseport" in flags:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if d.family == socket.AF_INET6:
            v6only = "v6only" in flags and not d.host[0].startswith("::ffff:")
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        if d.family == socket.AF_UNIX and isinstance(d.host, str) and not d.host.startswith("\0"):
            _unlink_stale_unix(d.host)
        s.bind(d.host)
        _mark(s, d)
        return s
    except BaseException:
        s.close()
        raise


IP_BIND_ADDRESS_NO_PORT = 24


def open_connecting(d: Decision, sotype: int, proto: int, dest: tuple | bytes,
                    connect=None) -> tuple[socket.socket, int]:
    """An egress grant carried out the way the kernel does a plain connect(): the source address
    bound with IP_BIND_ADDRESS_NO_PORT (the port is chosen at connect time, per 4-tuple, reusing
    TIME_WAIT), then a non-blocking connect to the destination the engine judged. Returns the socket
    and 0 or EINPROGRESS. The socket leaves here connected or connecting: it cannot be bound again
    (EINVAL) nor re-aimed (EISCONN/EALREADY). `connect(fd, dest) -> errno` performs the connect
    when `dest` is a raw sockaddr (the seccomp supervisor's copied bytes)."""
    mark = d.mark if d.family != socket.AF_UNIX else 0
    s = _source_bound(d.family, d.host, sotype | socket.SOCK_NONBLOCK, proto, mark)
    try:
        code = connect(s.fileno(), dest) if connect is not None else s.connect_ex(dest)
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))
        return s, code
    except BaseException:
        s.close()
        raise


def open_pooled(d: Decision, sotype: int, proto: int) -> socket.socket:
    """A host socket of an egress grant made ahead of its connect (fd service `pool`): see pooled."""
    if not d.mark or d.family not in (socket.AF_INET, socket.AF_INET6) or d.host[1] != 0:
        raise OSError(errno.EOPNOTSUPP, "only a marked socket of a dynamic IP endpoint is pooled")
    return pooled(d.family, d.host[0], sotype, proto, d.mark)


def pooled(family: int, addr: str, sotype: int, proto: int, mark: int) -> socket.socket:
    """The source address bound with IP_BIND_ADDRESS_NO_PORT, then marked, NOT connected. Only for
    a container whose sockets the kernel guards: the bind guard refuses a re-bind of a marked socket
    without a port (host/bindguard.py) and the egress table lets it reach only the container's
    destinations (host/egress.py); the receiver's connect() picks the port per 4-tuple, as natively."""
    return _source_bound(family, (addr, 0), sotype, proto, mark)


def open_unbound(d: Decision, sotype: int, proto: int) -> socket.socket:
    """A host socket of a bind made ahead of it (fd service `bindpool`, `namedpool`): NOT bound, marked
    UNBOUND_TAG | the container's number, so that the bind guard lets its receiver bind it only to
    one of the container's endpoints (and marks it as the container's then) and the egress table
    refuses whatever it would send or serve before (host/bindguard.py, host/egress.py). An IPv6
    socket for a v4-mapped address is dual-stack."""
    if not d.mark or d.family not in (socket.AF_INET, socket.AF_INET6):
        raise OSError(errno.EOPNOTSUPP, "only a marked socket of an IP endpoint is handed over unbound")
    s = socket.socket(d.family, sotype | socket.SOCK_CLOEXEC, proto)
    try:
        if d.family == socket.AF_INET6 and d.host[0].startswith("::ffff:"):
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, UNBOUND_TAG | (d.mark & MARK_MAX))
        return s
    except BaseException:
        s.close()
        raise


def _source_bound(family: int, host: tuple, sotype: int, proto: int, mark: int) -> socket.socket:
    """The steps open_connecting and pooled share (csrc/fdservice_fast.c does the same): the source
    address bound with IP_BIND_ADDRESS_NO_PORT (dual-stack for IPv6, so a v4-mapped source works),
    then marked (`mark` 0: not): the bind guard refuses every later bind of a marked socket."""
    s = socket.socket(family, sotype | socket.SOCK_CLOEXEC, proto)
    try:
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(host)
        if mark:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        return s
    except BaseException:
        s.close()
        raise


def open_dialed(d: Decision, sotype: int, proto: int = 0) -> tuple[socket.socket, int]:
    """A host socket whose non-blocking connect to the granted address has started.
    Returns the socket and 0 or EINPROGRESS; the caller completes the connect."""
    s = socket.socket(d.family, sotype | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK, proto)
    try:
        _mark(s, d)
        code = s.connect_ex(d.host)
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            raise OSError(code, os.strerror(code))
        return s, code
    except BaseException:
        s.close()
        raise


def socket_flags(s: socket.socket) -> frozenset:
    """The bind flags of a socket (core.tables.SOCKET_FLAGS) as the fd-service protocol carries them."""
    flags = set()
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR):
        flags.add("reuseaddr")
    if s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        flags.add("reuseport")
    if s.family == socket.AF_INET6 and s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
        flags.add("v6only")
    return frozenset(flags)


_DEFAULTS: dict[tuple[int, int], dict] = {}


_BIT = {o: i for i, o in enumerate(COPIED_OPTIONS)}  # the option watch's bit of each (host/optwatch.py)


def _applicable(family: int, sotype: int):
    for o in COPIED_OPTIONS:
        if o.level == IPPROTO_TCP and sotype != socket.SOCK_STREAM:
            continue
        if o.level == IPPROTO_IP and family != socket.AF_INET:
            continue
        if o.level == IPPROTO_IPV6 and family != socket.AF_INET6:
            continue
        yield o


def _defaults(family: int, sotype: int) -> dict[SockOpt, bytes]:
    """Option values of a fresh socket of this kind (read once)."""
    key = (family, sotype)
    if key not in _DEFAULTS:
        values = {}
        with socket.socket(family, sotype) as fresh:
            for o in _applicable(family, sotype):
                try:
                    values[o] = fresh.getsockopt(o.level, o.number, o.size)
                except OSError:
                    pass
        _DEFAULTS[key] = values
    return _DEFAULTS[key]


def copy_options(src: socket.socket, dst: socket.socket, mask: int | None = None) -> None:
    """The options the application set on `src` onto its host socket `dst`, best effort: the same
    list (core.tables) in every mode. `mask`: bit i for COPIED_OPTIONS[i] set (host/optwatch.py),
    those are copied; None: not known, those that differ from a fresh socket's are."""
    if src.family not in (socket.AF_INET, socket.AF_INET6) or dst.family not in (socket.AF_INET, socket.AF_INET6):
        return
    if mask == 0:
        return
    defaults = _defaults(src.family, src.type) if mask is None else {}
    for o in _applicable(src.family, src.type):
        if mask is not None and not mask >> _BIT[o] & 1:
            continue
        if o.level in (IPPROTO_IP, IPPROTO_IPV6) and src.family != dst.family:
            continue
        try:
            value = src.getsockopt(o.level, o.number, o.size)
            if mask is not None or value != defaults.get(o):
                if o.halved:
                    value = (int.from_bytes(value[:4], "little") // 2).to_bytes(4, "little")
                dst.setsockopt(o.level, o.number, value)
        except OSError:
            continue
