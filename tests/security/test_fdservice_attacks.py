"""Attacks on the fd service from inside a container (api mode; the service is also what preload
mode asks). Each attack is a real program in a real netns; escapes must be 0."""
import json
import os
import subprocess
import sys
import textwrap


from tests.helpers import fd_count, free_port, graft_cmd, stop


def run_inside_service(ns: str, port: int, procs) -> tuple[subprocess.Popen, str]:
    """A `graft run` holding the fd service for `ns`; returns it and its socket path."""
    p = subprocess.Popen([*graft_cmd(), "run", "-n", ns,
                          "--endpoint", f"ep-http type ipv4 addr 127.0.0.1 port {port}",
                          "--endpoint", "ep-out type ipv4 addr 127.0.0.1 port dynamic",
                          "--", "sh", "-c", 'echo "$GRAFT_SOCKET"; exec sleep 120'],
                         stdout=subprocess.PIPE, text=True)
    procs.append(p)
    return p, p.stdout.readline().strip()


def inside(ns: str, sock: str, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ, GRAFT_SOCKET=sock))


MALFORMED = r"""
    import os, socket, sys, array
    path = os.environ["GRAFT_SOCKET"]
    msgs = [b"named", b"named ep-http 0 1 0", b"named ep-http 99 1 0 -", b"named ep-http 0 1 0 -,x",
            b"bind 2 300.1.1.1 80 1 0 -", b"connect 2 127.0.0.1 99999 1 0", b"\xff\xfe\x00", b"named " + b"A" * 3000,
            b"show extra", b"named ep-http 0 1 0 - -", b"bind 2 127.0.0.1 80 1 0", b"x" * 5000, b"\x00" * 64,
            b"named ../../etc 0 1 0 -", b"named ep-http 0 3 0 -"]
    results = []
    for m in msgs:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        s.send(m)
        data, fds, _, _ = socket.recv_fds(s, 4096, 4)
        results.append(data.split(b" ")[0:2] + [len(fds)])
        for fd in fds:
            os.close(fd)
        s.close()
    # fds sent TO the service must be closed by it, never kept or used
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    pr, pw = os.pipe()
    for _ in range(20):
        socket.send_fds(s, [b"show"], [pr, pw, pr])
        socket.recv_fds(s, 4096, 1)
    print(repr(results))
"""


def test_malformed_truncated_oversized_messages(ns, state_dir, procs):
    holder, sock = run_inside_service(ns, free_port(), procs)
    before = fd_count(holder.pid)
    p = inside(ns, sock, MALFORMED)
    assert p.returncode == 0, p.stderr
    results = eval(p.stdout)
    # every malformed request: an error reply with EINVAL (or EMSGSIZE when too long), never an fd
    # every malformed request: an error reply, never an fd. The parser refuses with EINVAL, an
    # oversized one with EMSGSIZE; `../../etc` is a well-formed name that is in no table
    # (EADDRNOTAVAIL); a raw socket type is refused by the engine (EACCES).
    expected = [b"22"] * 11 + [b"90", b"22", b"99", b"13"]
    assert [r[1] for r in results] == expected, results
    assert all(kind == b"err" and nfds == 0 for kind, _, nfds in results)
    assert fd_count(holder.pid) <= before + 1  # no fd received from the attacker was kept
    # and the service still serves an honest request
    ok = inside(ns, sock, "import sockgraft; s = sockgraft.socket(); s.bind('ep-out'); print(s.getsockname()[0])")
    assert ok.stdout.strip() == "127.0.0.1", ok.stderr


FLOOD = r"""
    import os, socket
    conns = []
    for i in range(400):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(os.environ["GRAFT_SOCKET"])
        conns.append(s)
    served = 0
    for s in conns:
        try:
            s.send(b"show")
            if s.recv(4096).startswith(b"ok"):
                served += 1
        except OSError:
            pass
    print(served)
"""


def test_connection_flood_is_capped_and_service_survives(ns, state_dir, procs):
    holder, sock = run_inside_service(ns, free_port(), procs)
    before = fd_count(holder.pid)
    p = inside(ns, sock, FLOOD)
    from sockgraft.modes.api.fdservice import MAX_CONNECTIONS

    assert int(p.stdout) == MAX_CONNECTIONS, p.stderr
    ok = inside(ns, sock, "import sockgraft; s = sockgraft.socket(); s.bind('ep-out'); print('ok')")
    assert ok.stdout.strip() == "ok", ok.stderr
    assert fd_count(holder.pid) <= before + 2  # the flood's connections are all gone


DEAD_CONNECTOR = r"""
    import os, socket, sys
    from sockgraft.core.protocol import Request
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child connects, hands the connection to its parent and dies
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(os.environ["GRAFT_SOCKET"])
        socket.send_fds(a, [b"x"], [s.fileno()])
        os._exit(0)
    os.waitpid(pid, 0)
    _, fds, _, _ = socket.recv_fds(b, 1, 1)
    s = socket.socket(fileno=fds[0])
    s.send(Request("named", name="ep-out").encode())
    data, fds, _, _ = socket.recv_fds(s, 4096, 1)
    print(data.decode(), len(fds))
"""


def test_connection_of_a_dead_process_is_refused(ns, state_dir, procs):
    _, sock = run_inside_service(ns, free_port(), procs)
    p = inside(ns, sock, DEAD_CONNECTOR)
    assert p.stdout.startswith("err 1 ") and p.stdout.split()[-1] == "0", p.stdout + p.stderr


NESTED = r"""
    import ctypes, os, sockgraft
    from sockgraft.modes.api import client
    from sockgraft.core.protocol import Request
    client.ask(Request("show"))  # connect while still in the container's netns
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:
        raise SystemExit("unshare failed")
    try:
        s = sockgraft.socket(); s.bind("ep-out")
        print("ESCAPE", s.getsockname())
    except OSError as e:
        print("denied", e.errno)
"""


def test_nested_netns_is_not_grafted(ns, state_dir, procs):
    _, sock = run_inside_service(ns, free_port(), procs)
    p = inside(ns, sock, NESTED)
    assert p.stdout.strip() == "denied 1", p.stdout + p.stderr


def test_audit_records_every_denial(ns, state_dir, procs):
    _, sock = run_inside_service(ns, free_port(), procs)
    inside(ns, sock, "import sockgraft\ntry:\n  sockgraft.socket().bind('nope')\nexcept OSError: pass")
    holder = procs[-1]
    stop(holder)
    records = [json.loads(line) for line in open(os.path.join(state_dir, "audit.log"))]
    assert any(r["event"] == "deny" and r["op"] == "named" and r["errno"] == 99 for r in records)
