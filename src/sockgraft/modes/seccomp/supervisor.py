"""The seccomp supervisor: one epoll loop in the host netns serving the listeners of many containers.

A listener comes from anywhere (`graft run --mode seccomp`, or an OCI runtime through
`linux.seccomp.listenerPath`): `add_listener(fd, container_key, pid)`. For each notification the
supervisor takes its own duplicate of the target's fd (pidfd_getfd), copies the memory arguments
once (process_vm_readv), checks the notification is still valid, asks the engine
(`Store.policy(key)`), audits, and then performs the operation ITSELF on its duplicate and on the
copied bytes. It never answers CONTINUE for an operation whose memory it judged.

- bind: ingress pair -> a host socket bound to the endpoint, options and O_NONBLOCK copied, installed
  over the app's fd number (ADDFD + SETFD), reply 0. Otherwise bind performed on the native socket.
- connect: egress rule -> host socket bound to the source endpoint, non-blocking connect started on
  the copied sockaddr; a non-blocking app gets it installed and EINPROGRESS; a blocking app's reply
  waits in the loop until the host connect completes, then the socket (blocking again) is installed
  and 0 returned. Local connects of blocking stream sockets go to a small fixed thread pool.
- sendto with a destination: datagram sockets are grafted on an egress rule and the datagram is sent
  by the supervisor from the copied buffer.
- getsockname on grafted sockets: the address the application bound (accepted sockets: the bound
  port of their listener); native sockets: CONTINUE (no memory judged).
- socket ioctls 0x89xx and SO_BINDTODEVICE/SO_BINDTOIFINDEX on grafted sockets: EPERM.
- A task in another netns than the container's (a nested netns) is never grafted.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sockgraft.host import hostsock, netns
from sockgraft.host.audit import Audit
from sockgraft.core.engine import DENY, GRANT, LOCAL, Decision, Op
from sockgraft.host.store import Store
from sockgraft.modes.seccomp import kernel as K

MODE = "seccomp"
MAX_SOCKADDR = 128
MAX_DATAGRAM = 65535
SWEEP_INTERVAL = 1.0
TCP_ESTABLISHED = 1
IP = (socket.AF_INET, socket.AF_INET6)

@dataclass
class Target:
    """One listener: a container (or part of one) under one seccomp filter."""

    fd: int
    key: str
    ino: int | None  # the container's netns inode; tasks elsewhere are not grafted
    busy: int = 0  # pool jobs and pending connects still using `fd`
    closing: bool = False
    views: dict = field(default_factory=dict)  # host socket inode -> the sockaddr the app bound
    served: dict = field(default_factory=dict)  # (host addr, port) of a grafted bind -> app sockaddr


@dataclass
class Pending:
    """A blocking connect whose host-side non-blocking connect is in progress."""

    target: Target
    nid: int
    appfd: int
    cloexec: bool
    host: socket.socket
    deadline: float | None  # the app's SO_SNDTIMEO, if it set one


class Gone(Exception):
    """The target task or its notification went away: nothing to answer."""


class Reply(Exception):
    """Answer the notification with this errno."""

    def __init__(self, err: int):
        self.err = err


class Supervisor:
    def __init__(self, state_dir: str | None = None, audit: Audit | None = None, workers: int = 4,
                 on_notification=None):
        """`on_notification(seconds)`, if given, is called with the time each notification took."""
        self.store = Store(state_dir)
        self.audit = audit or Audit(state_dir)
        self.audit.deferred = True  # answer first, write the log lines when the loop is idle
        self.on_notification = on_notification
        self.host_ino = os.stat("/proc/self/ns/net").st_ino
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            self.host_cookie = K.netns_cookie(probe)
        self.epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.epoll.register(self._wake_r, select.EPOLLIN)
        self.targets: dict[int, Target] = {}
        self.pending: dict[int, Pending] = {}
        self._adds: deque = deque()
        self._lock = threading.Lock()
        self._stop = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="graft-seccomp")
        self._jobs: dict[socket.socket, tuple] = {}
        self._last_sweep = time.monotonic()
        self.stats: Counter = Counter()
        self.thread: threading.Thread | None = None

    # -- public API --------------------------------------------------------------------------
    def add_listener(self, listener_fd: int, container_key: str, pid: int | None = None) -> None:
        """Serve this listener (ownership of the fd passes to the supervisor). `pid`: a task of
        the container, to learn its netns; otherwise the store or the netns name gives it."""
        ino = None
        if pid is not None:
            try:
                ino = os.stat(f"/proc/{pid}/ns/net").st_ino
            except OSError:
                ino = None
        if ino is None:
            with Store(self.store.dir) as store:  # not the loop thread's connection
                row = store.container(container_key)
            ino = row.netns_ino if row is not None and row.netns_ino else netns.key_ino(container_key)
        os.set_blocking(listener_fd, True)
        self._adds.append(Target(listener_fd, container_key, ino))
        self._wake()

    def active_keys(self) -> dict[str, int]:
        """Live listeners per container key (safe to call from any thread)."""
        for _ in range(5):
            try:
                targets = list(self.targets.values()) + list(self._adds)
                break
            except RuntimeError:  # the loop changed them while we looked
                continue
        else:
            return {}
        out: dict[str, int] = {}
        for t in targets:
            if not t.closing:
                out[t.key] = out.get(t.key, 0) + 1
        return out

    def start_thread(self) -> threading.Thread:
        self.thread = threading.Thread(target=self.run, name="graft-seccomp-supervisor", daemon=True)
        self.thread.start()
        return self.thread

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def close(self) -> None:
        self.stop()
        self.audit.flush()
        self._abort_jobs(only_dead=False)
        self._pool.shutdown(wait=True)
        for p in list(self.pending.values()):
            p.host.close()
        self.pending.clear()
        for t in list(self.targets.values()):
            os.close(t.fd)
        self.targets.clear()
        while self._adds:
            os.close(self._adds.popleft().fd)
        self.epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.store.close()

    def run(self) -> None:
        try:
            while not self._stop:
                try:
                    events = self.epoll.poll(self._timeout())
                except InterruptedError:
                    continue
                for fd, ev in events:
                    try:
                        self._dispatch(fd, ev)
                    except Exception as e:  # one bad event must not stop the loop for everyone
                        print(f"graft: seccomp supervisor: {type(e).__name__}: {e}", file=sys.stderr)
                self.audit.flush()
                now = time.monotonic()
                if now - self._last_sweep >= SWEEP_INTERVAL or self._deadline_due(now):
                    self._last_sweep = now
                    self._sweep()
        finally:
            if not self._stop:
                # the loop died: close the listeners so the containers' trapped calls fail (ENOSYS)
                # instead of waiting for an answer that never comes
                for t in list(self.targets.values()):
                    self._close_target(t)

    def _dispatch(self, fd: int, ev: int) -> None:
        if fd == self._wake_r:
            self._drain()
        elif fd in self.targets:
            t = self.targets[fd]
            if ev & select.EPOLLIN:
                if self.on_notification is None:
                    self._serve_one(t)
                else:
                    t0 = time.perf_counter()
                    self._serve_one(t)
                    self.on_notification(time.perf_counter() - t0)
            elif ev & (select.EPOLLHUP | select.EPOLLERR):
                self._drop(t)
        elif fd in self.pending:
            self._finish_connect(self.pending.pop(fd))

    def _timeout(self) -> float:
        deadlines = [p.deadline for p in self.pending.values() if p.deadline]
        if not deadlines:
            return SWEEP_INTERVAL
        return max(0.0, min(SWEEP_INTERVAL, min(deadlines) - time.monotonic()))

    def _deadline_due(self, now: float) -> bool:
        return any(p.deadline and p.deadline <= now for p in self.pending.values())

    # -- loop plumbing -----------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _drain(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._adds:
            t = self._adds.popleft()
            self.targets[t.fd] = t
            self.epoll.register(t.fd, select.EPOLLIN)
        with self._lock:
            done = [t for t in self.targets.values() if t.closing and t.busy == 0]
        for t in done:
            self._close_target(t)

    def _drop(self, t: Target) -> None:
        """Every task under this filter is gone."""
        self.epoll.unregister(t.fd)
        for fd, p in list(self.pending.items()):
            if p.target is t:
                del self.pending[fd]
                self.epoll.unregister(fd)
                p.host.close()
                self._release(t)
        with self._lock:
            t.closing = True
            idle = t.busy == 0
        if idle:
            self._close_target(t)

    def _close_target(self, t: Target) -> None:
        if self.targets.pop(t.fd, None) is not None:
            os.close(t.fd)

    def _hold(self, t: Target) -> None:
        with self._lock:
            t.busy += 1

    def _release(self, t: Target) -> None:
        with self._lock:
            t.busy -= 1
            wake = t.closing and t.busy == 0
        if wake:
            self._wake()

    def _sweep(self) -> None:
        """Pending connects whose task died: close their host sockets now. Those past the app's
        SO_SNDTIMEO: install the still-connecting socket and answer EINPROGRESS, as the kernel
        does for a blocking connect that times out."""
        now = time.monotonic()
        self._abort_jobs(only_dead=True)
        for fd, p in list(self.pending.items()):
            if not K.notif_id_valid(p.target.fd, p.nid):
                del self.pending[fd]
                self.epoll.unregister(fd)
                p.host.close()
                self._release(p.target)
                self.stats["connect_abandoned"] += 1
            elif p.deadline and p.deadline <= now:
                del self.pending[fd]
                self._finish_connect(p, timed_out=True)

    def _send(self, t: Target, nid: int, val: int = 0, err: int = 0, cont: bool = False) -> None:
        try:
            K.notif_send(t.fd, nid, val, err, cont)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the target is gone or was interrupted
                raise

    # -- one notification --------------------------------------------------------------------
    def _serve_one(self, t: Target) -> None:
        try:
            n = K.notif_recv(t.fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR):
                return  # the target died before we received it: retry on the next event
            raise
        self.stats["notifications"] += 1
        handler = self._handlers.get(n.nr)
        try:
            if handler is None:
                raise Reply(errno.ENOSYS)
            handler(self, t, n)
        except Gone:
            self.stats["gone"] += 1
        except Reply as r:
            self._send(t, n.id, err=r.err)
        except Exception as e:  # never leave a target hanging
            err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
            print(f"graft: seccomp supervisor: {K.NR_NAME.get(n.nr, n.nr)}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            self._send(t, n.id, err=err)

    # helpers used by the handlers
    def _nested(self, t: Target, n: K.Notif) -> bool:
        try:
            return t.ino is not None and os.stat(f"/proc/{n.pid}/ns/net").st_ino != t.ino
        except OSError:
            raise Gone() from None

    def _dup(self, t: Target, n: K.Notif, fd: int) -> int:
        """Our own duplicate of the target's fd (closed by the caller)."""
        try:
            pidfd = K.pidfd_open_thread(n.pid)
        except OSError:
            raise Gone() from None
        try:
            return K.pidfd_getfd(pidfd, fd)
        except OSError as e:
            if e.errno == errno.EBADF:
                raise Reply(errno.EBADF) from None
            if e.errno == errno.ESRCH:
                raise Gone() from None
            raise
        finally:
            os.close(pidfd)

    def _read(self, n: K.Notif, addr: int, size: int) -> bytes:
        try:
            return K.read_mem(n.pid, addr, size)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise Gone() from None
            raise Reply(errno.EFAULT) from None

    def _valid(self, t: Target, n: K.Notif) -> None:
        """After reading target memory: the task still waits in this very syscall."""
        if not K.notif_id_valid(t.fd, n.id):
            raise Gone()

    def _sock(self, dup: int) -> socket.socket:
        try:
            return socket.socket(fileno=dup)
        except OSError as e:
            os.close(dup)
            if e.errno == errno.ENOTSOCK:
                raise Reply(errno.ENOTSOCK) from None
            raise

    def _is_host(self, s: socket.socket) -> bool:
        return K.netns_cookie(s) == self.host_cookie

    def _audit(self, t: Target, op: str, d: Decision, n: K.Notif, **fields) -> None:
        self.audit.decision(t.key, MODE, op, d, pid=n.pid, **fields)

    def _sockaddr(self, t: Target, n: K.Notif, addr: int, length: int) -> bytes:
        if length > MAX_SOCKADDR or length < 0 or (length and not addr):
            raise Reply(errno.EINVAL if length > MAX_SOCKADDR or length < 0 else errno.EFAULT)
        return self._read(n, addr, length)

    def _prologue(self, t: Target, n: K.Notif, addr_arg: int, len_arg: int):
        """Common start of bind/connect/sendto: our dup, the copied sockaddr, validity. The
        returned `nested` is a callable: the netns check is only paid where a grant is possible."""
        nested = lambda: self._nested(t, n)  # noqa: E731
        s = self._sock(self._dup(t, n, n.args[0] & 0xFFFFFFFF))
        try:
            raw = self._sockaddr(t, n, n.args[addr_arg], n.args[len_arg] & 0xFFFFFFFF)
            self._valid(t, n)
        except BaseException:
            s.close()
            raise
        return nested, s, raw

    @staticmethod
    def _decode(s: socket.socket, raw: bytes, v4_on_v6: bool = True):
        """(addr, port) the engine judges, or None when the kernel must reject or it is AF_UNSPEC.
        An IPv6 socket may connect/sendto an AF_INET address (v4_on_v6), never bind one."""
        try:
            fam, addr, port = K.decode_sockaddr(raw)
        except K.BadSockaddr:
            return None
        if fam == s.family or (v4_on_v6 and s.family == socket.AF_INET6 and fam == socket.AF_INET):
            return addr, port
        return None

    # -- grafting ----------------------------------------------------------------------------
    def _host_socket(self, s: socket.socket, d: Decision) -> socket.socket:
        h = hostsock.open_bound(d, s.type, s.proto, hostsock.socket_flags(s))
        try:
            hostsock.copy_options(s, h)
        except BaseException:
            h.close()
            raise
        return h

    def _replacement(self, n: K.Notif, s: socket.socket, d: Decision) -> tuple[socket.socket, int, bool, int]:
        """The host socket that will replace the app's fd (arg 0), with what installing it needs:
        the fd number, its close-on-exec flag and the app socket's O_NONBLOCK."""
        appfd = n.args[0] & 0xFFFFFFFF
        cloexec = K.fd_cloexec(n.pid, appfd)
        nonblock = fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        try:
            return self._host_socket(s, d), appfd, cloexec, nonblock
        except OSError as e:
            raise Reply(e.errno or errno.EADDRNOTAVAIL) from None

    def _install(self, t: Target, n: K.Notif, h: socket.socket, appfd: int, cloexec: bool) -> None:
        try:
            K.notif_addfd(t.fd, n.id if isinstance(n, K.Notif) else n, h.fileno(), appfd, cloexec)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise Gone() from None
            raise

    # -- handlers ----------------------------------------------------------------------------
    def _on_bind(self, t: Target, n: K.Notif) -> None:
        nested, s, raw = self._prologue(t, n, 1, 2)
        with s:
            if s.family not in IP:
                return self._send(t, n.id, cont=True)  # unix paths resolve in the task's root
            target = self._decode(s, raw, v4_on_v6=False)
            if self._is_host(s) or target is None:
                return self._send(t, n.id, err=K.raw_call("bind", s.fileno(), raw))
            v6only = "v6only" in hostsock.socket_flags(s)
            d = self._decide(t, Op("bind", s.family, target[0], target[1], s.type, s.proto, v6only=v6only), nested)
            self._audit(t, "bind", d, n, addr=target[0], port=target[1])
            if d.verdict == DENY:
                raise Reply(d.errno)
            if d.verdict == LOCAL or s.getsockname()[1] != 0:
                # (a socket bound already gets the kernel's EINVAL, as natively)
                return self._send(t, n.id, err=K.raw_call("bind", s.fileno(), raw))
            h, appfd, cloexec, nonblock = self._replacement(n, s, d)
            with h:
                h.setblocking(not nonblock)
                if s.type == socket.SOCK_STREAM:
                    # a grafted server socket listens at once (the app's own listen() then sets
                    # its backlog): it can never be connect()ed to a host address no rule grants,
                    # not even by swapping it in under a call the supervisor lets CONTINUE
                    h.listen(socket.SOMAXCONN)
                host_addr = h.getsockname()
                view = raw if target[1] else K.with_port(raw, host_addr[1])
                self._install(t, n, h, appfd, cloexec)
                st = os.fstat(h.fileno())
                t.views[st.st_ino] = view
                t.served[host_addr[:2]] = view
                self.stats["grafted_bind"] += 1
            self._send(t, n.id)

    def _on_connect(self, t: Target, n: K.Notif) -> None:
        nested, s, raw = self._prologue(t, n, 1, 2)
        keep = False
        try:
            if s.family not in IP:
                return self._send(t, n.id, cont=True)
            target = self._decode(s, raw)
            if target is None:  # AF_UNSPEC (dissolve the association) or malformed: the kernel says
                return self._send(t, n.id, err=K.raw_call("connect", s.fileno(), raw))
            is_host = self._is_host(s)
            d = self._decide(t, self._egress_op("connect", s, target, is_host), nested)
            self._audit(t, "connect", d, n, addr=target[0], port=target[1], grafted=is_host or None)
            if d.verdict == DENY:
                raise Reply(d.errno)
            if is_host:  # granted: the engine named the destination
                keep = self._perform_connect(t, n, s, raw)
                return
            if d.verdict == LOCAL:
                keep = self._perform_connect(t, n, s, raw)
                return
            self._graft_connect(t, n, s, d, raw)
        finally:
            if not keep:
                s.close()

    def _decide(self, t: Target, op: Op, nested) -> Decision:
        """The engine's decision; whether the task is in a nested netns is only asked (a stat)
        where the answer can change it: a grant."""
        policy = self.store.cached_policy(t.key)
        d = policy.decide(op)
        if d.granted and not op.grafted and nested():
            d = policy.decide(dataclasses.replace(op, foreign=True))
        return d

    @staticmethod
    def _egress_op(verb: str, s: socket.socket, target, is_host: bool) -> Op:
        bound = not is_host and s.getsockname()[1] != 0  # bound or connected in the container already
        return Op(verb, s.family, target[0], target[1], s.type, s.proto, bound=bound, grafted=is_host)

    def _perform_connect(self, t: Target, n: K.Notif, s: socket.socket, raw: bytes) -> bool:
        """connect() on our duplicate with the copied bytes. Blocking stream sockets go to the
        pool (returns True: the pool job now owns `s`)."""
        nonblock = fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        if nonblock or s.type != socket.SOCK_STREAM:
            self._send(t, n.id, err=K.raw_call("connect", s.fileno(), raw))
            return False
        self._in_pool(t, n, s, lambda: (0, K.raw_call("connect", s.fileno(), raw)))
        return True

    def _in_pool(self, t: Target, n: K.Notif, s: socket.socket, op) -> None:
        """Run a blocking operation on our duplicate `s` in the pool; the job answers and closes `s`.
        Jobs stay registered so that a dead target's (sweep) or a closing supervisor's can be
        aborted (shutdown of the socket) instead of blocking a worker or the exit."""
        self._hold(t)
        with self._lock:
            self._jobs[s] = (t, n.id)

        def job():
            try:
                val, err = op()
                self._send(t, n.id, val=val, err=err)
            except OSError:
                pass
            finally:
                with self._lock:
                    del self._jobs[s]
                s.close()
                self._release(t)

        self.stats["pool_jobs"] += 1
        self._pool.submit(job)

    def _abort_jobs(self, only_dead: bool) -> None:
        with self._lock:
            for s, (t, nid) in self._jobs.items():
                if only_dead and K.notif_id_valid(t.fd, nid):
                    continue
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _graft_connect(self, t: Target, n: K.Notif, s: socket.socket, d: Decision, raw: bytes) -> None:
        h, appfd, cloexec, nonblock = self._replacement(n, s, d)
        try:
            h.setblocking(False)
            err = K.raw_call("connect", h.fileno(), raw)
            if err == errno.EINPROGRESS and not nonblock and s.type == socket.SOCK_STREAM and \
                    h.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_ESTABLISHED:
                err = 0  # loopback handshakes are often over by now: no trip through the loop
            if err == errno.EINPROGRESS and not nonblock:
                self._hold(t)
                sec, usec = struct.unpack("=qq", s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16))
                deadline = time.monotonic() + sec + usec / 1e6 if sec or usec else None
                self.pending[h.fileno()] = Pending(t, n.id, appfd, cloexec, h, deadline)
                self.epoll.register(h.fileno(), select.EPOLLOUT)
                h = None  # the loop owns it now
                self.stats["connect_pending"] += 1
                return
            if err not in (0, errno.EINPROGRESS):
                raise Reply(err)
            if not nonblock:
                h.setblocking(True)
            self._install(t, n, h, appfd, cloexec)
            self.stats["grafted_connect"] += 1
            self._send(t, n.id, err=err)
        finally:
            if h is not None:
                h.close()

    def _finish_connect(self, p: Pending, timed_out: bool = False) -> None:
        self.epoll.unregister(p.host.fileno())
        t = p.target
        try:
            err = p.host.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._send(t, p.nid, err=err)
                return
            if timed_out and p.host.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED:
                err = errno.EINPROGRESS
            p.host.setblocking(True)  # the app asked for a blocking socket: it must see one
            try:
                K.notif_addfd(t.fd, p.nid, p.host.fileno(), p.appfd, p.cloexec)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            self.stats["grafted_connect"] += 1
            self._send(t, p.nid, err=err)
        finally:
            p.host.close()
            self._release(t)

    def _on_sendto(self, t: Target, n: K.Notif) -> None:
        nested, s, raw = self._prologue(t, n, 4, 5)
        keep = False
        try:
            if s.family not in IP:
                return self._send(t, n.id, cont=True)
            size = n.args[2]
            flags = n.args[3] & 0xFFFFFFFF
            if s.type == socket.SOCK_DGRAM and size > MAX_DATAGRAM:
                raise Reply(errno.EMSGSIZE)
            data = self._read(n, n.args[1], min(size, 1 << 20))
            self._valid(t, n)
            target = self._decode(s, raw)
            is_host = self._is_host(s)
            fastopen = flags & getattr(socket, "MSG_FASTOPEN", 0x20000000)
            if target is None or (s.type == socket.SOCK_STREAM and not fastopen):
                # the kernel rejects it, or ignores the address (connected stream socket)
                if is_host and target is not None and s.type != socket.SOCK_STREAM:
                    raise Reply(errno.EINVAL)
                keep = self._perform_sendto(t, n, s, data, flags, raw)
                return
            d = self._decide(t, self._egress_op("sendto", s, target, is_host), nested)
            self._audit(t, "sendto", d, n, addr=target[0], port=target[1], grafted=is_host or None)
            if d.verdict == DENY:
                raise Reply(d.errno)
            if is_host:  # granted: the engine named the destination
                keep = self._perform_sendto(t, n, s, data, flags, raw)
                return
            if d.verdict == LOCAL or s.type != socket.SOCK_DGRAM:
                keep = self._perform_sendto(t, n, s, data, flags, raw)
                return
            h, appfd, cloexec, nonblock = self._replacement(n, s, d)
            with h:
                h.setblocking(not nonblock)
                sent, err = K.raw_sendto(h.fileno(), data, flags | socket.MSG_DONTWAIT, raw)
                self._install(t, n, h, appfd, cloexec)
                self.stats["grafted_sendto"] += 1
                self._send(t, n.id, val=sent, err=err)
        finally:
            if not keep:
                s.close()

    def _perform_sendto(self, t: Target, n: K.Notif, s: socket.socket, data: bytes, flags: int, raw: bytes) -> bool:
        sent, err = K.raw_sendto(s.fileno(), data, flags | socket.MSG_DONTWAIT, raw)
        blocking = not (fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK) and not flags & socket.MSG_DONTWAIT
        if err != errno.EAGAIN or not blocking:
            self._send(t, n.id, val=sent, err=err)
            return False
        self._in_pool(t, n, s, lambda: K.raw_sendto(s.fileno(), data, flags, raw))
        return True

    def _on_getsockname(self, t: Target, n: K.Notif) -> None:
        s = self._sock(self._dup(t, n, n.args[0] & 0xFFFFFFFF))
        with s:
            if s.family not in IP or not self._is_host(s):
                return self._send(t, n.id, cont=True)  # nothing judged: the kernel answers
            view = self._view(t, s)
            addr, lenp = n.args[1], n.args[2]
            size = struct.unpack("=i", self._read(n, lenp, 4))[0]
            if size < 0:
                raise Reply(errno.EINVAL)
            self._write_back(t, n, [(addr, view[:size]), (lenp, struct.pack("=i", len(view)))])
            self._send(t, n.id)

    def _view(self, t: Target, s: socket.socket) -> bytes:
        """The address a grafted socket shows its application."""
        view = t.views.get(os.fstat(s.fileno()).st_ino)
        if view is not None:
            return view
        real = s.getsockname()
        raw = K.encode_sockaddr(s.family, *real[:2], *real[2:])
        wildcard = "0.0.0.0" if s.family == socket.AF_INET else "::"
        app = t.served.get(real[:2]) or t.served.get((wildcard, real[1]))
        if app is None:
            return raw  # a client socket: its real source
        _fam, app_addr, app_port = K.decode_sockaddr(app)
        if app_addr in ("0.0.0.0", "::"):
            return K.with_port(raw, app_port)  # an accepted socket of a wildcard listener
        return app

    def _on_sidedoor(self, t: Target, n: K.Notif) -> None:
        """Socket ioctls (0x89xx) and SO_BINDTODEVICE/SO_BINDTOIFINDEX: refused on grafted sockets,
        performed by the supervisor on its duplicate for native ones (never CONTINUE: another thread
        could put a grafted socket at that fd number between the check and the kernel's lookup)."""
        is_ioctl = n.nr == K.SYS["ioctl"]
        dup = self._dup(t, n, n.args[0] & 0xFFFFFFFF)
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            raise Reply(errno.ENOTTY if is_ioctl else errno.ENOTSOCK) from None
        with s:
            cmd = n.args[1] & 0xFFFFFFFF
            if self._is_host(s):
                verb = "ioctl" if is_ioctl else "bindtodevice"
                d = self.store.cached_policy(t.key).decide(Op(verb, s.family, grafted=True))
                self._audit(t, f"ioctl {cmd:#x}" if is_ioctl else "setsockopt SO_BINDTODEVICE", d, n)
                raise Reply(d.errno)
            if is_ioctl:
                self._native_ioctl(t, n, s, cmd, n.args[2])
            else:
                size = n.args[4] & 0xFFFFFFFF
                if size > 64:
                    raise Reply(errno.EINVAL)
                optval = self._read(n, n.args[3], size)
                self._valid(t, n)
                try:
                    s.setsockopt(cmd, n.args[2] & 0xFFFFFFFF, optval)
                except OSError as e:
                    raise Reply(e.errno) from None
                self._send(t, n.id)

    def _native_ioctl(self, t: Target, n: K.Notif, s: socket.socket, cmd: int, arg: int) -> None:
        """The socket ioctls a container may use on its own sockets, performed on our duplicate (the
        socket's netns is the container's). Anything carrying a pointer the kernel would follow in
        the caller's memory (ethtool, MII, bonding, device-private, routes, ARP) is refused."""
        if cmd == K.SIOCGSKNS:
            self._valid(t, n)
            nsfd = fcntl.ioctl(s.fileno(), cmd)
            try:
                K.notif_addfd(t.fd, n.id, nsfd, cloexec=True, send=True)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            finally:
                os.close(nsfd)
            return
        if cmd == K.SIOCGIFCONF:
            return self._ifconf(t, n, s, arg)
        size = K.IOCTL_OUT.get(cmd) or (K.IFREQ_SIZE if cmd in K.IFREQ_GET else 0)
        if not size and cmd in K.IFREQ_SET and K.has_cap(n.pid, K.CAP_NET_ADMIN):
            size = K.IFREQ_SIZE
        if not size:
            d = self.store.cached_policy(t.key).decide(Op("ioctl", s.family, supported=False))
            self._audit(t, f"ioctl {cmd:#x}", d, n)
            raise Reply(d.errno)
        buf = bytearray(self._read(n, arg, size) if cmd not in K.IOCTL_OUT else size)
        try:
            ret = fcntl.ioctl(s.fileno(), cmd, buf, True)
        except OSError as e:
            raise Reply(e.errno) from None
        self._write_back(t, n, [(arg, bytes(buf))])
        self._send(t, n.id, val=ret)

    def _ifconf(self, t: Target, n: K.Notif, s: socket.socket, arg: int) -> None:
        length, ptr = K.IFCONF.unpack(self._read(n, arg, K.IFCONF.size))
        if length < 0 or length > 1 << 20:
            raise Reply(errno.EINVAL)
        got, data = K.ifconf(s.fileno(), length if ptr else 0, bool(ptr))
        writes = [(arg, struct.pack("=i", got))]
        if ptr and got:
            writes.append((ptr, data[:got]))
        self._write_back(t, n, writes)
        self._send(t, n.id)

    def _write_back(self, t: Target, n: K.Notif, writes: list[tuple[int, bytes]]) -> None:
        """Write results into the target's memory: /proc/TID/mem is opened first, then the
        notification is checked, so the writes cannot land in another process."""
        try:
            mem = os.open(f"/proc/{n.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            raise Gone() from None
        try:
            self._valid(t, n)
            for addr, data in writes:
                if data:
                    os.pwrite(mem, data, addr)
        except OSError:
            raise Reply(errno.EFAULT) from None
        finally:
            os.close(mem)

    _handlers = {
        K.SYS["bind"]: _on_bind,
        K.SYS["connect"]: _on_connect,
        K.SYS["sendto"]: _on_sendto,
        K.SYS["getsockname"]: _on_getsockname,
        K.SYS["ioctl"]: _on_sidedoor,
        K.SYS["setsockopt"]: _on_sidedoor,
    }

