"""Pooled host sockets for the graft API's connects (issue 11, lever 4; the preload library's
csrc/pool.c does the same for unmodified programs) and binds by name.

`connect_from(source, address)` no longer asks the fd service for every connect: it takes a host
socket fetched ahead with the `pool` verb (up to MAX_POOL per round trip), bound to the endpoint's
address with IP_BIND_ADDRESS_NO_PORT, marked with the container's mark and NOT connected, and runs
the kernel's own connect() on it (its port choice per 4-tuple, blocking, non-blocking and timeout
semantics, at native cost).

The service hands such sockets over only while the kernel guards them (the bind guard refuses a
re-bind, the egress table lets them reach only the container's destinations); otherwise it answers
EOPNOTSUPP and the caller asks `named` as before, trying a pool again a second later. A `pool`
request is judged as a connect: the source endpoint is named by a caller egress rule covering the
whole family (`out:0.0.0.0/0=SOURCE`), which the engine evaluates against the container's own table
(the kernel, not this rule, decides the destinations: caller rules never reach the egress table).

`bind(NAME)` likewise takes a host socket fetched ahead with `namedpool` (`take_unbound`): NOT bound,
marked so that the kernel lets it bind only to the container's endpoints and refuses whatever it
would send or serve before (host/bindguard.py, host/egress.py), with the endpoint's address to bind
it to, and binds it itself.

The pool is per process and keyed by (service, kind, endpoint, family, type, protocol):
- refilled before it is empty, without a thread: a take that leaves LOW or fewer sends the next
  `pool` request on the process's own pool connection to the service and does not wait; later takes
  pick the reply up when it is there (a receive that does not block, once PICK_UP or fewer are left),
  and wait only if the pool ran dry first. Replies come in the order of the requests (one connection, served in order);
- bounded: at most MAX_HELD sockets in all, the ones asked for included (a key that needs room
  drops the other keys' sockets);
- thread-safe: one lock over the pools and the pool connection;
- fork-safe: a child closes its copies of its parent's pooled sockets and of its pool connection
  (it never reads its parent's replies) and fetches its own;
- a pooled fd the program closed or replaced is noticed by its inode;
- dropped when the policy changes: the service tells the policy's digest (the `prefilter` reply's
  `version` line, as the preload library reads it); it is asked once a second while connects go on
  (the answer picked up like a refill's), and waited for when the last answer is older than
  VERSION_STALE;
- closed at exit (atexit) and by clear().
"""
from __future__ import annotations

import atexit
import collections
import functools
import os
import socket
import threading
import time

from sockgraft.core.protocol import FIRST_POOL, MAX_POOL, ProtocolError, Request, parse_reply
from sockgraft.core.rules import EgressRule, parse_egress
from sockgraft.modes.api import client

MAX_HELD = 64  # pooled sockets one process holds (or has asked for) at most: csrc/pool.c POOL_SLOTS
LOW = FIRST_POOL // 2  # a key left with this many or fewer is refilled ahead (csrc/pool.c POOL_LOW)
PICK_UP = 8  # a take looks for the replies that arrived when its key has this many or fewer left
RETRY_OFF = 1.0  # seconds a key stays unpooled after the service refused a pool
VERSION_EVERY = 1.0  # seconds between two looks at the policy's digest
VERSION_STALE = 2.0  # an answer older than this is renewed before a socket is taken
MAX_BIND_KEYS = 256  # bind keys remembered as bound once (forgotten all at once beyond)

stats = {"fetches": 0, "ahead": 0, "taken": 0, "refused": 0, "off": 0, "dropped": 0, "waited": 0}


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.pools: dict[tuple, list[tuple[int, int]]] = {}  # key -> [(fd, inode)], taken from the end
        self.host: dict[tuple, tuple] = {}  # key -> (family, (address, port)) of the service's reply
        self.held = 0
        self.off: dict[tuple, float] = {}  # key -> monotonic time before which it is not pooled
        self.version: dict[str, tuple[float, str | None]] = {}  # service path -> (asked at, digest)
        self.gen = 0  # bumped at every drop: a batch asked for before it is not kept
        self.conns: dict[str, socket.socket] = {}  # service path -> this process's pool connection
        self.pending: dict[str, collections.deque] = {}  # path -> requests sent, not answered, in order
        self.asked: dict[tuple, int] = {}  # key -> sockets asked for and not received
        self.bound_once: set[tuple] = set()  # bind keys the service answered once (take_unbound)
        self.closed = False


_s = _State()


def _close_if(fd: int, ino: int) -> None:
    try:
        if os.fstat(fd).st_ino == ino:
            os.close(fd)
    except OSError:
        pass  # closed by the program already


