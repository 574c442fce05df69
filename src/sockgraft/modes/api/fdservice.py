"""The fd service: hands grafted host-netns sockets to processes inside a container.

One listening SOCK_SEQPACKET socket per container. The caller's netns is read from the connection
itself (SO_PEERPIDFD, then the pidfd's netns), never from a pid, and must be the container's;
decisions come from the engine with that container's policy; granted sockets are created and bound
here, in the host netns, and passed with SCM_RIGHTS.
"""
from __future__ import annotations

import errno
import functools
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from sockgraft.host import bindguard, egress, hostsock
from sockgraft.modes.api import fast
from sockgraft.host import netns
from sockgraft.host.audit import Audit
from sockgraft.core.engine import DENY, GRANT, Op
from sockgraft.core.protocol import MAX_MESSAGE, ProtocolError, Reply, parse_request
from sockgraft.host.store import Store, StoreError

MODE = "api"
POOLED = {"pool": "connect", "bindpool": "bind", "namedpool": "named"}  # a pool's verb -> the verb it is judged as
NAMED = ("named", "namedpool")  # verbs by endpoint name (no address)
BINDS = ("bind", "named", "bindpool", "namedpool")  # verbs judged by the ingress (or named) tables
MAX_CONNECTIONS = 256  # per container: a flood of idle connections must not exhaust the service's fds


@dataclass
class _Conn:
    key: str
    pidfd: int | None  # the connecting process, pinned: its netns is read at every request
    last: float = -1.0  # when its last request was answered (perf_counter): back-to-back callers


def _err(code: int, message: str) -> Reply:
    return Reply("err", errno=code, message=message.replace("\n", " "))


