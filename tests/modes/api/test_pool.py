"""Pooled host sockets in api mode (modes/api/pool.py): create_connection(source=) / connect_from take
a host socket the fd service made ahead (bound to the endpoint with NO_PORT, marked, NOT connected)
and run the kernel's connect() on it. The attack comes first: such a socket, taken by the program
itself, reaches only what the container's egress rules name and cannot be bound elsewhere."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from sockgraft.core.protocol import MAX_POOL
from sockgraft.core.tables import MARK_MASK, MARK_TAG, UNBOUND_TAG
from sockgraft.modes.api import pool
from tests.helpers import free_port, graft_cmd, stop
from tests.modes.preload.test_connect import acceptor, blackhole  # noqa: F401  (fixtures)

PY = sys.executable
OUT = ["--endpoint", "ep-out type ipv4 addr 127.0.0.2 port dynamic", "--egress", "127.0.0.1/32=ep-out"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="pools need the bind guard and the egress table (root)")

CASES = r'''
import errno, json, os, socket, sys, threading, time
import sockgraft
from sockgraft.modes.api import pool

case, args = sys.argv[1], sys.argv[2:]
out = {}


def outcome(fn):
    try:
        fn()
        return "0"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__


def dial(port, host="127.0.0.1", **kw):
    return sockgraft.create_connection((host, port), source="ep-out", **kw)


if case == "attack":
    port, unlisted = int(args[0]), int(args[1])
    # the program takes pooled sockets itself (what a hostile program in the container can do)
    fd, family = pool.take("ep-out", ("127.0.0.1", port), socket.SOCK_STREAM)
    s = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    out["unconnected"] = list(s.getsockname())
    out["mark"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    s.settimeout(5)
    out["unlisted"] = outcome(lambda: s.connect(("127.0.0.3", unlisted)))
    out["rebind after"] = outcome(lambda: s.bind(("127.0.0.1", 0)))
    s.close()
    t, family = pool.take("ep-out", ("127.0.0.1", port), socket.SOCK_STREAM)
    t = socket.socket(family, socket.SOCK_STREAM, 0, t)
    out["rebind"] = [outcome(lambda: t.bind(a)) for a in (("127.0.0.3", unlisted), ("127.0.0.1", 0), ("0.0.0.0", 0))]
    t.setsockopt(socket.IPPROTO_IP, 24, 0)  # IP_BIND_ADDRESS_NO_PORT off: a bind now would take a port
    out["rebind no_port off"] = outcome(lambda: t.bind(("127.0.0.2", 0)))
    out["listed"] = outcome(lambda: t.connect(("127.0.0.1", port)))
    t.close()
    # and through the API: a pooled socket, refused by the kernel
    taken = pool.stats["taken"]
    out["api unlisted"] = outcome(lambda: dial(unlisted, "127.0.0.3", timeout=5))
    out["api pooled"] = pool.stats["taken"] > taken
elif case == "batch":
    port, n = int(args[0]), int(args[1])
    sources, marks, errors = set(), set(), 0
    for _ in range(n):
        try:
            c = dial(port)
        except OSError:
            errors += 1
            continue
        sources.add(c.getsockname()[0])
        marks.add(c.getsockopt(socket.SOL_SOCKET, socket.SO_MARK))
        c.close()
    out = {"errors": errors, "sources": sorted(sources), "marks": sorted(marks), "held": pool.held(), **pool.stats}
elif case == "semantics":
    port, refused, hole = int(args[0]), int(args[1]), args[2]
    def nonblocking():
        s = sockgraft.socket()
        s.setblocking(False)
        try:
            s.connect_from("ep-out", ("127.0.0.1", port))
        except BlockingIOError as e:
            out["nonblocking"] = errno.errorcode[e.errno]
            import select
            select.select([], [s], [], 5)
            out["nonblocking done"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            out["nonblocking peer"] = s.getpeername()[1] == port
        s.close()
    nonblocking()
    out["refused"] = outcome(lambda: dial(refused))
    t0 = time.monotonic()
    out["timeout"] = outcome(lambda: sockgraft.create_connection((hole, 80), timeout=0.5, source="ep-bh"))
    out["timeout took"] = round(time.monotonic() - t0, 1)
    s = dial(port)
    out["rebind"] = outcome(lambda: s.bind(("127.0.0.1", 0)))
    out["reaim"] = outcome(lambda: s.connect(("127.0.0.1", refused)))
    s.close()
    import asyncio
    async def main():
        r, w = await sockgraft.open_connection("127.0.0.1", port, source="ep-out")
        peer = w.get_extra_info("peername")[1]
        w.close()
        return peer
    out["asyncio"] = asyncio.run(main()) == port
    out["pooled"] = pool.stats["taken"]
elif case == "options":
    port = int(args[0])
    s = sockgraft.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.settimeout(3)
    taken = pool.stats["taken"]
    s.connect_from("ep-out", ("127.0.0.1", port))
    out = {"pooled": pool.stats["taken"] == taken + 1, "timeout": s.gettimeout(),
           "keepalive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
           "nodelay": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
           "rcvbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), "source": s.getsockname()[0]}
elif case == "fork":
    port = int(args[0])
    dial(port).close()
    parents = [fd for (fd, _ino) in sum(pool._s.pools.values(), [])]
    out["parent held"] = len(parents)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        closed = sum(1 for fd in parents if outcome(lambda: os.fstat(fd)) == "EBADF")
        fetches = pool.stats["fetches"]
        ok = 0
        for _ in range(3):
            dial(port).close()
            ok += 1
        os.write(w, json.dumps({"closed": closed, "ok": ok, "fetched": pool.stats["fetches"] > fetches}).encode())
        os._exit(0)
    os.close(w)
    child = json.loads(os.read(r, 4096))
    os.waitpid(pid, 0)
    out["child"] = child
    out["parent's still open"] = all(outcome(lambda: os.fstat(fd)) == "0" for fd in parents)
    taken = pool.stats["taken"]
    dial(port).close()
    out["parent pooled"] = pool.stats["taken"] == taken + 1
elif case == "closed":
    port = int(args[0])
    dial(port).close()
    pooled = [fd for (fd, _ino) in sum(pool._s.pools.values(), [])]
    for fd in pooled:
        os.close(fd)  # behind the pool's back (closefrom, a dup2 onto them...)
    others = [os.open("/dev/null", os.O_RDONLY) for _ in pooled]  # the numbers come back, not sockets
    errors = 0
    for _ in range(20):
        try:
            dial(port).close()
        except OSError:
            errors += 1
    out = {"errors": errors, "others intact": all(os.path.samefile(f"/proc/self/fd/{fd}", "/dev/null") for fd in others)}
elif case == "threads":
    port, n, per = int(args[0]), int(args[1]), int(args[2])
    errors, ports, lock = [], [], threading.Lock()
    def work():
        mine = []
        for _ in range(per):
            try:
                mine.append(dial(port))
            except OSError as e:
                errors.append(e.errno)
        with lock:
            ports.extend(c.getsockname()[1] for c in mine)
        for c in mine:
            c.close()
    ts = [threading.Thread(target=work) for _ in range(n)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    out = {"errors": errors, "distinct": len(set(ports)), "made": len(ports), "taken": pool.stats["taken"],
           "held": pool.held()}
elif case == "leaks":
    port = int(args[0])
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(40):
        dial(port).close()
    during = len(os.listdir("/proc/self/fd"))
    pool.clear()
    out = {"before": len(before), "during": during, "after": len(os.listdir("/proc/self/fd")),
           "same": sorted(os.listdir("/proc/self/fd")) == before}
elif case == "bind-attack":
    # the program takes unbound pooled sockets itself and aims them elsewhere
    port, other = int(args[0]), int(args[1])
    def taken():
        got = pool.take_unbound("ep-web", 0, socket.SOCK_STREAM) or pool.take_unbound("ep-web", 0, socket.SOCK_STREAM)
        return socket.socket(got[1], socket.SOCK_STREAM, 0, got[0]), got[2]  # (the first of a key is not pooled)
    s, host = taken()
    out["host"] = list(host)
    out["unbound mark"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    out["other port"] = outcome(lambda: s.bind(("127.0.0.1", other)))
    out["other address"] = outcome(lambda: s.bind(("127.0.0.2", port)))
    out["wildcard"] = outcome(lambda: s.bind(("0.0.0.0", port)))
    out["unbound connect"] = outcome(lambda: (s.settimeout(5), s.connect(("127.0.0.1", other))))
    s.close()
    s, _ = taken()
    s.listen()
    out["unbound listen port"] = s.getsockname()[1]
    c = socket.socket()
    c.settimeout(5)
    out["served"] = outcome(lambda: c.connect(("127.0.0.1", out["unbound listen port"])))
    c.close()
    s.close()
    s, _ = taken()
    out["own endpoint"] = outcome(lambda: s.bind(tuple(host)))
    out["bound mark"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    s.close()
elif case == "bind":
    # binds by name: pooled (no round trip), the program's options kept, a port in use refused
    # as natively, the socket serving the host
    port = int(args[0])
    taken = pool.stats["taken"]
    for _ in range(40):
        s = sockgraft.socket(sockgraft.AF_GRAFT, socket.SOCK_STREAM)
        s.bind("ep-web")
        s.close()
    out["pooled"] = pool.stats["taken"] - taken
    take_unbound, given = pool.take_unbound, []
    pool.take_unbound = lambda *a: given.append(take_unbound(*a)) or given[-1]
    s = sockgraft.socket(sockgraft.AF_GRAFT, socket.SOCK_STREAM)
    s.bind("ep-web")  # no placeholder made: the pooled socket itself, under its own number
    out["in place"] = [s.fileno() == given[-1][0], type(s).__name__, s.endpoint]
    pool.take_unbound = take_unbound
    s.close()
    s = sockgraft.socket(sockgraft.AF_GRAFT, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind("ep-web")
    out["name"] = list(s.getsockname())
    out["reuseaddr"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    out["mark"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    s.listen()
    t = sockgraft.socket(sockgraft.AF_GRAFT, socket.SOCK_STREAM)
    out["second"] = outcome(lambda: t.bind("ep-web"))
    out["second is a placeholder"] = t.endpoint is None and t.family == socket.AF_INET
    t.close()
    six = sockgraft.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    six.bind("ep-web")
    out["v4-mapped"] = list(six.getsockname()[:2])
    six.close()
    print(json.dumps({"ready": True}), flush=True)
    conn, _ = s.accept()
    conn.sendall(conn.recv(10))
    conn.close()
elif case == "table":
    port = int(args[0])
    c = dial(port)
    out["before"] = c.getsockname()[0]
    c.close()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    t0, sources = time.monotonic(), []
    while time.monotonic() - t0 < 4:
        c = dial(port)
        sources.append(c.getsockname()[0])
        c.close()
        time.sleep(0.01)
    first = sources.index("127.0.0.3") if "127.0.0.3" in sources else None
    out["after"] = sources[-1]
    out["flapped"] = first is None or any(s != "127.0.0.3" for s in sources[first:])
    out["changed within"] = None if first is None else round(first * (4 / len(sources)), 1)
print(json.dumps(out), flush=True)
'''


@pytest.fixture
def cases(tmp_path) -> str:
    path = tmp_path / "pool_cases.py"
    path.write_text(textwrap.dedent(CASES))
    return str(path)


def run(ns, cases, case, *args, extra=(), env=None, **kw) -> dict:
    p = subprocess.run([*graft_cmd(), "run", "-n", ns, *OUT, *extra, "--", PY, cases, case, *map(str, args)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})), **kw)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


def test_a_pooled_socket_reaches_only_listed_destinations_and_cannot_be_rebound(state_dir, ns, cases, acceptor):
    """The attack: the program takes pooled sockets itself. Connecting one to a destination no
    egress rule names is refused by the kernel (and nothing arrives there); binding one anywhere
    is EPERM (the bind guard), before a connect and after a refused one; the listed destination
    works. The API's own path is refused the same way."""
    with socket.socket() as unlisted:  # a listener where no rule points: it must see nothing
        unlisted.bind(("127.0.0.3", 0))
        unlisted.listen(16)
        got = run(ns, cases, "attack", acceptor, unlisted.getsockname()[1])
        unlisted.setblocking(False)
        with pytest.raises(BlockingIOError):
            unlisted.accept()
    assert got["unconnected"] == ["127.0.0.2", 0] and got["mark"] & MARK_MASK == MARK_TAG
    assert got["unlisted"] in ("ECONNREFUSED", "EPERM"), got
    assert got["rebind after"] == "EPERM"
    assert got["rebind"] == ["EPERM", "EPERM", "EPERM"] and got["rebind no_port off"] == "EPERM"
    assert got["listed"] == "0"
    assert got["api unlisted"] in ("ECONNREFUSED", "EPERM") and got["api pooled"] is True