def _drop_key(key: tuple) -> None:
    entries = _s.pools.pop(key, [])
    for fd, ino in entries:
        _close_if(fd, ino)
    _s.held -= len(entries)
    stats["dropped"] += len(entries)


def _after_fork_in_child() -> None:
    """A child never uses its parent's pooled sockets nor reads its parent's replies: it closes its
    copies (the parent's stay open in the parent) and starts afresh."""
    global _s
    old = _s
    _s = _State()
    for entries in old.pools.values():
        for fd, ino in entries:
            _close_if(fd, ino)
    for conn in old.conns.values():
        conn.close()  # our copy only: no shutdown, the parent's connection stays up


os.register_at_fork(after_in_child=_after_fork_in_child)


def clear() -> None:
    """Close every pooled socket of this process and its pool connections (also done at exit)."""
    with _s.lock:
        if _s.pid != os.getpid():
            return
        for key in list(_s.pools):
            _drop_key(key)
        _s.gen += 1
        for path in list(_s.conns):
            _disconnect(path)


def _at_exit() -> None:
    clear()
    _s.closed = True


atexit.register(_at_exit)


def held() -> int:
    return _s.held


def take(source: str, address: tuple, type: int, proto: int = 0, family: int = 0,
         path: str | None = None) -> tuple[int, int] | None:
    """A pooled host socket for a connect from endpoint `source` to `address` (an IP and a port):
    (fd, its family), the fd owned by the caller, close-on-exec, bound and not connected. None when
    no pool serves it (pools off, an error of the service, a family the endpoint is not): the
    caller asks the service for a connected socket instead, which answers with the exact error."""
    path = client.service_path(path)
    dest_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    if family not in (0, dest_family) or type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        return None
    got = _take((path, "connect", source, dest_family, type, proto), address)
    return got[:2] if got is not None else None


def take_unbound(name: str, family: int, type: int, proto: int = 0,
                 path: str | None = None) -> tuple[int, int, tuple] | None:
    """A pooled host socket for a bind to endpoint `name` (`family` 0: the endpoint's own): (fd,
    its family, the address to bind it to), the fd owned by the caller, close-on-exec, NOT bound:
    the kernel lets it bind only to its container's endpoints (host/bindguard.py). None when no
    pool serves it: the caller asks the service for a bound socket (`named`) instead. So is the
    first bind of each key: a server binds once, and a pool would cost it a batch of sockets and
    a round trip more; a process that binds again gets a pool from then on."""
    if type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        return None
    key = (client.service_path(path), "bind", name, family, type, proto)
    with _s.lock:
        if key not in _s.bound_once:
            if len(_s.bound_once) >= MAX_BIND_KEYS:
                _s.bound_once.clear()
            _s.bound_once.add(key)
            return None
    return _take(key, None)


def _take(key: tuple, address: tuple | None) -> tuple[int, int, tuple] | None:
    path = key[0]
    if _s.pid != os.getpid():  # forked without the at-fork hook (a raw fork): as the hook does
        _after_fork_in_child()
    with _s.lock:
        if _s.closed:
            return None
        if _s.pending.get(path) and len(_s.pools.get(key, ())) <= PICK_UP:
            _receive(path, None)  # whatever arrived meanwhile, without waiting
        now = time.monotonic()
        asked = _s.version.get(path)
        if asked is None or now - asked[0] >= VERSION_STALE:
            for _ in range(2):  # twice if the answer that was on its way had been asked long ago
                _ask(path, ("version",), Request("prefilter"))
                _receive(path, ("version",))
                asked = _s.version.get(path)
                if asked is not None and now - asked[0] < VERSION_STALE:
                    break
        elif now - asked[0] >= VERSION_EVERY:
            _ask(path, ("version",), Request("prefilter"))
        if _s.off.get(key, 0.0) > now:
            stats["off"] += 1
            return None
        got = _pop(key)
        if got is None:
            if key not in _s.asked:
                _ask_pool(key, address, FIRST_POOL)  # waited for: a program that connects once pays for no more
            if key in _s.asked:
                stats["waited"] += 1
                _receive(path, key)
                got = _pop(key)
        if got is not None and len(_s.pools.get(key, ())) <= LOW and key not in _s.asked:
            if _ask_pool(key, address, MAX_POOL):
                stats["ahead"] += 1
        return got


def _pop(key: tuple) -> tuple[int, int, tuple] | None:
    """The newest pooled socket of `key` that is still ours."""
    entries = _s.pools.get(key)
    while entries:
        fd, ino = entries.pop()
        _s.held -= 1
        try:
            if os.fstat(fd).st_ino != ino:
                continue  # the program closed it and the number was reused: not ours
        except OSError:
            continue  # the program closed it
        stats["taken"] += 1
        return (fd, *_s.host[key])
    return None


