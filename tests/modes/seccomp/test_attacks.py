"""Attacks and failures: TOCTOU flips, signal storms, connect storms, dying targets and supervisor."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import graft_cmd
from tests.modes.seccomp.util import client_egress, fd_targets, run, run_args, wait_for

def no_pools() -> dict:
    """The environment now (GRAFT_STATE_DIR of the state_dir fixture included) with pools off: the
    connect path that does not hand over pooled sockets."""
    return dict(os.environ, GRAFT_POOLS="0")


class Counter:
    """Host loopback listeners counting accepted connections (each closed at once)."""

    def __init__(self):
        self.counts: dict[tuple, int] = {}
        self.socks: list[socket.socket] = []
        self._stop = False

    def listen(self, addr: str, backlog: int = 4096) -> int:
        assert addr.startswith("127.")
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 0))
        s.listen(backlog)
        s.settimeout(0.2)
        key = s.getsockname()
        self.counts[key] = 0
        self.socks.append(s)
        threading.Thread(target=self._serve, args=(s, key), daemon=True).start()
        return key[1]

    def _serve(self, s: socket.socket, key) -> None:
        while not self._stop:
            try:
                c, _ = s.accept()
            except (socket.timeout, OSError):
                continue
            self.counts[key] += 1
            c.close()

    def close(self) -> None:
        self._stop = True
        time.sleep(0.3)
        for s in self.socks:
            s.close()


@pytest.fixture
def counter():
    c = Counter()
    yield c
    c.close()


def test_toctou_flip_never_reaches_forbidden(state_dir, ns, counter, cprog):
    attack = cprog("toctou")
    granted = counter.listen("127.0.0.1")
    forbidden = counter.listen("127.0.0.2")
    # control: without grafting (host netns, no filter) the flip reaches the forbidden listener
    for _ in range(5):  # (on a loaded machine the flipper may not run during a short loop)
        subprocess.run([attack, "127.0.0.1", str(granted), "127.0.0.2", str(forbidden), "2000"], check=True,
                       capture_output=True, timeout=60)
        time.sleep(0.3)
        if counter.counts[("127.0.0.2", forbidden)] > 0:
            break
    assert counter.counts[("127.0.0.2", forbidden)] > 0
    counter.counts[("127.0.0.2", forbidden)] = 0
    counter.counts[("127.0.0.1", granted)] = 0
    r = run(ns, [attack, "127.0.0.1", str(granted), "127.0.0.2", str(forbidden), "1500"],
            endpoints=["out type ipv4 addr 127.0.0.1 port dynamic"], egress=["127.0.0.1/32=out"])
    ok, refused = int(r.stdout.split()[1]), int(r.stdout.split()[3])
    assert refused > 0, r.stdout  # the flip was live: some connects were judged at the forbidden address
    time.sleep(0.5)
    assert counter.counts[("127.0.0.2", forbidden)] == 0, r.stdout
    assert ok > 0 and counter.counts[("127.0.0.1", granted)] == ok, (r.stdout, counter.counts)


@pytest.mark.parametrize("restart", [1, 0])
def test_signal_storm(state_dir, ns, counter, cprog, restart):
    storm = cprog("storm")
    port = counter.listen("127.0.0.1")
    p = subprocess.Popen([*graft_cmd(), *run_args(ns, [storm, str(port), "4", "150", str(restart)],
                          endpoints=["eph type ipv4 addr 127.0.0.1 port dynamic", "out type ipv4 addr 127.0.0.1 port dynamic"],
                          ingress=["0.0.0.0:7000=eph"], egress=["127.0.0.1/32=out"])],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=no_pools())  # the supervisor's fds are counted: no pooled sockets among them
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # let graft run finish starting (Popen's own pipes)
        sup_fds = fd_targets(p.pid)  # the supervisor lives in the graft run process
        p.stdin.write("\n")
        p.stdin.flush()
        f = p.stdout.readline().split()
        res = dict(zip(f[::2], map(int, f[1::2])))
        assert res["ops"] == 4 * 150 * 4 and res["fail"] == 0, (res, p.stderr)
        assert res["fds_before"] == res["fds_after"], res
        if restart:
            assert res["eintr"] == 0, res  # SA_RESTART: interrupted trapped calls restart cleanly
        assert res["handled"] > 0
        time.sleep(1.5)
        after = fd_targets(p.pid)
        assert after == sup_fds, (sorted(set(after) - set(sup_fds)), sorted(set(sup_fds) - set(after)))
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


STORM_CLIENT = """
import socket, sys, threading
port, threads, n = map(int, sys.argv[1:4])
errors = []
def work():
    for _ in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.recv(1)
        except OSError as e:
            errors.append(e)