def test_connects_draw_on_pools_fetched_in_batches(state_dir, ns, cases, acceptor):
    got = run(ns, cases, "batch", acceptor, 40)
    assert got["errors"] == 0 and got["sources"] == ["127.0.0.2"]
    assert len(got["marks"]) == 1 and got["marks"][0] & MARK_MASK == MARK_TAG
    assert got["taken"] == 40 and got["off"] == 0
    # MAX_POOL at a time, the next batch asked for before the pool is empty
    batches = -(-40 // MAX_POOL)
    assert batches <= got["fetches"] <= batches + 1, got
    assert got["held"] <= pool.MAX_HELD


def test_without_pools_the_service_connects(state_dir, ns, cases, acceptor):
    got = run(ns, cases, "batch", acceptor, 10, env={"GRAFT_POOLS": "0"})
    assert got["errors"] == 0 and got["sources"] == ["127.0.0.2"]
    # one `pool` request, refused (EOPNOTSUPP); the service is asked to connect each one, a second long
    assert got["taken"] == 0 and got["fetches"] == 0 and got["refused"] == 1 and got["off"] == 9, got


def test_semantics_are_a_plain_sockets(state_dir, ns, cases, acceptor, blackhole):
    """Non-blocking (EINPROGRESS, then SO_ERROR), refused, a timeout (a netns this test makes
    drops the SYNs), re-bind and re-aim of a connected socket, asyncio."""
    source, hole = blackhole
    extra = ["--endpoint", f"ep-bh type ipv4 addr {source} port dynamic", "--egress", f"{hole}/32=ep-bh"]
    got = run(ns, cases, "semantics", acceptor, free_port(), hole, extra=extra)
    with socket.create_connection(("127.0.0.1", acceptor)) as native:  # blocking: a second connect is EISCONN
        native_reaim = native.connect_ex(("127.0.0.1", free_port()))
    assert got["nonblocking"] == "EINPROGRESS" and got["nonblocking done"] == 0 and got["nonblocking peer"]
    assert got["refused"] == "ECONNREFUSED"
    assert got["timeout"] == "TimeoutError" and 0.4 <= got["timeout took"] <= 2, got
    assert got["rebind"] == "EINVAL" and got["reaim"] == "EISCONN" and native_reaim == 106
    assert got["asyncio"] is True and got["pooled"] >= 4


def test_the_options_set_on_the_placeholder_are_on_the_connection(state_dir, ns, cases, acceptor):
    got = run(ns, cases, "options", acceptor)
    with socket.socket() as native:
        native.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        rcvbuf = native.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert got == {"pooled": True, "timeout": 3.0, "keepalive": 1, "nodelay": 1, "rcvbuf": rcvbuf,
                   "source": "127.0.0.2"}


def test_a_forked_child_never_uses_its_parents_pool(state_dir, ns, cases, acceptor):
    got = run(ns, cases, "fork", acceptor)
    assert got["parent held"] >= 1
    assert got["child"] == {"closed": got["parent held"], "ok": 3, "fetched": True}
    assert got["parent's still open"] is True and got["parent pooled"] is True


def test_fds_the_program_closed_are_not_used(state_dir, ns, cases, acceptor):
    assert run(ns, cases, "closed", acceptor) == {"errors": 0, "others intact": True}


def test_threads_share_the_pool(state_dir, ns, cases, acceptor):
    got = run(ns, cases, "threads", acceptor, 4, 25)
    assert got["errors"] == [] and got["made"] == 100 and got["distinct"] == 100  # never one socket twice
    assert got["taken"] == 100 and got["held"] <= pool.MAX_HELD


def test_the_pool_closes_what_it_holds(state_dir, ns, cases, acceptor):
    got = run(ns, cases, "leaks", acceptor)
    assert got["during"] > got["before"] and got["same"] is True, got


def test_a_table_change_drops_the_pool(state_dir, ns, cases, acceptor):
    """The endpoint moves to another address: connections made after the pool's next look at the
    policy's digest (at most VERSION_STALE seconds) leave from the new one, and never again from
    the old one."""
    p = subprocess.Popen([*graft_cmd(), "run", "-n", ns, *OUT, "--", PY, cases, "table", str(acceptor)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(p.stdout.readline()) == {"ready": True}
        for args in (["del", "ep-out"], ["add", "ep-out", "type", "ipv4", "addr", "127.0.0.3", "port", "dynamic"]):
            subprocess.run([*graft_cmd(), "-n", ns, *args], check=True, capture_output=True, text=True)
        out, err = p.communicate("go\n", timeout=60)
    finally:
        stop(p)
    assert p.returncode == 0, err
    got = json.loads(out.splitlines()[-1])
    assert got["before"] == "127.0.0.2" and got["after"] == "127.0.0.3" and got["flapped"] is False, got
    assert got["changed within"] <= 2.5, got


def test_pool_state_is_per_process_and_bounded():
    """Unit-level: without a service nothing is pooled and nothing leaks (the caller asks `named`,
    which answers the error)."""
    from sockgraft.modes.api import pool

    before = len(os.listdir("/proc/self/fd"))
    assert pool.take("ep-out", ("127.0.0.1", 1), socket.SOCK_STREAM, path="/nonexistent/graft.sock") is None
    assert pool.take("ep-out", ("::1", 1), socket.SOCK_STREAM, family=socket.AF_INET, path="/x") is None
    assert pool.take("ep-out", ("127.0.0.1", 1), socket.SOCK_SEQPACKET, path="/x") is None
    assert len(os.listdir("/proc/self/fd")) == before and pool.held() == 0
    assert pool.LOW + pool.MAX_POOL < pool.MAX_HELD


WEB = ["--endpoint", "ep-web type ipv4 addr 127.0.0.1 port {port}"]


def test_an_unbound_pooled_socket_binds_only_to_its_endpoint_and_does_nothing_before(state_dir, ns, cases):
    """The attack: the program takes sockets of a `namedpool` itself. Bound to another port, another
    address, the wildcard: EPERM (the bind guard); connected or listening unbound: refused by the
    kernel (the egress table), nothing served; bound to its own endpoint: it works and then
    carries the container's mark."""
    port, other = free_port(), free_port()
    extra = [WEB[0], WEB[1].format(port=port)]
    with socket.socket() as unlisted:  # where the unbound connect is aimed: it must see nothing
        unlisted.bind(("127.0.0.1", other))
        unlisted.listen(16)
        got = run(ns, cases, "bind-attack", port, other, extra=extra)
        unlisted.setblocking(False)
        with pytest.raises(BlockingIOError):
            unlisted.accept()
    assert got["host"] == ["127.0.0.1", port] and got["unbound mark"] & MARK_MASK == UNBOUND_TAG, got
    assert (got["other port"], got["other address"], got["wildcard"]) == ("EPERM",) * 3, got
    assert got["unbound connect"] == "ECONNREFUSED" and got["served"] == "ECONNREFUSED", got
    assert got["own endpoint"] == "0" and got["bound mark"] & MARK_MASK == MARK_TAG, got


def test_binds_by_name_are_pooled_and_behave_as_the_services(state_dir, ns, cases):
    port = free_port()
    p = subprocess.Popen([*graft_cmd(), "run", "-n", ns, *OUT, WEB[0], WEB[1].format(port=port), "--", PY, cases,
                          "bind", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(p.stdout.readline()) == {"ready": True}
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"hello")
            assert c.recv(10) == b"hello"
        got = json.loads(p.stdout.readline())
        assert p.wait(timeout=60) == 0, p.stderr.read()
    finally:
        stop(p)
    assert got["pooled"] == 39, got  # the first bind is the service's (a server binds once); then pooled
    assert got["in place"] == [True, "GraftSocket", "ep-web"], got
    assert got["name"] == ["127.0.0.1", port] and got["reuseaddr"] == 1 and got["mark"] & MARK_MASK == MARK_TAG
    assert got["second"] == "EADDRINUSE" and got["second is a placeholder"], got
    assert got["v4-mapped"] == ["::ffff:127.0.0.1", port], got