def _connection(path: str) -> socket.socket:
    conn = _s.conns.get(path)
    if conn is None:
        conn = _s.conns[path] = client.connection(path)
        _s.pending[path] = collections.deque()
    return conn


def _disconnect(path: str) -> None:
    """The pool connection is gone (or closed): what it had asked for will not come."""
    conn = _s.conns.pop(path, None)
    if conn is not None:
        conn.close()
    for job in _s.pending.pop(path, ()):
        _s.asked.pop(job[0], None)


def _ask(path: str, job: tuple, req: Request) -> bool:
    """Send `req` on the pool connection without waiting for its reply; False if it could not."""
    if any(j[0] == job for j in _s.pending.get(path, ())):
        return True  # asked already, its answer is on its way
    try:
        _connection(path).send(req.encode())
    except OSError:
        _disconnect(path)
        return False
    _s.pending[path].append((job, _s.gen, time.monotonic()))
    return True


def _ask_pool(key: tuple, address: tuple | None, want: int) -> bool:
    path, kind, name, family, sotype, proto = key
    room = MAX_HELD - _s.held - sum(_s.asked.values())
    if room < want and not _s.pools.get(key) and key not in _s.asked:
        for other in [k for k in _s.pools if k != key]:  # bounded: room for the key in use
            _drop_key(other)
        room = MAX_HELD - _s.held - sum(_s.asked.values())
    count = min(want, room)
    if count < 1:
        return False
    if kind == "bind":
        req = Request("namedpool", name=name, family=family, type=sotype, proto=proto, count=count)
    else:
        req = Request("pool", family=family, addr=address[0], port=address[1], type=sotype, proto=proto, count=count,
                      egress=(_source_rule(family, name),))
    if not _ask(path, key, req):
        return False
    _s.asked[key] = count
    return True


@functools.lru_cache(maxsize=64)
def _source_rule(family: int, source: str) -> EgressRule:
    """The caller rule that names `source` for every destination of `family`."""
    return parse_egress(f"{'0.0.0.0/0' if family == socket.AF_INET else '::/0'}={source}")


def _receive(path: str, until: tuple | None) -> None:
    """Take the replies of the pool connection, in order: those there already (`until` None), or
    up to and including the one of job `until` (waiting for it)."""
    pending = _s.pending.get(path)
    while pending:
        job, gen, sent = pending[0]
        waiting = until is not None and any(j[0] == until for j in pending)
        try:
            msg, fds = client.receive(_s.conns[path], MAX_POOL, 0 if waiting else socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg, fds = b"", []
        if not msg:  # the service went away: a later take connects again
            _disconnect(path)
            return
        pending.popleft()
        _answer(path, job, gen, sent, msg, fds)
        if job == until:
            return


def _answer(path: str, job: tuple, gen: int, sent: float, msg: bytes, fds: list[int]) -> None:
    try:
        reply = parse_reply(msg)
    except ProtocolError:
        reply = None
    if job == ("version",):
        digest = None
        if reply is not None and reply.kind == "ok":
            digest = next((line[8:] for line in reply.lines if line.startswith("version ")), None)
        asked = _s.version.get(path)
        if asked is None or digest is None or digest != asked[1]:
            for key in [k for k in _s.pools if k[0] == path]:
                _drop_key(key)
            _s.gen += 1
        _s.version[path] = (sent, digest)  # the digest of when it was asked, not of when it was read
        for fd in fds:
            os.close(fd)
        return
    key = job
    _s.asked.pop(key, None)
    if reply is None or reply.kind != "ok" or not fds or reply.family not in (socket.AF_INET, socket.AF_INET6):
        for fd in fds:  # refused (pools off, a denial) or not understood: `named` for a second
            os.close(fd)
        stats["refused"] += 1
        _s.off[key] = time.monotonic() + RETRY_OFF
        return
    stats["fetches"] += 1
    if gen != _s.gen:  # asked for before a drop: maybe of the old policy
        for fd in fds:
            os.close(fd)
        return
    keep = fds[:max(0, MAX_HELD - _s.held)]
    _s.host[key] = (reply.family, (reply.addr, reply.port))
    entries = _s.pools.setdefault(key, [])
    entries[:0] = [(fd, os.fstat(fd).st_ino) for fd in reversed(keep)]  # the older ones are taken first
    _s.held += len(keep)
    for fd in fds[len(keep):]:
        os.close(fd)
