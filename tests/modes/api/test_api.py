"""Attach mode `api`: programs written for the graft API, in a fresh netns with only `lo`."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import sockgraft
from tests.helpers import children, free_port, graft, graft_cmd, stop, wait_for


def script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def graft_run(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([*graft_cmd(), "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


SERVER = """
    import sys, sockgraft
    s = sockgraft.create_server(sys.argv[1])
    print("serving", *s.getsockname()[:2], flush=True)
    while True:
        c, peer = s.accept()
        c.sendall(f"hello {peer[0] if isinstance(peer, tuple) else 'unix'}\\n".encode())
        c.close()
"""


def test_server_inside_is_reached_on_endpoint(tmp_path, state_dir, ns, procs):
    port = free_port()
    srv = script(tmp_path, "srv.py", SERVER)
    p = graft_run("-n", ns, "--endpoint", f"ep-http type ipv4 addr 127.0.0.1 port {port}", "--", sys.executable, srv, "ep-http")
    procs.append(p)
    assert p.stdout.readline().split() == ["serving", "127.0.0.1", str(port)]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        assert c.recv(100) == b"hello 127.0.0.1\n"
    # the container's own netns has no such listener: grafted, not local
    inside = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htln"], capture_output=True, text=True)
    assert str(port) not in inside.stdout


CLIENT = """
    import sys, sockgraft
    c = sockgraft.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5, source=sys.argv[3])
    print(c.recv(100).decode().strip(), c.getsockname()[0], flush=True)
"""


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_client_inside_leaves_by_dynamic_endpoint(tmp_path, state_dir, ns, family):
    host, src = ("127.0.0.1", "127.0.0.2") if family == "ipv4" else ("::1", "::1")
    fam = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    with socket.socket(fam, socket.SOCK_STREAM) as server:
        server.bind((host, 0))
        server.listen()
        port = server.getsockname()[1]
        cli = script(tmp_path, "cli.py", CLIENT)
        p = graft_run("-n", ns, "--endpoint", f"ep-out type {family} addr {src} port dynamic",
                      "--egress", f"{host}/{32 if family == 'ipv4' else 128}=ep-out",  # the kernel's egress table
                      "--", sys.executable, cli, host, str(port), "ep-out")
        server.settimeout(10)
        conn, peer = server.accept()
        assert peer[0] == src  # the server sees the endpoint's source address
        conn.sendall(b"hi")
        conn.close()
        out, err = p.communicate(timeout=10)
        assert p.returncode == 0, err
        assert out.split() == ["hi", src]


def test_ipv6_server(tmp_path, state_dir, ns, procs):
    port = free_port("::1")
    p = graft_run("-n", ns, "--endpoint", f"ep6 type ipv6 addr ::1 port {port}", "--",
                  sys.executable, script(tmp_path, "srv.py", SERVER), "ep6")
    procs.append(p)
    assert p.stdout.readline().split() == ["serving", "::1", str(port)]
    with socket.create_connection(("::1", port), timeout=5) as c:
        assert c.recv(100) == b"hello ::1\n"


def test_unix_endpoint_server_and_client(tmp_path, state_dir, ns, procs):
    path = str(tmp_path / "ep.sock")
    p = graft_run("-n", ns, "--endpoint", f"sock type unix path {path}", "--",
                  sys.executable, script(tmp_path, "srv.py", SERVER), "sock")
    procs.append(p)
    assert p.stdout.readline().split()[0] == "serving"
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(path)
        assert c.recv(100).startswith(b"hello")
    stop(p)
    # and the other way round: a host server on a unix path, dialled by name from inside
    with socket.socket(socket.AF_UNIX) as server:
        os.unlink(path) if os.path.exists(path) else None
        server.bind(path)
        server.listen()
        dial = script(tmp_path, "dial.py", """
            import sockgraft
            s = sockgraft.socket()
            s.connect("sock")
            print(s.family, s.recv(10).decode(), flush=True)
        """)
        p = graft_run("-n", ns, "--endpoint", f"sock type unix path {path}", "--", sys.executable, dial)
        server.settimeout(10)
        conn, _ = server.accept()
        conn.sendall(b"unix-ok")
        conn.close()
        out, err = p.communicate(timeout=10)
        assert out.split() == [str(int(socket.AF_UNIX)), "unix-ok"], err


def test_two_containers_same_name_different_host_endpoints(tmp_path, state_dir, make_netns, procs):
    a, b = make_netns(), make_netns()
    pa, pb = free_port(), free_port("127.0.0.2")
    srv = script(tmp_path, "srv.py", SERVER)
    for name, addr, port in ((a, "127.0.0.1", pa), (b, "127.0.0.2", pb)):
        p = graft_run("-n", name, "--endpoint", f"ep-http type ipv4 addr {addr} port {port}", "--", sys.executable, srv, "ep-http")
        procs.append(p)
        assert p.stdout.readline().split() == ["serving", addr, str(port)]


ASK = """
    import errno, os, sys, sockgraft
    try:
        sockgraft.socket().bind(sys.argv[1])
        print("granted", flush=True)
    except OSError as e:
        print("denied", errno.errorcode[e.errno], e.strerror, flush=True)