class FdService:
    def __init__(self, state_dir: str | None = None, audit: Audit | None = None, mode: str = MODE,
                 on_request=None):
        """`on_request(seconds)`, if given, is called with the time each request took to answer."""
        self.on_request = on_request
        self.store = Store(state_dir)
        self.audit = audit or Audit(state_dir)
        self.audit.deferred = True  # reply first, log when idle
        self.mode = mode
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[str, tuple[socket.socket, str]] = {}
        self.connections: dict[str, int] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        lib = fast.load()
        self.fast = fast.FastPath(lib) if lib is not None else None  # csrc/fdservice_fast.c
        if os.environ.get("GRAFT_POOLS", "1") != "0" and os.geteuid() == 0:
            try:
                bindguard.ensure()
            except OSError:
                pass  # no pools: `pool` is answered EOPNOTSUPP and the library asks `connect`

    # -- listening sockets -----------------------------------------------------------------------
    def listen(self, key: str, path: str) -> None:
        if key in self.listeners:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        s.bind(path)
        os.chmod(path, 0o666)  # who may ask is decided by the caller's netns, not by file mode
        s.listen(128)
        self.listeners[key] = (s, path)
        if self.fast is not None:
            self.fast.forget(key)
        self.sel.register(s, selectors.EVENT_READ, ("listen", key))

    def unlisten(self, key: str) -> None:
        s, path = self.listeners.pop(key, (None, None))
        if s is None:
            return
        self.sel.unregister(s)
        s.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # -- the loop --------------------------------------------------------------------------------
    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    def poll(self, timeout: float | None = None) -> None:
        for key, _ in self.sel.select(timeout):
            tag = key.data
            if tag is None:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            elif tag[0] == "listen":
                self._accept(key.fileobj, tag[1])
            else:
                self._serve(key.fileobj, tag[1])
        self.audit.flush()

    def serve_forever(self, tick=None, interval: float = 0.5) -> None:
        while not self._stopping:
            self.poll(interval)
            if tick:
                tick()

    def start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="graft-fd-service", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        for key in list(self.listeners):
            self.unlisten(key)
        for key in list(self.sel.get_map().values()):
            if isinstance(key.data, tuple) and key.data[0] == "conn":
                self._drop(key.fileobj)
        self.sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.store.close()
        self.audit.close()

    def _accept(self, lsock: socket.socket, key: str) -> None:
        try:
            conn, _ = lsock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:  # EMFILE/ENFILE: refuse this one, keep serving the others
            self.audit.record("fail", container=key, mode=self.mode, op="accept", errno=e.errno, reason=e.strerror)
            return
        if self.connections.get(key, 0) >= MAX_CONNECTIONS:
            self.audit.record("deny", container=key, mode=self.mode, op="accept", errno=errno.EMFILE,
                              reason=f"more than {MAX_CONNECTIONS} open connections")
            conn.close()
            return
        self.connections[key] = self.connections.get(key, 0) + 1
        conn.setblocking(False)
        try:
            pidfd = conn.getsockopt(socket.SOL_SOCKET, netns.SO_PEERPIDFD)
        except OSError:
            pidfd = None  # the caller is unidentifiable: every request will be denied
        self.sel.register(conn, selectors.EVENT_READ, ("conn", _Conn(key, pidfd)))

    def _drop(self, conn: socket.socket) -> None:
        c = self.sel.unregister(conn).data[1]
        self.connections[c.key] -= 1
        if c.pidfd is not None:
            os.close(c.pidfd)
        conn.close()

    def _serve(self, conn: socket.socket, c: _Conn) -> None:
        if self.fast is not None:
            return self._serve_fast(conn, c)
        try:
            data, ancdata, msg_flags, _ = conn.recvmsg(MAX_MESSAGE + 1, socket.CMSG_SPACE(16 * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self._drop(conn)
        for level, kind, payload in ancdata:  # nobody sends us fds: close any, never keep them
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for i in range(0, len(payload) - len(payload) % 4, 4):
                    os.close(int.from_bytes(payload[i:i + 4], "little"))
        if not data:
            return self._drop(conn)
        if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            reply, sock = _err(errno.EMSGSIZE, "request too long"), None
        else:
            try:  # the caller's netns now, not when it connected: it may have moved since
                ino = netns.ino_of_pidfd(c.pidfd) if c.pidfd is not None else None
            except OSError:
                ino = None
            if self.on_request is None:
                reply, sock = self.handle(c.key, ino, data)
            else:
                t0 = time.perf_counter()
                reply, sock = self.handle(c.key, ino, data)
                self.on_request(time.perf_counter() - t0)
        self._reply(conn, reply, sock)

    def _reply(self, conn: socket.socket, reply: Reply, sock: socket.socket | list | None) -> None:
        socks = sock if isinstance(sock, list) else [sock] if sock is not None else []
        try:
            if socks:
                socket.send_fds(conn, [reply.encode()], [s.fileno() for s in socks])
            else:
                conn.send(reply.encode())
        except OSError:
            self._drop(conn)
        finally:
            for s in socks:
                s.close()

    def _serve_fast(self, conn: socket.socket, c: _Conn) -> None:
        """Requests through csrc/fdservice_fast.c: it answers the `connect`, `pool`, `bind` and `named`
        requests the compiled tables decide, and hands back every other one, which `handle` answers. A caller
        that asked again soon after its last answer (within fast.SPIN_GAP: a loop of binds, say) is
        served back to back in C while its requests keep coming (fast.FastPath.serve)."""
        t0 = time.perf_counter()
        try:
            policy = self.store.cached_policy(c.key)
        except StoreError:
            policy = None  # nothing is served in C: `handle` answers with the error
        compiled = self.fast.compiled(c.key, policy) if policy is not None else None
        flags = self.fast.pools(compiled, functools.partial(egress.pools_off, self.store, c.key), t0) if compiled else 0
        outs = self.fast.serve(conn.fileno(), -1 if c.pidfd is None else c.pidfd, netns.key_ino(c.key) or 0, compiled,
                               flags, back_to_back=t0 - c.last < fast.SPIN_GAP)
        self.fast.back_to_back += len(outs) - 1
        for out in outs:
            self._answered(conn, c, policy, compiled, out, t0, len(outs))
        c.last = time.perf_counter()

    def _answered(self, conn: socket.socket, c: _Conn, policy, compiled, out, t0: float, n: int) -> None:
        """What Python does for one answer of the fast path: the audit record, the reply C leaves to
        Python (a failure's message, a handed-back request's answer), the timing (shared by the n
        requests C answered in one call)."""
        result = out.result
        if result == fast.NOTHING:
            return
        if result == fast.DROP:
            return self._drop(conn)
        stats = self.fast.stats
        if result == fast.HANDBACK:
            stats["handback"] += 1
            data = fast.request_bytes(out)
            if out.trunc:
                return self._reply(conn, _err(errno.EMSGSIZE, "request too long"), None)
            reply, sock = self.handle(c.key, out.ino if out.ino_ok else None, data)
            if policy is not None:
                self.fast.learn(c.key, policy, data)
            if self.on_request is not None:
                self.on_request((time.perf_counter() - t0) / n)
            return self._reply(conn, reply, sock)
        op = fast.VERBS[out.verb]
        where = {"addr": fast.dest_text(out.family, bytes(out.addr)), "port": out.port} if op not in NAMED else {}
        if result == fast.LOCAL:
            stats["local"] += 1
            self.audit.decision(c.key, self.mode, op, compiled.local, **where)
        else:
            if op in BINDS:
                endpoint, reason = compiled.in_meta[out.table][out.row]
                reason += " (dual-stack [::] bind)" if out.dual else ""
            else:
                endpoint, reason = compiled.meta[out.table][out.row]
            if result == fast.GRANT:
                stats["grant"] += 1
                extra = {"count": out.count} if op in POOLED else {}
                if op != "connect":
                    stats[op] += 1
                self.audit.record(GRANT, container=c.key, mode=self.mode, op=op, endpoint=endpoint,
                                  errno=None, reason=reason, host=[out.host.decode(), out.host_port], **extra, **where)
            else:
                stats["fail"] += 1
                code = out.err
                if op not in POOLED:  # as `handle`: a failed connect or bind is audited, a failed pool is not
                    self.audit.record("fail", container=c.key, mode=self.mode, op=op, endpoint=endpoint,
                                      errno=code, reason=os.strerror(code), **where)
                self._reply(conn, _err(code, f"{endpoint}: {os.strerror(code)}"), None)
        if self.on_request is not None:
            self.on_request((time.perf_counter() - t0) / n)
        if out.send_failed:
            self._drop(conn)

    # -- one request -----------------------------------------------------------------------------
    def handle(self, key: str, caller_ino: int | None, data: bytes) -> tuple[Reply, socket.socket | None]:
        """Answer one request of a caller whose netns inode is `caller_ino`."""
        try:
            req = parse_request(data)
        except ProtocolError as e:
            self.audit.record("deny", container=key, mode=self.mode, op="parse", errno=errno.EINVAL, reason=str(e))
            return _err(errno.EINVAL, str(e)), None
        foreign = caller_ino is None or caller_ino != netns.key_ino(key)
        if foreign and req.verb in ("show", "resolve", "prefilter"):
            reason = f"caller is not inside container {key}"
            self.audit.record("deny", container=key, mode=self.mode, op=req.verb, endpoint=req.name,
                              errno=errno.EPERM, reason=reason, caller_netns=caller_ino)
            return _err(errno.EPERM, reason), None
        try:
            policy = self.store.cached_policy(key)
        except StoreError as e:
            return _err(errno.EIO, str(e)), None
        if req.has_rules:
            policy = policy.with_caller_rules(req.ingress, req.egress, req.bbconn)
        if req.verb == "show":
            return Reply("ok", lines=tuple(ep.line() for ep in policy.endpoints.values())), None
        if req.verb == "prefilter":
            reply = Reply("ok", lines=policy.prefilter().lines())
            if len("\n".join(["ok", *reply.lines])) > MAX_MESSAGE:  # never a truncated table
                return _err(errno.EMSGSIZE, "the prefilter does not fit in a reply: ask about every operation"), None
            return reply, None
        if req.verb == "resolve":
            ep = policy.endpoints.get(req.name)
            if ep is None:
                return _err(errno.EADDRNOTAVAIL, f"no endpoint {req.name!r} in this container's table"), None
            return Reply("ok", lines=(ep.line(),)), None
        verb = POOLED.get(req.verb, req.verb)  # a pool is judged as its uses
        decision = policy.decide(Op(verb, req.family, req.addr, req.port, req.type, req.proto, req.name,
                                    v6only="v6only" in req.flags, foreign=foreign))
        where = {"addr": req.addr, "port": req.port} if req.addr else {}
        if foreign:
            where["caller_netns"] = caller_ino
        if decision.verdict != GRANT:
            self.audit.decision(key, self.mode, req.verb, decision, **where)
            if decision.verdict == DENY:
                return _err(decision.errno, decision.reason), None
            return Reply("local"), None
        if req.verb in POOLED:
            return self._pool(key, req, decision, where)
        try:
            sock = self._open(req, decision)
        except OSError as e:
            code = e.errno or errno.EIO
            self.audit.record("fail", container=key, mode=self.mode, op=req.verb, endpoint=decision.endpoint.name,
                              errno=code, reason=os.strerror(code), **where)
            return _err(code, f"{decision.endpoint.name}: {os.strerror(code)}"), None
        if decision.family == socket.AF_UNIX:
            self.audit.decision(key, self.mode, req.verb, decision, host=decision.endpoint.path, **where)
            return Reply("ok", family=socket.AF_UNIX, addr=decision.endpoint.path), sock
        addr, port = sock.getsockname()[:2]
        self.audit.decision(key, self.mode, req.verb, decision, host=[addr, port], **where)
        return Reply("ok", family=decision.family, addr=addr, port=port), sock

    def _pool(self, key: str, req, decision, where: dict) -> tuple[Reply, list[socket.socket] | None]:
        """`pool`: host sockets ahead of their connects; `bindpool`, `namedpool`: ahead of binds
        (to an address, by name), unbound, the reply naming the address to bind them to. Only where
        the kernel guards them (else EOPNOTSUPP: the caller asks `connect`, `bind` or `named`)."""
        unbound = req.verb != "pool"
        why = egress.pools_off(self.store, key, unbound=unbound)
        if why:
            return _err(errno.EOPNOTSUPP, why), None
        make = hostsock.open_unbound if unbound else hostsock.open_pooled
        socks: list[socket.socket] = []
        try:
            for _ in range(req.count):
                socks.append(make(decision, req.type, req.proto))
        except OSError as e:
            for s in socks:
                s.close()
            code = e.errno or errno.EIO
            return _err(code, f"{decision.endpoint.name}: {e.strerror or os.strerror(code)}"), None
        addr, port = decision.host if unbound else socks[0].getsockname()[:2]
        self.audit.decision(key, self.mode, req.verb, decision, host=[addr, port], count=req.count, **where)
        return Reply("ok", family=decision.family, addr=addr, port=port), socks

    @staticmethod
    def _open(req, decision) -> socket.socket:
        """The host socket of a grant: connected (or connecting) for `connect`, `dial` and `named`
        with a destination; bound with a port of its own for `bind`, `sendto` and plain `named`."""
        if req.verb == "dial":
            return hostsock.open_dialed(decision, req.type, req.proto)[0]
        if req.verb == "connect":
            return hostsock.open_connecting(decision, req.type, req.proto, (req.addr, req.port))[0]
        if req.verb == "named" and req.addr is not None:
            return hostsock.open_connecting(decision, req.type, req.proto, _destination(decision, req.addr, req.port))[0]
        return hostsock.open_bound(decision, req.type, req.proto, req.flags)


def _destination(decision, addr: str, port: int) -> tuple:
    """The destination of a `named` request with one, as the granted socket's family takes it."""
    version = 6 if ":" in addr else 4
    if decision.family == socket.AF_INET and version == 4:
        return addr, port
    if decision.family == socket.AF_INET6:
        return (f"::ffff:{addr}" if version == 4 else addr), port
    if decision.family == socket.AF_UNIX:
        raise OSError(errno.EINVAL, "a unix endpoint is dialled, not used as a source")
    raise OSError(errno.EAFNOSUPPORT, f"endpoint {decision.endpoint.name}: no IPv{version} destination")