ts = [threading.Thread(target=work) for _ in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print("errors", len(errors), errors[:3])
"""


def test_threaded_connect_storm_two_containers(state_dir, make_netns, counter):
    port = counter.listen("127.0.0.1")
    a, b = make_netns(), make_netns()
    procs = [subprocess.Popen([*graft_cmd(), *run_args(name, [sys.executable, "-c", STORM_CLIENT, str(port), "8", "40"],
                                                       **client_egress())], stdout=subprocess.PIPE, text=True)
             for name in (a, b)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(o.startswith("errors 0") for o in outs), outs
    wait_for(lambda: counter.counts[("127.0.0.1", port)] == 2 * 8 * 40, what="all connections counted")


KILLER = """
import os, random, signal, socket, sys, time
full_port, port = int(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True); sys.stdin.readline()
# 1. a blocking connect left pending in the supervisor (the host's accept queue is full), then killed
pid = os.fork()
if pid == 0:
    s = socket.socket(); s.connect(("127.0.0.1", full_port)); os._exit(0)
time.sleep(0.5); os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
# 1b. the same with a local blocking connect (performed by a pool worker of the supervisor)
local = socket.socket(); local.bind(("127.0.0.9", 0)); local.listen(0)
fill = [socket.socket() for _ in range(3)]
for f in fill:
    f.setblocking(False); f.connect_ex(local.getsockname())
pid = os.fork()
if pid == 0:
    s = socket.socket(); s.connect(local.getsockname()); os._exit(0)
time.sleep(0.5); os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
# 2. children killed at random moments while they bind/connect in a loop
for i in range(25):
    pid = os.fork()
    if pid == 0:
        while True:
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", 7000)); s.close()
            s = socket.create_connection(("127.0.0.1", port)); s.close()
    time.sleep(random.uniform(0.001, 0.03)); os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
print("killed", flush=True); sys.stdin.readline()
s = socket.create_connection(("127.0.0.1", port), timeout=5); s.close()
print("still served", flush=True)
"""


def test_targets_killed_mid_notification(state_dir, ns, counter):
    port = counter.listen("127.0.0.1")
    # a listener whose accept queue is full: further SYNs are dropped, connects stay pending
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    full_port = full.getsockname()[1]
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", full_port))
        fillers.append(f)
    p = subprocess.Popen([*graft_cmd(), *run_args(ns, [sys.executable, "-c", KILLER, str(full_port), str(port)],
                          endpoints=["eph type ipv4 addr 127.0.0.1 port dynamic", "out type ipv4 addr 127.0.0.1 port dynamic"],
                          ingress=["0.0.0.0:7000=eph"], egress=["127.0.0.1/32=out"])],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=no_pools())  # blocking connects parked by the supervisor, not the kernel's own
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        base = fd_targets(p.pid)
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "killed"
        # pending host sockets of dead targets are closed by the sweep (1 s): back to the baseline
        wait_for(lambda: fd_targets(p.pid) == base, timeout=5, what="supervisor fds back to baseline")
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "still served"
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for f in fillers:
            f.close()
        full.close()


DOOMED = """
import errno, os, socket, sys, time
print(os.getpid(), flush=True)
deadline = time.monotonic() + 60  # an orphan by design: it must end by itself
while not os.path.exists(sys.argv[1]):
    if time.monotonic() > deadline: sys.exit(1)
    time.sleep(0.05)
s = socket.socket()
try:
    s.bind(("0.0.0.0", 7000)); print("bound", flush=True)
except OSError as e:
    print(errno.errorcode[e.errno], flush=True)
"""


def test_supervisor_killed_syscalls_fail(state_dir, ns, tmp_path):
    go = str(tmp_path / "go")
    p = subprocess.Popen([*graft_cmd(), *run_args(ns, [sys.executable, "-c", DOOMED, go],
                          endpoints=["eph type ipv4 addr 127.0.0.1 port dynamic"], ingress=["0.0.0.0:7000=eph"])],
                         stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    try:
        p.kill()  # the supervisor (in graft run) dies; the container process lives on
        p.wait(10)
        open(go, "w").close()
        line = []
        t = threading.Thread(target=lambda: line.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(10)
        assert line and line[0].strip() == "ENOSYS", line  # fails at once, does not hang
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


NOT_STALLED = r"""
import socket, sys, threading, time
full_port, port = int(sys.argv[1]), int(sys.argv[2])
state = {}
def stuck():
    s = socket.socket(); t = time.monotonic()
    try:
        s.connect(("127.0.0.1", full_port)); state["stuck"] = "connected"
    except OSError as e:
        state["stuck"] = repr(e)
    state["stuck_s"] = time.monotonic() - t
threading.Thread(target=stuck, daemon=True).start()
time.sleep(0.3)
t = time.monotonic()
for _ in range(30):
    c = socket.create_connection(("127.0.0.1", port), timeout=5); c.close()
print("others", round(time.monotonic() - t, 2), "stuck still waiting", "stuck" not in state, flush=True)
"""


def test_blocking_connect_does_not_stall_others(state_dir, ns, counter):
    port = counter.listen("127.0.0.1")
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = [socket.socket() for _ in range(3)]
    for f in fillers:
        f.setblocking(False)
        f.connect_ex(full.getsockname())
    try:
        r = run(ns, [sys.executable, "-c", NOT_STALLED, str(full.getsockname()[1]), str(port)], **client_egress())
        words = r.stdout.split()
        assert words[0] == "others" and float(words[1]) < 5 and words[-1] == "True", r.stdout
    finally:
        for f in fillers:
            f.close()
        full.close()


BIND_FLIP = r"""
import ctypes, errno, json, socket, struct, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
pair_port, n = int(sys.argv[1]), int(sys.argv[2])
def sin(addr, port):
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(addr) + bytes(8)
local, pair = sin("127.0.0.5", 0), sin("127.0.0.1", pair_port)  # no pair takes 127.0.0.5: the C's CONTINUE
buf = ctypes.create_string_buffer(local, 16)
stop = False
def flip():
    while not stop:
        ctypes.memmove(buf, pair, 16)
        ctypes.memmove(buf, local, 16)
threading.Thread(target=flip, daemon=True).start()
with socket.socket() as probe:
    mine = probe.getsockopt(socket.SOL_SOCKET, 71, 8)  # SO_NETNS_COOKIE of the container's netns
out = {"host": 0, "native": 0, "native at the pair": 0, "failed": 0, "host elsewhere": 0}
for _ in range(n):
    s = socket.socket()
    r = libc.bind(s.fileno(), buf, 16)
    if r != 0:
        out["failed"] += 1
    elif s.getsockopt(socket.SOL_SOCKET, 71, 8) != mine:  # a host socket: granted onto the endpoint
        out["host"] += 1
        if s.getsockname() != ("127.0.0.1", pair_port):
            out["host elsewhere"] += 1
    else:
        out["native"] += 1
        out["native at the pair"] += s.getsockname()[1] == pair_port
    s.close()
stop = True
print(json.dumps(out), flush=True)
"""


def test_bind_flip_never_gets_a_host_socket_by_continue(state_dir, ns):
    """A bind that no ingress pair takes is answered CONTINUE from the sockaddr alone (pools on:
    seccomp_fast.c serve_unopened). A thread flipping that sockaddr to a pair's address after the
    read gets the kernel's bind of its own socket, in its own netns: never a host socket. Host
    sockets come only from grants (bound to the endpoint, showing the pair's address)."""
    from tests.modes.seccomp.test_fast import _free_ports

    host_port = _free_ports(1)[0]
    r = run(ns, [sys.executable, "-c", BIND_FLIP, "8080", "3000"],
            endpoints=[f"web type ipv4 addr 127.0.0.1 port {host_port}"], ingress=["127.0.0.1:8080=web"])
    import json
    out = json.loads(r.stdout)
    assert out["host elsewhere"] == 0, out
    # none failed: not even EADDRINUSE from a duplicate of the last host socket still open in the
    # supervisor while the C grants the next bind (the getsockname handler closes its own first)
    assert out["host"] + out["native"] == 3000 and out["failed"] == 0, out
    assert out["host"] > 0 and out["native"] > 0, out  # both addresses were read: the flip was live