"""


def test_unknown_and_foreign_endpoints_are_denied(tmp_path, state_dir, make_netns, procs):
    a, b = make_netns(), make_netns()
    port = free_port()
    ask = script(tmp_path, "ask.py", ASK)
    # a's run holds its fd service; b asks for a's endpoint name through its own service: not in b's table
    graft("-n", a, "add", "only-a", "type", "ipv4", "addr", "127.0.0.1", "port", str(port))
    out = graft("run", "-n", b, "--", sys.executable, ask, "only-a").stdout
    assert out.startswith("denied EADDRNOTAVAIL") and "only-a" in out
    # b connects to a's own fd-service socket: the service sees b's netns and refuses everything
    hold = graft_run("-n", a, "--", "sh", "-c", 'echo "$GRAFT_SOCKET"; sleep 60')
    procs.append(hold)
    a_socket = hold.stdout.readline().strip()
    out = subprocess.run(["ip", "netns", "exec", b, sys.executable, ask, "only-a"], capture_output=True, text=True,
                         env=dict(os.environ, GRAFT_SOCKET=a_socket)).stdout
    assert out.startswith("denied EPERM") and "outside the container's netns" in out
    # and a process of the host netns is refused the same way
    out = subprocess.run([sys.executable, ask, "only-a"], capture_output=True, text=True,
                         env=dict(os.environ, GRAFT_SOCKET=a_socket)).stdout
    assert out.startswith("denied EPERM")
    audit = [json.loads(line) for line in open(os.path.join(state_dir, "audit.log"))]
    assert any(r["event"] == "deny" and r["errno"] == 1 for r in audit)


REBIND = """
    import errno, socket, sys, sockgraft
    IP_BIND_ADDRESS_NO_PORT = 24
    results = []
    for name in sys.argv[1:]:
        s = sockgraft.socket(type=socket.SOCK_STREAM if "udp" not in name else socket.SOCK_DGRAM)
        s.bind(name)
        first = s.getsockname()
        for trick in ("plain", "no_port"):
            if trick == "no_port":
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            for target in (("127.0.0.3", 29999), ("127.0.0.1", 0), ("0.0.0.0", 0)):
                try:
                    s.bind(target)
                    results.append(f"ESCAPE {name} {trick} {target} -> {s.getsockname()}")
                except OSError as e:
                    results.append(errno.errorcode[e.errno])
        assert s.getsockname() == first
    print(" ".join(results), flush=True)
