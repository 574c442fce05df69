"""The seccomp supervisor's wait-and-serve loop in C (fast.Loop, csrc/seccomp_fast.c gs_loop_*).

A supervisor in this process with its C loop thread; containers are child processes in a netns of
their own, each under its own seccomp filter, driven line by line (a connect, a sendto, a burst of
connects), so that listeners come and go, the policy changes and the supervisor stops while the C
thread serves. In the container's netns 127.0.0.1 is its own `lo`: a connect to the host's
listener there succeeds only if grafted.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from sockgraft.core.endpoint import parse_endpoint
from sockgraft.core.rules import parse_egress
from sockgraft.host import netns
from sockgraft.host.store import Store
from sockgraft.modes.seccomp import fastlib as FL
from sockgraft.modes.seccomp import native as N
from sockgraft.modes.seccomp.supervisor import Supervisor

CHILD = r"""
import array, errno, json, os, socket, sys
from sockgraft.modes.seccomp.attach import install_in_child
from sockgraft.modes.seccomp.bpf import filter_program
c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])
fd = install_in_child(filter_program().assemble())
c.sendmsg([b"listener"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
os.close(fd); c.recv(1); c.close()
def name(e): return errno.errorcode.get(e, str(e)) if e else "ok"
def connect(port, bind=False):
    s = socket.socket()
    try:
        if bind: s.bind(("127.0.0.1", 0))
        return name(s.connect_ex(("127.0.0.1", port)))
    finally:
        s.close()
for line in sys.stdin:
    cmd, *a = line.split()
    if cmd == "connect":
        out = connect(int(a[0]))
    elif cmd == "burst":  # n connects; "mixed": a bound one (handed back to Python) every 7th
        outs = [connect(int(a[0]), bind=(i % 7 == 6) and a[2] == "mixed") for i in range(int(a[1]))]
        out = {k: outs.count(k) for k in set(outs)}
    elif cmd == "forever":  # until the supervisor goes: every answer after that is ENOSYS
        print(json.dumps("started"), flush=True)
        while True:
            try:
                connect(int(a[0]), bind=True); connect(int(a[0]))
            except OSError:
                pass
    elif cmd == "sendto":
        s = socket.create_connection(("127.0.0.1", int(a[0])))
        sent = [s.sendto(b"x" * 10, ("192.0.2.9", 9)) for _ in range(int(a[1]))]
        s.close()
        out = sum(sent)
    elif cmd == "exit":
        break
    print(json.dumps(out), flush=True)
"""


class Server:
    """A host listener on 127.0.0.1 that accepts, counts bytes received, and closes."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(c,), daemon=True).start()

    def _read(self, c: socket.socket) -> None:
        with c:
            while True:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                self.received += len(data)

    def close(self) -> None:
        self.sock.close()


class Child:
    """A container process under its own filter, its listener given to `sup` (key `key`)."""

    def __init__(self, sup: Supervisor, ns: str, key: str, tmp_path):
        path = str(tmp_path / f"l{os.getpid()}-{id(self)}.sock")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen()
        srv.settimeout(30)
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", CHILD, path],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            conn, _ = srv.accept()
            _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 1)
            sup.add_listener(fds[0], key, self.p.pid)
            conn.send(b"g")
            conn.close()
        finally:
            srv.close()
            os.unlink(path)

    def ask(self, line: str):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        out = self.p.stdout.readline()
        assert out, f"the child died on {line!r}"
        return json.loads(out)

    def exit(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("exit\n")
                self.p.stdin.flush()
            except BrokenPipeError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.p.stdin.close()
        self.p.stdout.close()


def _install(state_dir: str, key: str, ns: str, egress: list[str]) -> None:
    with Store(state_dir) as store:
        store.install(key, netns.by_name(ns).ino, "seccomp",
                      [parse_endpoint("out type ipv4 addr 127.0.0.1 port dynamic")], [],
                      [parse_egress(e) for e in egress], fresh=True)


def _wait(cond, what, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what if isinstance(what, str) else (sorted(what.values()), sorted(_fds().values()))
        time.sleep(0.02)


def _fd_names() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def _fds() -> dict[str, str]:
    """This process's open fds and what they are (not the listing's own)."""
    return _fd_names()


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setenv(FL.ENV, "1")
    monkeypatch.setenv(N.LOOP_ENV, "1")
    FL.load()  # installed by scripts/setup: a missing library is a failure here


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _supervisor(state_dir: str) -> Supervisor:
    sup = Supervisor(state_dir)
    sup.start_thread()
    _wait(lambda: sup.fast is not None and sup.fast.loop is not None and sup.fast.loop.thread is not None,
          "the C loop thread started")
    return sup


def test_listeners_added_and_removed_while_the_c_loop_runs(native, state_dir, make_netns, server, tmp_path):
    ns_a, ns_b = make_netns(), make_netns()
    _install(state_dir, ns_a, ns_a, ["127.0.0.0/8=out"])
    _install(state_dir, ns_b, ns_b, ["127.0.0.0/8=out"])
    sup = _supervisor(state_dir)
    a = b = None
    try:
        a = Child(sup, ns_a, ns_a, tmp_path)
        assert a.ask(f"connect {server.port}") == "ok"
        b = Child(sup, ns_b, ns_b, tmp_path)  # added while the C thread serves a
        assert b.ask(f"connect {server.port}") == "ok"
        assert a.ask(f"connect {server.port}") == "ok"
        assert sup.active_keys() == {ns_a: 1, ns_b: 1}
        # (the C serves a listener as soon as it has it: the loop thread notes its slot just after)
        _wait(lambda: sorted(t.key for t in sup.fast.slots.values()) == sorted([ns_a, ns_b]), "two slots")
        a.exit()  # its listener hangs up: the C loop drops it, the supervisor closes it
        _wait(lambda: sup.active_keys() == {ns_b: 1} and len(sup.fast.slots) == 1, "a's listener removed")
        assert b.ask(f"burst {server.port} 50 plain") == {"ok": 50}
        c = Child(sup, ns_a, ns_a, tmp_path)  # a new listener in a's slot
        try:
            assert c.ask(f"connect {server.port}") == "ok"
        finally:
            c.exit()
        assert sup.stats["fast_loop"] == 1 and sup.stats["fast_grant"] >= 54, sup.stats
        assert "fast_batched" not in sup.stats, sup.stats  # nothing went through gs_serve_batch
    finally:
        for ch in (a, b):
            if ch is not None:
                ch.exit()
        sup.close()


def test_a_table_change_takes_effect_for_the_next_connect(native, state_dir, ns, server, tmp_path):
    """No wait between the write and the connect: the C sees the database's version change and
    hands the connect back to the engine (`fast_stale`), then serves from the new table."""
    _install(state_dir, ns, ns, ["127.0.0.0/8=out"])
    sup = _supervisor(state_dir)
    child = None
    try:
        child = Child(sup, ns, ns, tmp_path)
        assert child.ask(f"connect {server.port}") == "ok"
        with Store(state_dir) as store:
            for i in range(3):
                store.set_rules(ns, [], [])  # no rule: the container's own lo, nobody listens there
                assert child.ask(f"connect {server.port}") == "ECONNREFUSED", i
                store.set_rules(ns, [], [parse_egress("127.0.0.0/8=out")])
                assert child.ask(f"connect {server.port}") == "ok", i
        assert sup.stats["fast_stale"] >= 2, sup.stats
        # once the tables are compiled again, the C serves (no hand-back)
        before = sup.stats["fast_handback"]
        _wait(lambda: sup.fast.version == sup.fast.loop.version(), "the tables checked again")
        time.sleep(0.1)
        assert child.ask(f"burst {server.port} 20 plain") == {"ok": 20}
        assert sup.stats["fast_handback"] == before, sup.stats
        # a commit about another container: the same table is marked current, not compiled again
        tables = sup.stats["fast_tables"]
        with Store(state_dir) as store:
            store.register("someone-else", None, "seccomp")
        _wait(lambda: sup.fast.version == sup.fast.loop.version(), "the tables checked again")
        time.sleep(0.1)
        assert child.ask(f"burst {server.port} 20 plain") == {"ok": 20}
        assert sup.stats["fast_tables"] == tables and sup.stats["fast_handback"] == before, sup.stats
    finally:
        if child is not None:
            child.exit()
        sup.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="pools need the bind guard and the kernel's egress table (root)")
def test_pools_are_refilled_while_the_c_loop_takes_from_them(native, state_dir, ns, server, tmp_path):
    _install(state_dir, ns, ns, ["127.0.0.0/8=out"])
    sup = _supervisor(state_dir)
    child = None
    try:
        child = Child(sup, ns, ns, tmp_path)
        _wait(lambda: any(c.pools is not None for c in sup.fast.compiled.values()), "pools made")
        n = 20 * FL.POOL
        assert child.ask(f"burst {server.port} {n} plain") == {"ok": n}
        _wait(lambda: sup.stats["fast_grant"] >= n, "the records taken")
        # many more pooled connects than one pool holds: filled again while the C took from them
        assert sup.stats["fast_pooled"] > 4 * FL.POOL, sup.stats
        c = next(iter(sup.fast.compiled.values()))
        _wait(lambda: max(p.n for p in c.pools) >= FL.POOL_LOW, "the pool topped up")
    finally:
        if child is not None:
            child.exit()
        sup.close()


def test_stop_with_calls_in_flight_neither_hangs_nor_leaks(native, state_dir, ns, server, tmp_path):
    """stop_receiving (graftd's drain) then close, while the container traps without a pause:
    neither waits, and the supervisor holds no fd afterwards (pidfd cache, pools, parked sockets,
    the loop's eventfds and WAL index)."""
    _install(state_dir, ns, ns, ["127.0.0.0/8=out"])
    before = _fds()
    sup = _supervisor(state_dir)
    child = None
    try:
        child = Child(sup, ns, ns, tmp_path)
        # a socket bound in the container first stays there (its own lo: refused)
        assert child.ask(f"burst {server.port} 30 mixed") == {"ok": 26, "ECONNREFUSED": 4}
        assert child.ask(f"forever {server.port}") == "started"  # C grants and Python hand-backs
        _wait(lambda: sup.stats["fast_handback"] > 20 and sup.stats["fast_grant"] > 50, "calls served")
        t0 = time.monotonic()
        sup.stop_receiving()  # graftd's drain: the C receives no more, what it handed over is served
        assert time.monotonic() - t0 < 5, "stop_receiving waited"
        assert sup.fast.loop.thread is None
        served = sup.stats["notifications"]
        time.sleep(0.3)
        assert sup.stats["notifications"] == served  # nothing received since
        t0 = time.monotonic()
        sup.close()
        assert time.monotonic() - t0 < 5, "close waited"
        assert sup.fast.loop is None
    finally:
        if child is not None:
            child.p.kill()
            child.exit()
    # as many as before (the numbers may differ: the test's server accepts meanwhile)
    _wait(lambda: len(_fds()) <= len(before), before)


def test_sendto_on_a_connected_tcp_socket_is_continued_in_c(native, state_dir, ns, server, tmp_path):
    """sendto with a destination on a TCP socket: the kernel ignores the address; the C answers
    CONTINUE (no record, no Python) and the bytes arrive."""
    _install(state_dir, ns, ns, ["127.0.0.0/8=out"])
    sup = _supervisor(state_dir)
    child = None
    try:
        child = Child(sup, ns, ns, tmp_path)
        assert child.ask(f"sendto {server.port} 100") == 1000
        _wait(lambda: server.received == 1000, "the bytes arrived")
        handbacks = sup.stats["fast_handback"]
        _wait(lambda: sup.stats["fast_continue"] >= 100, "counted")
        assert sup.stats["fast_handback"] == handbacks
    finally:
        if child is not None:
            child.exit()
        sup.close()
