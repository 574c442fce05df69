"""The native fast path of the seccomp supervisor's connect (`libgraft-seccomp.so`, csrc/seccomp_fast.c).

The C loop step `gs_serve` (called through `gs_serve_batch`: again while notifications are ready,
at most BATCH) receives one notification and serves, by itself, the connect() of an
unbound IP socket of the container whose destination the container's compiled egress table decides
(`Policy.egress_table()`: a grant, or "local" for a non-blocking or datagram socket), with the same
steps as handlers.graft_connect / perform_connect, and the bind() of such a socket that an ingress
pair takes (`Policy.ingress_table()`, compiled by modes/api/fast.compile_in_rows: a grant with
handlers.on_bind's steps, its view recorded here from the record) or none takes. Everything else
comes back here untouched
(HANDBACK: the Python handlers serve it, no second RECV), as does a blocking grafted connect still
in progress (PARK: the supervisor's parking finishes it). The table is what the engine compiled;
the C decides nothing the engine would not (tests/modes/seccomp/test_fast.py holds `gs_lookup`
equal to `EgressTable.lookup`), and what it did is audited here with the engine's own Decision
(`policy.decide` of the same operation, asked once per rule and socket kind, after the answer).

The wait itself is in C too (`Loop`, gs_loop_*): a thread of its own polls the listeners and
serves them; hand-backs, parks, hang-ups and a record of each notification served come back here
through a ring (`take`), tables are swapped and pools filled under the loop's mutex, and a table is
used only at the state database's version it was compiled at (the WAL index header: `refresh`
compiles again). A sendto with a destination on a TCP socket (no MSG_FASTOPEN) is answered
CONTINUE in C. Without a WAL index (a read-only store) or with `GRAFT_SECCOMP_LOOP=0`, the
supervisor's Python loop epolls the listeners and calls `gs_serve_batch` (`serve`).

`GRAFT_SECCOMP_FAST=0` turns it off; a missing or unloadable library is said once on stderr and
the Python path serves everything.

Public API (the library itself: fastlib.py, `try_load()`): `Fast(lib, kernel, store, audit,
stats)` with `serve(target, park)`, `compile(target)`, `forget(target)`, and for the C loop
`open_loop()`, `attach(target)`, `take()`, `record(target, out, park)`, `refresh()`, `stop_loop()`,
`close()`.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import sys
import time

from sockgraft.core.engine import Op
from sockgraft.host import egress, hostsock
from sockgraft.modes.seccomp import kernel as K
from sockgraft.modes.seccomp import native as N
from sockgraft.modes.seccomp.fastlib import (BATCH, DONE_CONTINUE, DONE_GONE, DONE_GRANT, DONE_LOCAL, FALLBACK, GRANT,
                                             HANDBACK, MODE, PARK, POOL, POOL_LOW, QROWS, Out, Pool, Quiet, _ADDR, _HOST,
                                             _notif, make_table)
class Compiled:
    """One target's table, compiled from one policy object, with its rows' pools of host sockets."""

    __slots__ = ("policy", "table", "rows", "ingress", "decisions", "pools", "pools_said", "checked", "lock")

    def __init__(self, policy, host_cookie: int, netns_ino: int | None, version: int = 0, lock=None, optmap: int = -1):
        self.policy = policy
        self.table, (self.rows, self.ingress) = make_table(policy, host_cookie, netns_ino or 0, policy.mark, version,
                                                           optmap)
        self.decisions: dict = {}  # (verb, row, family, type, proto, v6only) -> the engine's Decision
        self.pools = None  # (Pool * nrows) while the kernel guards pooled sockets
        self.pools_said, self.checked = "", -1e9
        self.lock = lock or N.NoLock()  # the C loop's mutex while the C may use this table

    def fill(self, why_off) -> None:
        """Top up the pools of the rows whose endpoint is a dynamic IP one (off the answer's path:
        between calls of the C loop, or beside the C loop thread: the sockets are made first, then
        put in under its mutex). `why_off()` says why pools may not be used ("" when they may),
        asked at most once a second; while they may not, C makes each socket inline."""
        now = time.monotonic()
        if now - self.checked >= 1.0:
            self.checked = now
            self.pools_said = why_off()
            if self.pools_said:
                self.close()
            elif self.pools is None:
                pools = (Pool * len(self.rows))()
                with self.lock:
                    self.pools = pools
                    self.table.pools = ctypes.cast(pools, ctypes.POINTER(Pool))
        if self.pools is None:
            return
        for i in range(self.table.nrows):
            r, p = self.rows[i], self.pools[i]
            if r.eptype not in (4, 6) or r.epport != 0 or p.n >= POOL_LOW:  # p.n read unlocked: a hint
                continue
            family = socket.AF_INET if r.eptype == 4 else socket.AF_INET6
            if isinstance(self.lock, N.LoopLock):  # made in C (the GIL released), put in under the mutex
                self.lock.lib.gs_pool_fill(self.lock.ctx, ctypes.byref(self.table), i, family, r.epaddr,
                                           self.policy.mark)
                continue  # a failure: C makes the socket inline, and says what failed
            addr = str(ipaddress.ip_address(bytes(r.epaddr[:4] if r.eptype == 4 else r.epaddr)))
            made: list[int] = []
            try:
                while len(made) < POOL - p.n:
                    made.append(hostsock.pooled(family, addr, socket.SOCK_STREAM, 0, self.policy.mark).detach())
            except OSError:
                pass  # C makes the socket inline, and says what failed
            with self.lock:
                p.family, p.type = family, socket.SOCK_STREAM
                while made and p.n < POOL:
                    p.fds[p.n] = made.pop()
                    p.n += 1
            for fd in made:
                os.close(fd)

    def close(self) -> None:
        if self.pools is not None:
            with self.lock:
                pools, self.pools = self.pools, None
                self.table.pools = None
                fds = [fd for p in pools for fd in p.fds[:p.n]]
                for p in pools:
                    p.n = 0
            for fd in fds:
                os.close(fd)


class Fast:
    def __init__(self, lib, kernel, store, audit, stats, optwatch=None):
        self.lib, self.kernel, self.store, self.audit, self.stats = lib, kernel, store, audit, stats
        self.optwatch = optwatch  # host/optwatch.Watch: which options each app socket was given (None: read them all)
        self.outs = (Out * BATCH)()
        self.compiled: dict[int, Compiled] = {}  # listener fd -> its compiled table
        self.loop: N.Loop | None = None
        self.slots: dict[int, object] = {}  # the C loop's slot -> its Target
        self.version = None  # of the database, when the tables were last checked (C loop)
        self.counted = (0, 0, 0, 0)
        self._quiet_buf = Quiet()  # gs_loop_quiet's answer (read at once)

    def optmap(self) -> int:
        return self.optwatch.current() if self.optwatch is not None else -1

    def compile(self, t) -> Compiled:
        policy = self.store.cached_policy(t.key)
        c = self.compiled.get(t.fd)
        if c is None or c.policy is not policy:
            if c is not None:
                c.close()
            c = self.compiled[t.fd] = Compiled(policy, self.kernel.host_cookie, t.ino)
            c.fill(lambda: egress.pools_off(self.store, t.key))
            self.stats["fast_tables"] += 1
        c.table.optmap = self.optmap()  # -1 once the watch is gone (its fd stays open meanwhile)
        return c

    # -- the C loop (gs_loop) -----------------------------------------------------------------
    def open_loop(self) -> int | None:
        """The C loop's context made (its eventfd returned; `self.loop.start()` starts its thread),
        or None where it cannot run: the state database has no WAL index to watch (the read-only
        view), or it is turned off."""
        if not N.loop_enabled():
            return None
        try:
            self.loop = N.Loop(self.lib, self.store.path + "-shm", Out)
        except OSError as e:
            self.stats["fast_loop_off"] += 1
            print(f"graft: seccomp supervisor: {e.strerror or e}: the Python loop receives", file=sys.stderr)
            return None
        self.stats["fast_loop"] += 1
        return self.loop.fd

    def attach(self, t) -> bool:
        """Give a new listener to the C loop, with its table (False: the store failed; the Python
        loop then serves it as before)."""
        version = self.loop.version()  # before the policy is read: a commit between them is seen
        try:
            policy = self.store.cached_policy(t.key)
        except Exception as e:
            print(f"graft: seccomp fast path: no table for {t.key}: {type(e).__name__}: {e}", file=sys.stderr)
            return False
        c = self.compiled[t.fd] = Compiled(policy, self.kernel.host_cookie, t.ino, version, self.loop.lock, self.optmap())
        c.fill(lambda: egress.pools_off(self.store, t.key))
        self.stats["fast_tables"] += 1
        slot = self.lib.gs_loop_add(self.loop.ctx, t.fd, ctypes.byref(c.table))
        if slot < 0:
            c.close()
            del self.compiled[t.fd]
            print(f"graft: seccomp supervisor: native loop: {os.strerror(-slot)}", file=sys.stderr)
            return False
        t.slot = slot
        self.slots[slot] = t
        return True

    def refresh(self) -> None:
        """The tables of the C loop's targets checked against the database (a commit by anyone
        changes its version): a different policy gets a new table, swapped in; an equal one (another
        container's commit) is marked current. And their pools topped up. Cheap when nothing changed."""
        version = self.loop.version()
        changed = version != self.version
        for t in list(self.slots.values()):
            c = self.compiled.get(t.fd)
            if c is None:
                continue
            if changed:
                try:
                    policy = self.store.cached_policy(t.key)
                except Exception:
                    continue  # the old table stays stale: C hands its connects back
                if policy is c.policy or policy == c.policy:  # another container's commit, say
                    c.policy = policy
                    with self.loop.lock:
                        c.table.version = version
                else:
                    new = Compiled(policy, self.kernel.host_cookie, t.ino, version, self.loop.lock, self.optmap())
                    new.fill(lambda: egress.pools_off(self.store, t.key))
                    q = Quiet()
                    self.lib.gs_loop_set_table(self.loop.ctx, t.slot, ctypes.byref(new.table), q)
                    self.compiled[t.fd] = new
                    self._unrecorded(t, c, q)  # what the old table answered without a record
                    c.close()  # the C no longer uses it
                    self.stats["fast_tables"] += 1
                    continue
            c.table.optmap = self.optmap()  # -1 once the watch is gone (its fd stays open meanwhile)
            c.fill(lambda: egress.pools_off(self.store, t.key))
        self.version = version
        self.refresh_counts()

    def take(self) -> list:
        return self.loop.take() if self.loop is not None else []

    def target_of(self, out: Out):
        return self.slots.get(out.slot)

    def stop_loop(self) -> list:
        """Stop the C thread; returns the records it left (the caller does their bookkeeping), once
        what it answered without a record is counted."""
        if self.loop is None or self.loop.thread is None:
            return []
        self.loop.stop()
        self.refresh_counts()
        return self.loop.take()

    def close(self) -> None:
        """After stop_loop: the counts it left, every table's pools, then the loop's context (whose
        mutex they take)."""
        if self.loop is not None:
            self.refresh_counts()
        for c in self.compiled.values():
            c.close()
        self.compiled.clear()
        self.slots.clear()
        if self.loop is not None:
            self.loop.free()
            self.loop = None

    def refresh_counts(self) -> None:
        counts = self.loop.counts()
        continued = counts[0] - self.counted[0]  # sendto on TCP, getsockname of a container socket
        if continued:
            self.stats["fast_continue"] += continued
            self.stats["notifications"] += continued
        self.counted = counts
        for slot, t in self.slots.items():
            self._quiet(slot, t)

    def _quiet(self, slot: int, t) -> None:
        """What the C loop answered without a record (gs_loop_quiet: all but the first of each
        second, which came as a record with its address): locals answered CONTINUE, and connects
        granted with a pooled socket."""
        self.lib.gs_loop_quiet(self.loop.ctx, slot, self._quiet_buf)
        self._unrecorded(t, self.compiled.get(t.fd), self._quiet_buf)

    def _unrecorded(self, t, c: Compiled | None, q: Quiet) -> None:
        """The stats and audit lines of what `c`'s table answered without a record (the audit
        aggregates them per second as it does every grant and local)."""
        if not (any(q.locals) or any(q.grants)):
            return
        if c is None:  # forgotten meanwhile
            c = self._bare(t)
        for verb, n in zip(("bind", "connect"), q.locals):
            if not n:
                continue
            self.stats["notifications"] += n
            self.stats["fast_local"] += n
            self.stats["fast_local_continue"] += n
            d = c.policy.decide(Op(verb, socket.AF_UNIX))  # what no pair or rule matches: the engine's local
            self.audit.decision(t.key, MODE, verb, d, count=n)
        for row in range(QROWS):
            n = q.grants[row]
            if not n:
                continue
            for key in ("notifications", "grafted_connect", "fast_grant", "fast_pooled", "fast_quiet_grant"):
                self.stats[key] += n
            raw = bytes(q.addr[row][:q.addrlen[row]])
            self.audit.decision(t.key, MODE, "connect", self._decision(c, "connect", row, q.family[row], q.type[row],
                                                                       q.proto[row], False, raw), count=n)

    def forget(self, t) -> None:
        if self.loop is not None and getattr(t, "slot", -1) >= 0:
            self.lib.gs_loop_remove(self.loop.ctx, t.slot)  # the C no longer uses t.fd nor its table
            self._quiet(t.slot, t)  # (the slot's last counts: it is reused only by attach)
            self.slots.pop(t.slot, None)
            t.slot = -1
        c = self.compiled.pop(t.fd, None)
        if c is not None:
            c.close()

    def serve(self, t, park):
        """Receive and serve the notifications of `t` that are ready (at least one, at most
        BATCH); returns the last one (a K.Notif) when the Python handlers must serve it, None when
        all were served, FALLBACK when nothing was received because no table could be compiled.
        `park(target, n, host, appfd, cloexec, deadline, raw)`."""
        try:
            c = self.compile(t)
        except Exception as e:  # the store failed: the Python handlers answer (with an errno)
            self.stats["fast_no_table"] += 1
            if self.stats["fast_no_table"] == 1:
                print(f"graft: seccomp fast path: no table for {t.key}: {type(e).__name__}: {e}", file=sys.stderr)
            return FALLBACK
        count = self.lib.gs_serve_batch(t.fd, ctypes.byref(c.table), self.outs, BATCH)
        if count < 0:
            raise OSError(-count, os.strerror(-count))
        c.fill(lambda: egress.pools_off(self.store, t.key))
        if count > 1:
            self.stats["fast_batched"] += count - 1
        for i in range(count):
            n = self._served(t, c, self.outs[i], park)
            if n is not None:
                return n
        return None

    def record(self, t, out: Out, park) -> K.Notif | None:
        """The bookkeeping of one record of the C loop (`t`: its target): what `serve` does with
        what gs_serve_batch returned; a hand-back is returned for the Python handlers."""
        c = self.compiled.get(t.fd)
        if c is None:  # forgotten meanwhile: a record without its table (nothing to audit from)
            c = self._bare(t)
        return self._served(t, c, out, park)

    def _bare(self, t) -> Compiled:
        """A stand-in for a target's forgotten table: its policy and decisions only."""
        c = Compiled.__new__(Compiled)
        c.policy, c.decisions = self.store.cached_policy(t.key), {}
        return c

    def _served(self, t, c: Compiled, out: Out, park) -> K.Notif | None:
        """(Every notification C served passes here: the fields read are few, the bytes copied with
        string_at, the sockaddr decoded once.)"""
        r = out.kind
        self.stats["notifications"] += 1
        if r == HANDBACK:
            self.stats["fast_handback"] += 1
            if out.stale:
                self.stats["fast_stale"] += 1
            return _notif(out)
        raw = ctypes.string_at(ctypes.addressof(out) + _ADDR, out.addrlen)
        if out.decided >= 0:
            try:
                self._audit(t, c, out, raw)
            except Exception as e:  # answered already: what C did must still reach its record
                print(f"graft: seccomp fast path: audit: {type(e).__name__}: {e}", file=sys.stderr)
        if r == PARK:
            host = socket.socket(fileno=out.hostfd)
            us = out.sndtimeo_us
            park(t, _notif(out), host, out.appfd, bool(out.cloexec), time.monotonic() + us / 1e6 if us else None, raw)
            self.stats["connect_pending"] += 1
            self.stats["fast_park"] += 1
            return None
        what = out.what
        if what == DONE_GRANT and out.nr == K.SYS["bind"]:
            self._bound(t, out, raw)
        elif what == DONE_GRANT:
            self.stats["grafted_connect"] += 1
            self.stats["fast_grant"] += 1
            if out.pooled:
                self.stats["fast_pooled"] += 1
        elif what == DONE_LOCAL:
            self.stats["fast_local"] += 1
            if out.pooled:
                self.stats["fast_local_continue"] += 1
        elif what == DONE_CONTINUE:
            self.stats["fast_continue"] += 1
        elif what == DONE_GONE:
            self.stats["gone"] += 1
        else:
            self.stats["fast_failed"] += 1
        return None

    def _bound(self, t, out: Out, raw: bytes) -> None:
        """A bind C granted (seccomp_fast.c grant_bind): what handlers.on_bind records for the
        getsockname of the host socket and of the sockets accepted from it: the app's sockaddr as
        judged, with the host port where it asked for port 0. Taken before any later notification of
        the target is handed back (the C loop's ring is in order, and so is a serve batch)."""
        _fam, host_addr, host_port = K.decode_sockaddr(ctypes.string_at(ctypes.addressof(out) + _HOST, out.hostlen))
        view = raw if raw[2:4] != b"\0\0" else K.with_port(raw, host_port)  # (the port, network order)
        t.bound(out.host_ino, (host_addr, host_port), view)
        self.stats["grafted_bind"] += 1
        self.stats["fast_bind"] += 1

    def _audit(self, t, c: Compiled, out: Out, raw: bytes) -> None:
        """The decision the C carried out, as the engine states it."""
        verb = "bind" if out.nr == K.SYS["bind"] else "connect"
        v6only = verb == "bind" and bool(out.v6only)
        row = out.row if out.decided == GRANT else -1
        _fam, addr, port = K.decode_sockaddr(raw)
        d = self._decision(c, verb, row, out.family, out.type, out.proto, v6only, raw)
        self.audit.decision(t.key, MODE, verb, d, pid=out.pid, addr=addr, port=port)

    @staticmethod
    def _decision(c: Compiled, verb: str, row: int, family: int, type_: int, proto: int, v6only: bool, raw: bytes):
        """The engine's Decision of what C did with a `verb` of this socket kind to sockaddr `raw`
        (row >= 0: granted by that rule; -1: local), asked once per rule and kind."""
        key = (verb, row, family, type_, proto, v6only)
        d = c.decisions.get(key)
        if d is None:
            _fam, addr, port = K.decode_sockaddr(raw)
            d = c.policy.decide(Op(verb, family, addr, port, type_, proto, v6only=v6only))
            expected = "grant" if row >= 0 else "local"
            if d.verdict != expected:  # never: the property test holds C and engine equal
                print(f"graft: seccomp fast path: C said {expected}, the engine {d.verdict} ({d.reason})",
                      file=sys.stderr)
            c.decisions[key] = d
        return d