"""


def test_handed_out_sockets_cannot_be_rebound(tmp_path, state_dir, ns):
    port = free_port()
    p = graft("run", "-n", ns,
              "--endpoint", f"ep-http type ipv4 addr 127.0.0.1 port {port}",
              "--endpoint", "ep-out type ipv4 addr 127.0.0.1 port dynamic",
              "--endpoint", "ep-udp type ipv4 addr 127.0.0.1 port dynamic",
              "--", sys.executable, script(tmp_path, "rebind.py", REBIND), "ep-http", "ep-out", "ep-udp")
    words = p.stdout.split()
    assert len(words) == 18 and "ESCAPE" not in p.stdout, p.stdout
    assert set(words) == {"EINVAL"}


ASYNC = """
    import asyncio, sys, select, sockgraft
    async def main():
        async def handle(r, w):
            w.write(b"async " + await r.readline()); await w.drain(); w.close()
        server = await sockgraft.start_server(handle, "ep-http")
        r, w = await sockgraft.open_connection(sys.argv[1], int(sys.argv[2]), source="ep-out")
        w.write(b"ping\\n"); await w.drain()
        print((await r.readline()).decode().strip(), flush=True)
        server.close()
        # select and epoll on a grafted listening socket
        s = sockgraft.create_server("ep-http2")
        ep = select.epoll(); ep.register(s.fileno(), select.EPOLLIN)
        print("epoll-ready", flush=True)
        events = len(ep.poll(10))
        c, _ = s.accept()
        c.sendall(b"events %d\\n" % events)
        c.close()
    asyncio.run(main())
"""


def test_asyncio_select_epoll(tmp_path, state_dir, ns):
    port, port2 = free_port(), free_port()
    p = graft_run("-n", ns,
                  "--endpoint", f"ep-http type ipv4 addr 127.0.0.1 port {port}",
                  "--endpoint", f"ep-http2 type ipv4 addr 127.0.0.1 port {port2}",
                  "--endpoint", "ep-out type ipv4 addr 127.0.0.1 port dynamic",
                  "--", sys.executable, script(tmp_path, "a.py", ASYNC), "127.0.0.1", str(port))
    assert p.stdout.readline().strip() == "async ping"
    assert p.stdout.readline().strip() == "epoll-ready"
    # listening since before "epoll-ready": one connect is enough; the answer comes on it (a
    # connect that only waited for the port raced the program's exit: the server's reset came
    # before the client read its SO_ERROR, and the next tries were refused)
    with socket.create_connection(("127.0.0.1", port2), timeout=10) as c:
        events = c.makefile().readline().strip()
    assert p.wait(10) == 0 and events == "events 1", p.stderr.read()


def test_run_passes_exit_status_and_cleans_up(state_dir):
    p = graft("run", "--", "sh", "-c", 'echo "$GRAFT_NETNS"; exit 7', check=False)
    assert p.returncode == 7
    made = p.stdout.strip()
    assert made.startswith("graft-run-") and not os.path.exists(f"/run/netns/{made}")
    assert graft("run", "--", "sh", "-c", "kill -KILL $$", check=False).returncode == 128 + 9
    p = graft("run", "--", "ip", "-o", "link", "show")
    assert [line.split()[1] for line in p.stdout.splitlines()] == ["lo:"]  # only lo inside


def test_run_cleans_up_after_sigterm(tmp_path, state_dir, make_netns):
    name = f"{make_netns()}x"  # a netns graft run must create (and so remove)
    port = free_port()
    p = graft_run("-n", name, "--endpoint", f"ep-http type ipv4 addr 127.0.0.1 port {port}", "--",
                  sys.executable, script(tmp_path, "srv.py", SERVER), "ep-http")
    try:
        assert p.stdout.readline().startswith("serving")
        assert os.path.exists(f"/run/netns/{name}")
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 128 + signal.SIGTERM
    finally:
        stop(p)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert not os.path.exists(f"/run/netns/{name}")
    assert graft("-j", "show", "-h", check=False).returncode == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    from sockgraft.host.store import Store

    with Store(state_dir) as s:
        assert s.container(name) is None


def test_run_stopped_stops_what_its_command_left(state_dir, procs):
    """SIGTERM to `graft run` stops the command and then the processes it leaves in the container
    (here the shell dies of it and its two sleeps are orphaned to `graft run`, a subreaper)."""
    p = graft_run("--", "sh", "-c", 'sleep 60 & echo "$!"; sleep 60')
    procs.append(p)
    orphan = int(p.stdout.readline())
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 128 + signal.SIGTERM
    wait_for(lambda: not os.path.exists(f"/proc/{orphan}") or "Z" in open(f"/proc/{orphan}/stat").read().split()[2],
             5, "the orphaned sleep to go")


def test_bad_run_input(state_dir):
    for args, msg in ((["run", "--mode", "warp", "--", "true"], "Invalid value"),
                      (["run", "--ingress", "nonsense", "--", "true"], "bad ingress pair"),
                      (["run", "--egress", "10.0.0.0/33=x", "--", "true"], "bad egress rule"),
                      (["run", "--endpoint", "x type ipv4", "--", "true"], "takes exactly"),
                      (["run", "--", "/no/such/program"], "command not found")):
        p = graft(*args, check=False)
        assert p.returncode != 0 and msg in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_run_sweeps_what_a_killed_run_left(state_dir):
    """A `graft run` killed with SIGKILL cannot clean up; the next one removes its debris."""
    p = subprocess.Popen([*graft_cmd(), "run", "--", "sh", "-c", 'echo "$GRAFT_SOCKET $GRAFT_NETNS"; exec sleep 60'],
                         stdout=subprocess.PIPE, text=True)
    sock, name = p.stdout.readline().split()
    app = children(p.pid)[0]
    p.kill()
    p.wait()
    assert os.path.exists(sock) and os.path.exists(f"/run/netns/{name}")
    try:
        graft("run", "--", "true")
        assert not os.path.exists(os.path.dirname(sock))
        assert os.path.exists(f"/run/netns/{name}")  # its orphaned command still lives in it
        os.kill(app, signal.SIGKILL)
        time.sleep(0.2)
        graft("run", "--", "true")
        assert not os.path.exists(f"/run/netns/{name}")
    finally:
        try:
            os.kill(app, signal.SIGKILL)
        except ProcessLookupError:
            pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


CONNECT_FROM = """
    import errno, socket, sys, sockgraft
    port, refused = int(sys.argv[1]), int(sys.argv[2])
    def outcome(fn):
        try:
            fn()
            return "0"
        except OSError as e:
            return errno.errorcode[e.errno]
    s = sockgraft.create_connection(("127.0.0.1", port), timeout=5, source="ep-out")
    print("peer", s.getpeername()[1] == port)
    print("rebind", outcome(lambda: s.bind(("127.0.0.1", 0))))
    print("reaim", outcome(lambda: s.connect(("127.0.0.1", refused))))
    print("still", s.getpeername()[1] == port)
    print("refused", outcome(lambda: sockgraft.create_connection(("127.0.0.1", refused), timeout=5, source="ep-out")))
    n = sockgraft.socket(sockgraft.AF_GRAFT, socket.SOCK_STREAM)
    n.setblocking(False)
    print("nonblocking", outcome(lambda: n.connect_from("ep-out", ("127.0.0.1", port))))
    print("unknown", outcome(lambda: sockgraft.create_connection(("127.0.0.1", port), source="not-mine")))
    print("v6 from v4", outcome(lambda: sockgraft.socket().connect_from("ep-out", ("::1", port))))
