"""The seccomp supervisor: one epoll loop in the host netns serving the listeners of many containers.

A listener comes from anywhere (`graft run --mode seccomp`, or an OCI runtime through
`linux.seccomp.listenerPath`): `add_listener(fd, container_key, pid)`. The native fast path
(fast.py, libgraft-seccomp.so) waits on the listeners in a C thread of its own and serves there the
connects the container's compiled egress table decides; anything else comes back to this loop
(through the C loop's eventfd), as do the records of what C served (audit, stats). Without that
loop (no WAL index, GRAFT_SECCOMP_LOOP=0) this loop epolls the listeners and lets the fast path
receive each notification. The
loop builds a `Call` (targets.py) and hands it to the handlers (handlers.py, sidedoors.py), which
take their own duplicate of the target's fd, copy the memory arguments once, check the
notification is still valid, ask the engine, audit, and perform the operation themselves. The
operations that may block run in a small pool (jobs.py); a blocking connect being grafted is
parked here until its host-side connect completes.

Public API: `Supervisor(state_dir, audit, workers, on_notification)`, `add_listener`,
`active_keys`, `start_thread`, `run`, `stop_receiving`, `stop`, `close`.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import sys
import threading
import time
from collections import Counter, deque

from sockgraft.host import netns, optwatch
from sockgraft.host.audit import Audit
from sockgraft.host.store import Store
from sockgraft.modes.seccomp import fast as F
from sockgraft.modes.seccomp import fastlib as FL
from sockgraft.modes.seccomp import kernel as K
from sockgraft.modes.seccomp.handlers import TCP_ESTABLISHED, Handlers
from sockgraft.modes.seccomp.jobs import Jobs
from sockgraft.modes.seccomp.targets import Call, Kernel, Pending, Target

SWEEP_INTERVAL = 1.0


class Supervisor:
    def __init__(self, state_dir: str | None = None, audit: Audit | None = None, workers: int = 4,
                 on_notification=None, kernel: Kernel | None = None):
        """`on_notification(seconds)`, if given, is called with the time each notification took.
        `kernel`: the kernel calls about targets (targets.Kernel; a unit test may pass a fake)."""
        self.store = Store(state_dir)
        self._own_audit = audit is None  # closed with the supervisor
        self.audit = audit or Audit(state_dir)
        self.audit.deferred = True  # answer first, write the log lines when the loop is idle
        self.on_notification = on_notification
        self.kernel = kernel or Kernel()
        self.epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.epoll.register(self._wake_r, select.EPOLLIN)
        self.targets: dict[int, Target] = {}
        self.pending: dict[int, Pending] = {}
        self._adds: deque = deque()
        self._lock = threading.Lock()
        self._stop = False
        self._last_sweep = time.monotonic()
        self.stats: Counter = Counter()
        self.jobs = Jobs(workers, self._hold, self._release, self.stats)
        # which options the apps' sockets were given (host/optwatch.py): only with the real kernel calls
        self.optwatch = optwatch.Watch() if kernel is None else None
        self.handlers = Handlers(self.store, self.audit, self.jobs, self._park, self.stats, self.optwatch)
        # the native connect path (fast.py): only with the real kernel calls, GRAFT_SECCOMP_FAST != 0
        lib = FL.try_load() if kernel is None else None
        self.fast = F.Fast(lib, self.kernel, self.store, self.audit, self.stats, self.optwatch) if lib is not None else None
        # the C wait-and-serve loop (fast.Loop): made here (its fds are the supervisor's from the
        # start), its thread started by run(); None: the listeners are epolled here
        self.native_fd = self.fast.open_loop() if self.fast is not None else None
        if self.native_fd is not None:
            self.epoll.register(self.native_fd, select.EPOLLIN)
        self._records_came = False  # the last look at the C loop's records found some
        self._quiesce: threading.Event | None = None  # stop_receiving() asked
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

    def stop_receiving(self, timeout: float = 5.0) -> None:
        """The C loop receives no more notifications; what it received and handed over is served
        (hand-backs, parks) before this returns. For a drain before a restart (graftd): what was
        not received stays queued in the kept listener. The listeners the Python loop epolls are
        the caller's (`epoll.modify(fd, 0)`)."""
        if self.native_fd is None:
            return
        done = threading.Event()
        self._quiesce = done
        self._wake()
        if self.thread is None or not self.thread.is_alive() or self.thread is threading.current_thread():
            self._quiesce_now()
        else:
            done.wait(timeout)

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
        self._stop_native()  # if run() never ran its finally (no thread)
        if self.fast is not None:
            self.fast.close()  # the C loop's context, every table's pools
        if self.optwatch is not None:
            self.optwatch.close()  # after the tables that held its fd
        self.audit.flush(force=True)  # the aggregated grants and locals of the last interval too
        if self._own_audit:
            self.audit.close()
        self.jobs.shutdown()
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
        if self.native_fd is not None and self.fast.loop.thread is None:
            self.fast.loop.start()
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
                if self.native_fd is not None:
                    try:
                        if not events:
                            self._records()  # those not signalled (GS_SIGNAL_NS)
                        self.fast.refresh()  # the tables checked against the database, pools filled
                    except Exception as e:
                        print(f"graft: seccomp supervisor: {type(e).__name__}: {e}", file=sys.stderr)
                self.audit.flush()
                now = time.monotonic()
                if now - self._last_sweep >= SWEEP_INTERVAL or self._deadline_due(now):
                    self._last_sweep = now
                    self._sweep()
        finally:
            self._stop_native()
            if not self._stop:
                # the loop died: close the listeners so the containers' trapped calls fail (ENOSYS)
                # instead of waiting for an answer that never comes
                for t in list(self.targets.values()):
                    self._close_target(t)

    # -- events ------------------------------------------------------------------------------
    def _dispatch(self, fd: int, ev: int) -> None:
        if fd == self._wake_r:
            self._drain()
        elif fd == self.native_fd:
            self._records()
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

    def _serve_one(self, t: Target) -> None:
        n = self.fast.serve(t, self._park_native) if self.fast is not None else FL.FALLBACK
        if n is None:
            return  # served in C (or nothing was there)
        if n is FL.FALLBACK:  # no fast path, or no table for this target: Python receives it
            try:
                n = self.kernel.recv(t.fd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR):
                    return  # the target died before we received it: retry on the next event
                raise
            self.stats["notifications"] += 1
        self.handlers.serve(Call(self.kernel, t, n))

    # -- the C loop (fast.Loop) -----------------------------------------------------------------
    def _records(self, records: list | None = None) -> None:
        """What the C loop handed over: hand-backs served by the Python handlers, parks, hang-ups,
        and the records of what it served (audit, stats)."""
        records = self.fast.take() if records is None else records
        self._records_came = bool(records)
        for out in records:
            t = self.fast.target_of(out)
            if t is None:
                continue
            try:
                if out.kind in (FL.HUP, FL.ERROR):
                    if out.kind == FL.ERROR:
                        print(f"graft: seccomp supervisor: listener of {t.key}: {os.strerror(out.err)}",
                              file=sys.stderr)
                    self._drop(t)
                    continue
                t0 = time.perf_counter()
                n = self.fast.record(t, out, self._park_native)
                if n is not None:
                    self.handlers.serve(Call(self.kernel, t, n))
                    if self.on_notification is not None:
                        self.on_notification(time.perf_counter() - t0)
            except Exception as e:  # one bad record must not stop the loop for everyone
                print(f"graft: seccomp supervisor: {type(e).__name__}: {e}", file=sys.stderr)

    def _quiesce_now(self) -> None:
        with self._lock:
            ev, self._quiesce = self._quiesce, None
        if ev is None:
            return
        try:
            self._records(self.fast.stop_loop())  # served: the Python loop goes on for them
        finally:
            ev.set()

    def _stop_native(self) -> None:
        """Stop the C loop's thread; the records it left get their bookkeeping (no hand-back is
        served any more: its task gets ENOSYS when the listener closes; a parked socket is closed)."""
        if self.fast is None or self.native_fd is None:
            return
        left = self.fast.stop_loop()  # [] once stopped
        for out in left:
            t = self.fast.target_of(out)
            if out.kind == FL.PARK:
                os.close(out.hostfd)
            elif out.kind == FL.DONE and t is not None:
                try:
                    self.fast.record(t, out, None)
                except Exception as e:
                    print(f"graft: seccomp supervisor: {type(e).__name__}: {e}", file=sys.stderr)

    def _park_native(self, t: Target, n: K.Notif, host: socket.socket, appfd: int, cloexec: bool,
                     deadline: float | None, raw: bytes) -> None:
        self._park(Call(self.kernel, t, n), host, appfd, cloexec, deadline, raw)

    def _timeout(self) -> float:
        if self._records_came:  # the C loop's unsignalled records are picked up soon
            return min(0.05, self._timeout_pending())
        return self._timeout_pending()

    def _timeout_pending(self) -> float:
        deadlines = [p.deadline for p in self.pending.values() if p.deadline]
        if not deadlines:
            return SWEEP_INTERVAL
        return max(0.0, min(SWEEP_INTERVAL, min(deadlines) - time.monotonic()))

    def _deadline_due(self, now: float) -> bool:
        return any(p.deadline and p.deadline <= now for p in self.pending.values())

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
        if self._quiesce is not None:
            self._quiesce_now()
        while self._adds:
            t = self._adds.popleft()
            self._sync_wake_up(t)
            self.targets[t.fd] = t
            native = self.native_fd is not None and self.fast.loop.thread is not None  # not stop_receiving()
            if not native or not self.fast.attach(t):
                self.epoll.register(t.fd, select.EPOLLIN)
        with self._lock:
            done = [t for t in self.targets.values() if t.closing and t.busy == 0]
        for t in done:
            self._close_target(t)

    # -- targets' lifecycle ------------------------------------------------------------------
    def _sync_wake_up(self, t: Target) -> None:
        """Same-CPU wake-ups on this listener (a cross-CPU wake-up costs 30-60 µs on a VM); where
        the kernel refuses (< 6.6), served as before: said once per supervisor."""
        try:
            self.kernel.sync_wake_up(t.fd)
            self.stats["sync_wake_up"] += 1
        except OSError as e:
            self.stats["sync_wake_up_failed"] += 1
            if self.stats["sync_wake_up_failed"] == 1:
                print(f"graft: seccomp supervisor: no same-CPU wake-ups ({e.strerror or e}): served as before",
                      file=sys.stderr)

    def _drop(self, t: Target) -> None:
        """Every task under this filter is gone."""
        if t.slot < 0:
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
        if self.fast is not None:
            self.fast.forget(t)
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
        does for a blocking connect that times out. Pool jobs of dead tasks: aborted."""
        now = time.monotonic()
        self.jobs.abort(only_dead=True)
        for fd, p in list(self.pending.items()):
            if not self.kernel.id_valid(p.target.fd, p.call.n.id):
                del self.pending[fd]
                self.epoll.unregister(fd)
                p.host.close()
                self._release(p.target)
                self.stats["connect_abandoned"] += 1
            elif p.deadline and p.deadline <= now:
                del self.pending[fd]
                self._finish_connect(p, timed_out=True)

    # -- parked connects ---------------------------------------------------------------------
    def _park(self, call: Call, host: socket.socket, appfd: int, cloexec: bool, deadline: float | None,
              raw: bytes = b"") -> None:
        """A blocking app's grafted connect in progress on `host`: answered by _finish_connect."""
        self._hold(call.target)
        self.pending[host.fileno()] = Pending(call, appfd, cloexec, host, deadline, raw)
        self.epoll.register(host.fileno(), select.EPOLLOUT)

    def _finish_connect(self, p: Pending, timed_out: bool = False) -> None:
        self.epoll.unregister(p.host.fileno())
        try:
            err = p.host.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                p.call.send(err=err)
                return
            if timed_out and p.host.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED:
                err = errno.EINPROGRESS
            elif p.raw:  # done: connected as a blocking connect leaves it (a next connect: EISCONN)
                err = K.raw_call("connect", p.host.fileno(), p.raw)
                if err:
                    p.call.send(err=err)
                    return
            p.host.setblocking(True)  # the app asked for a blocking socket: it must see one
            try:
                self.kernel.addfd(p.target.fd, p.call.n.id, p.host.fileno(), p.appfd, p.cloexec)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            self.stats["grafted_connect"] += 1
            p.call.send(err=err)
        finally:
            p.host.close()
            self._release(p.target)