"""


def _native_reaim(port: int, refused: int) -> str:
    """What a plain socket from create_connection(timeout=5) answers to a second connect: the
    kernel answers 0 once after a connect completed in the background (EISCONN after a blocking
    one), and the socket stays connected to its peer either way."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        code = c.connect_ex(("127.0.0.1", refused))
        assert c.getpeername()[1] == port
    return errno.errorcode[code] if code else "0"


def test_connect_from_hands_over_a_connected_socket(tmp_path, state_dir, ns):
    """create_connection(source=NAME): a pooled socket and the kernel's connect, or the fd service
    connects (port chosen at connect time either way); the socket cannot be bound again nor aimed
    elsewhere (a second connect answers as a plain socket's and leaves the peer); errors are the
    connect's."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        port = server.getsockname()[1]
        refused = free_port()
        native = _native_reaim(port, refused)
        p = graft_run("-n", ns, "--endpoint", "ep-out type ipv4 addr 127.0.0.1 port dynamic", "--egress", "127.0.0.1/32=ep-out",
                      "--", sys.executable, script(tmp_path, "cf.py", CONNECT_FROM), str(port), str(refused))
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert dict(line.rsplit(" ", 1) for line in out.splitlines()) == {
        "peer": "True", "rebind": "EINVAL", "reaim": native, "still": "True", "refused": "ECONNREFUSED",
        "nonblocking": "EINPROGRESS", "unknown": "EADDRNOTAVAIL", "v6 from v4": "EAFNOSUPPORT"}


NAMED_BINDS = """
    import errno, json, socket, sys, sockgraft
    OPTS = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.SOL_SOCKET, socket.SO_RCVBUF, 65536),
            (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.IPPROTO_IP, socket.IP_TOS, 0x10),
            (socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)]
    def opts(s):
        return [s.getsockopt(level, name) if level != socket.IPPROTO_TCP or s.type == socket.SOCK_STREAM else None
                for level, name, _ in OPTS]
    out = {}
    for label, family, sotype, name in (("v4", sockgraft.AF_GRAFT, socket.SOCK_STREAM, "ep-dyn"),
                                        ("v6", socket.AF_INET6, socket.SOCK_STREAM, "ep-dyn"),
                                        ("udp", sockgraft.AF_GRAFT, socket.SOCK_DGRAM, "ep-dyn"),
                                        ("fixed", sockgraft.AF_GRAFT, socket.SOCK_STREAM, "ep-fixed")):
        s = sockgraft.socket(family, sotype)
        if sotype == socket.SOCK_STREAM:
            for level, opt, value in OPTS:
                s.setsockopt(level, opt, value)
        s.settimeout(2.5)
        s.bind(name)
        out[label] = {"addr": list(s.getsockname()[:2]), "family": s.family, "type": s.type,
                      "timeout": s.gettimeout(), "opts": opts(s)}
        with socket.socket(s.family, sotype) as native:  # the values the same calls give natively
            if sotype == socket.SOCK_STREAM:
                for level, opt, value in OPTS:
                    native.setsockopt(level, opt, value)
            out[label]["native"] = opts(native)
        out[label]["rebind"] = "escape"
        try:
            s.bind(("127.0.0.1" if s.family == socket.AF_INET else "::", 0))
        except OSError as e:
            out[label]["rebind"] = errno.errorcode[e.errno]
        s.close()
    try:
        sockgraft.socket().bind("not-mine")
    except OSError as e:
        out["unknown"] = errno.errorcode[e.errno]
    print(json.dumps(out), flush=True)
"""


def test_named_binds(tmp_path, state_dir, ns):
    """bind(NAME) (the first of a kind served in C by the fd service, fdservice_fast.c `named`; the
    next ones on pooled unbound sockets, `namedpool`): the endpoint's address
    (a dynamic endpoint: a real port), v4-mapped for an AF_INET6 socket, UDP, a fixed port; the
    options the program set before the bind carried over with the values it gets natively, its
    timeout kept; the socket cannot be bound again; a name not in the table is EADDRNOTAVAIL. The
    audit names each grant (of a `namedpool` where the binds were pooled)."""
    port = free_port()
    p = graft("run", "-n", ns, "--endpoint", "ep-dyn type ipv4 addr 127.0.0.1 port dynamic",
              "--endpoint", f"ep-fixed type ipv4 addr 127.0.0.1 port {port}",
              "--", sys.executable, script(tmp_path, "named.py", NAMED_BINDS))
    out = json.loads(p.stdout)
    assert out.pop("unknown") == "EADDRNOTAVAIL"
    for label, r in out.items():
        assert r["rebind"] == "EINVAL" and r["timeout"] == 2.5, (label, r)
        assert r["opts"] == r["native"], (label, r)
    assert out["v4"]["addr"][0] == "127.0.0.1" and out["v4"]["addr"][1] > 0 and out["v4"]["family"] == socket.AF_INET
    assert out["v4"]["opts"][1] == 2 * 65536 and out["v4"]["opts"][3] == 0x10  # set, not left at the defaults
    assert out["v6"]["addr"][0] == "::ffff:127.0.0.1" and out["v6"]["family"] == socket.AF_INET6
    assert out["udp"]["type"] == socket.SOCK_DGRAM and out["udp"]["addr"][1] > 0
    assert out["fixed"]["addr"] == ["127.0.0.1", port]
    audit = [json.loads(line) for line in open(os.path.join(state_dir, "audit.log"))]
    grants = {(r["endpoint"], r.get("count")) for r in audit if r["event"] == "grant" and r["op"] in ("named", "namedpool")}
    assert {"ep-dyn", "ep-fixed"} <= {e for e, _ in grants}
    assert any(r["event"] == "deny" and r["op"] == "named" and r["errno"] == 99 for r in audit)


def test_a_pooled_socket_object_is_the_one_the_constructor_makes():
    """GraftSocket._pooled skips the Python __init__ chain: what it makes must not differ from
    `GraftSocket(family, type, proto, fileno=fd)` with its endpoint set (a Python that adds an
    attribute to socket.socket.__init__ fails here)."""
    from sockgraft.modes.api.graftsocket import GraftSocket

    for family in (socket.AF_INET, socket.AF_INET6):
        made = GraftSocket(family, socket.SOCK_STREAM, 0, fileno=socket.socket(family).detach())
        made.endpoint = "out"
        pooled = GraftSocket._pooled(socket.socket(family).detach(), family, socket.SOCK_STREAM, 0, "out")
        with made, pooled:
            assert vars(pooled) == vars(made)
            assert (pooled.family, pooled.type, pooled.proto, pooled.gettimeout()) == \
                (made.family, made.type, made.proto, made.gettimeout())
            assert pooled.fileno() >= 0 and not pooled.get_inheritable()


def test_socket_af_graft_makes_its_placeholder_only_when_a_call_needs_it():
    """sockgraft.socket(AF_GRAFT) makes no socket until a call needs one: a bind by name takes the
    host socket in directly (tests/modes/api/test_pool.py, "in place"); any other call makes the
    placeholder GraftSocket(AF_GRAFT) makes and answers as on it, and the object is then that
    GraftSocket. Every call but bind and close is in _OPENING."""
    from sockgraft.modes.api import graftsocket as G

    calls = {n for n in dir(G.GraftSocket) if not n.startswith("_") and callable(getattr(G.GraftSocket, n))}
    assert calls - {"bind", "close"} == set(G._OPENING) & calls, calls ^ set(G._OPENING)
    assert G._Unopened.close is not G.GraftSocket.close
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        made = G.GraftSocket(G.AF_GRAFT, kind)
        lazy = sockgraft.socket(G.AF_GRAFT, kind)
        assert type(lazy) is G._Unopened
        assert (lazy.family, lazy.type, lazy.proto) == (made.family, made.type, made.proto)
        lazy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        made.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        assert type(lazy) is G.GraftSocket and vars(lazy) == vars(made)
        assert (lazy.family, lazy.type, lazy.proto, lazy.gettimeout()) == (made.family, made.type, made.proto,
                                                                           made.gettimeout())
        assert lazy.fileno() >= 0 and lazy.getsockname() == made.getsockname() == ("0.0.0.0", 0)
        lazy.close(), made.close()
    fds = len(os.listdir("/proc/self/fd"))
    for call in (lambda s: s.fileno(), lambda s: s.bind(("127.0.0.1", 0)), lambda s: s.settimeout(3), repr,
                 lambda s: s.connect_ex(("127.0.0.1", free_port()))):
        lazy = sockgraft.socket()
        call(lazy)
        assert type(lazy) is G.GraftSocket and lazy.fileno() >= 0
        lazy.close()
    closed = sockgraft.socket()
    closed.close()  # unused: then a closed GraftSocket, whose calls fail as a closed socket's
    for call in (lambda: closed.getsockname(), lambda: closed.bind(("127.0.0.1", 0))):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EBADF
    assert closed.fileno() == -1 and len(os.listdir("/proc/self/fd")) == fds


def test_create_connection_resolves_names_and_takes_ip_literals_as_they_are():
    from sockgraft.modes.api import graftsocket as G

    for _ in range(2):  # the second time from what the first noted
        assert G._addresses("127.0.0.1", 80) == [("127.0.0.1", 80)]
        assert G._addresses("::1", 80) == [("::1", 80)]
        assert ("127.0.0.1", 80) in G._addresses("localhost", 80)
    assert G._LITERALS["127.0.0.1"] and G._LITERALS["::1"] and not G._LITERALS["localhost"]
    G._LITERALS.update({f"10.0.{i // 256}.{i % 256}": True for i in range(300)})
    G._addresses("127.0.0.2", 80)
    assert len(G._LITERALS) <= 256  # bounded
