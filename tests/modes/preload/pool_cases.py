"""A program run under preload to exercise pooled host sockets (csrc/pool.c).

    python3 pool_cases.py batch PORT N         N connects to a listener, each socket's mark and source
    python3 pool_cases.py rebind REFUSED_PORT  a pooled socket whose connect was refused, bound again
    python3 pool_cases.py fork PORT            parent connects, forks; the child and the parent connect
    python3 pool_cases.py closed PORT          connect, close every fd above 2, connect again
    python3 pool_cases.py table PORT           connect; wait for a line on stdin; connect again
    python3 pool_cases.py options PORT         options set before the connect, read after it
    python3 pool_cases.py binds PORT N         N binds of 0.0.0.0:PORT (an ingress pair), then a server there
    python3 pool_cases.py steal PORT OTHER     2 binds of 0.0.0.0:PORT, then the pooled unbound sockets misused
    python3 pool_cases.py speculate PORT       after a streak of connects, sockets from socket() used every way
    python3 pool_cases.py bindspec PORT        after a streak of binds of 0.0.0.0:PORT, sockets from socket() used every way

Prints one JSON object."""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time


def once(port: int) -> dict:
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
        return {"err": 0, "mark": s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK), "source": s.getsockname()[0]}
    except OSError as e:
        return {"err": errno.errorcode.get(e.errno, e.errno)}
    finally:
        s.close()


def outcome(fn) -> str:
    try:
        fn()
        return "0"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def main(case: str, port: int, n: int = 0) -> dict:
    if case == "batch":
        got = [once(port) for _ in range(n)]
        return {"errors": sum(g["err"] != 0 for g in got), "marks": sorted({g.get("mark") for g in got}),
                "sources": sorted({g.get("source") for g in got})}
    if case == "rebind":
        s = socket.socket()
        refused = errno.errorcode.get(s.connect_ex(("127.0.0.1", port)), "0")
        try:
            s.bind(("127.0.0.1", 0))
            rebind = "0"
        except OSError as e:
            rebind = errno.errorcode[e.errno]
        return {"connect": refused, "rebind": rebind, "mark": s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)}
    if case == "fork":
        first = once(port)
        pid = os.fork()
        if pid == 0:
            ok = all(once(port)["err"] == 0 for _ in range(3))
            os._exit(0 if ok else 1)
        status = os.waitpid(pid, 0)[1]
        return {"first": first["err"], "child": os.waitstatus_to_exitcode(status), "parent": once(port)["err"]}
    if case == "closed":
        first = once(port)
        os.closerange(3, 4096)
        return {"first": first["err"], "after": once(port)["err"]}
    if case == "options":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.connect(("127.0.0.1", port))
        got = {"mark": s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) != 0,
               "keepalive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
               "nodelay": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
               "rcvbuf": s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}
        s.close()
        plain = socket.socket()  # one the program set nothing on: the host socket's defaults
        plain.connect(("127.0.0.1", port))
        got["plain"] = [plain.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)]
        plain.close()
        return got
    if case == "binds":
        loop_reuseaddr = set()
        for _ in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            loop_reuseaddr.add(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))
            s.close()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("0.0.0.0", port))
        got = {"name": list(s.getsockname()), "reuseaddr": s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
               "reuseport": s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT),
               "mark": s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)}
        six = []
        for _ in range(3):  # a V6ONLY [::] bind onto an ipv6 endpoint at ::, pooled from the second on
            t = socket.socket(socket.AF_INET6)
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            t.bind(("::", port))
            six.append(t.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            t.close()
        got["v6only"] = six
        got["loop reuseaddr"] = sorted(loop_reuseaddr)
        s.listen()
        second = socket.socket()
        try:
            second.bind(("0.0.0.0", port))
            got["second"] = "0"
        except OSError as e:
            got["second"] = errno.errorcode[e.errno]
        second.bind(("127.0.0.1", 0))  # what no pair takes stays in the container: the placeholder
        got["second local"] = list(second.getsockname())[0]
        second.close()
        print(json.dumps({"ready": True}), flush=True)
        conn, _ = s.accept()
        conn.sendall(conn.recv(10))
        conn.close()
        return got
    if case == "steal":
        # a hostile program finds the pooled unbound sockets in its own fd table and aims them elsewhere
        for _ in range(2):
            s = socket.socket()
            s.bind(("0.0.0.0", port))
            s.close()
        found = []
        for fd in range(3, 1024):
            try:
                s = socket.socket(fileno=fd)
            except OSError:
                continue
            mark = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
            if mark >> 16 == 0x5CA1 and s.family == socket.AF_INET:
                found.append(s)
            else:
                s.detach()
        got = {"found": len(found)}
        if found:
            got["elsewhere"] = outcome(lambda: found[0].bind(("127.0.0.1", n)))
            found[1].listen()
            c = socket.socket()
            c.settimeout(5)
            got["served"] = outcome(lambda: c.connect(("127.0.0.1", found[1].getsockname()[1])))
            got["connect"] = outcome(lambda: (found[2].settimeout(5), found[2].connect(("127.0.0.1", n))))
        return got
    if case == "speculate":
        return speculate(port)
    if case == "bindspec":
        return bindspec(port)
    if case == "table":
        before = once(port)
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
        time.sleep(1.2)  # the library looks at its table again after a second
        return {"before": before.get("source"), "after": once(port).get("source")}
    raise SystemExit(f"unknown case {case}")


def speculate(port: int) -> dict:
    """After SPEC_STREAK (4) pooled connects of a kind, socket() gives a pooled host socket: what
    the program sees of it before a connect, and after each other use (a local connect, a bind, a
    listen, a duplicate), which first swaps a socket of the container's in."""
    import ctypes
    import fcntl
    import select

    local = socket.socket()  # a listener of the container's: no rule names 127.0.0.5
    local.bind(("127.0.0.5", 0))
    local.listen(64)
    dest = local.getsockname()

    def streak():
        for _ in range(5):
            assert once(port)["err"] == 0

    def mark(s):
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) != 0

    def speculative(kind=socket.SOCK_STREAM):
        """A socket from socket() after a streak: a speculative one, unless no pooled socket was
        ready every time (a batch still on its way: socket() then makes the container's)."""
        for _ in range(10):
            streak()
            s = socket.socket(socket.AF_INET, kind)
            if mark(s):
                return s, True
            s.close()
        return socket.socket(socket.AF_INET, kind), False

    got = {"first": mark(socket.socket())}  # no streak yet: a socket of the container's
    streak()
    lowest, marked = [], 0  # socket() gives the lowest free number, batches of pooled sockets coming in or not
    for _ in range(40):
        low = os.open("/dev/null", os.O_RDONLY)
        os.close(low)
        s = socket.socket()
        if s.fileno() != low:
            lowest.append([low, s.fileno(), mark(s)])
        marked += mark(s)
        s.connect(("127.0.0.1", port))
        s.close()
    got["not lowest"], got["mostly speculative"] = lowest, marked >= 20
    s, got["speculative"] = speculative()
    got["name before"] = list(s.getsockname())
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    libc = ctypes.CDLL(None, use_errno=True)  # the kernel's bind, past the library: the bind guard
    sin = (ctypes.c_ubyte * 16)(2, 0, 0x1f, 0x90, 127, 0, 0, 1)  # 127.0.0.1:8080
    got["raw rebind"] = errno.errorcode.get(ctypes.get_errno(), "0") if libc.syscall(49, s.fileno(), sin, 16) < 0 else "0"
    d = s.dup()  # a duplicate is the same socket: connected with it, not swapped by its next use
    s.connect(("127.0.0.1", port))
    got["grafted"] = [mark(s), s.getsockname()[0], s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                      s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), outcome(d.listen), mark(d)]
    d.close()
    s.close()

    s, spec = speculative()  # a connect no rule names: the container's socket, with the options set before
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    d = s.dup()
    s.connect(dest)
    local.accept()[0].close()
    got["local"] = [spec, mark(s), mark(d), list(d.getpeername()), s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                    s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)]
    s.close(), d.close()
    got["after local"] = mark(socket.socket())  # the streak ended

    s, spec = speculative(socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    flags = [spec, bool(fcntl.fcntl(s, fcntl.F_GETFD) & fcntl.FD_CLOEXEC), bool(fcntl.fcntl(s, fcntl.F_GETFL) & os.O_NONBLOCK)]
    got["nonblocking"] = flags + [errno.errorcode.get(s.connect_ex(("127.0.0.1", port)), "0")]
    select.select([], [s], [], 5)
    got["nonblocking"].append(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    s.close()

    s, spec = speculative()
    s.bind(("127.0.0.5", 0))
    got["bind"] = [spec, mark(s), s.getsockname()[0]]
    s.close()

    s, spec = speculative()
    s.listen()
    c = socket.create_connection(("127.0.0.5", s.getsockname()[1]), timeout=5)  # inside the container
    got["listen"] = [spec, mark(s), s.getsockname()[0], mark(c)]
    c.close(), s.close()
    return got



def bindspec(port: int) -> dict:
    """After SPEC_STREAK (4) pooled binds of one pair (0.0.0.0:PORT), socket() gives a pooled unbound
    host socket: any use but a bind of that pair - another bind, a listen, a connect - first swaps
    a socket of the container's in, with the options and bind flags set meanwhile; a bind of that
    pair binds it where it stands (last, a server there, which the test reaches from the host once
    "ready" is printed)."""
    import ctypes
    import fcntl

    def streak():
        for _ in range(6):
            s = socket.socket()
            s.bind(("0.0.0.0", port))
            s.close()

    def tag(s):  # 0: the container's socket; 0x5CA1: unbound, pooled; 0x5CA0: bound to an endpoint
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) >> 16

    def speculative(kind=socket.SOCK_STREAM):
        """A socket from socket() after a streak: a speculative one, unless no pooled socket was
        ready every time (a batch still on its way: socket() then makes the container's)."""
        for _ in range(10):
            streak()
            s = socket.socket(socket.AF_INET, kind)
            if tag(s) == 0x5CA1:
                return s, True
            s.close()
        return socket.socket(socket.AF_INET, kind), False

    local = socket.socket()  # a listener of the container's: no pair takes 127.0.0.5
    local.bind(("127.0.0.5", 0))
    local.listen(8)
    got = {"first": tag(socket.socket())}  # no streak yet: a socket of the container's
    s, spec = speculative()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.bind(("127.0.0.5", 0))  # no pair takes it: the container's socket
    got["local bind"] = [spec, tag(s), s.getsockname()[0], s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
                         s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)]
    s.close()
    after = socket.socket()
    got["after local"] = tag(after)  # the streak ended
    after.close()

    s, spec = speculative()
    s.listen()  # no bind: a port of the container's
    c = socket.create_connection(("127.0.0.5", s.getsockname()[1]), timeout=5)
    got["listen"] = [spec, tag(s), tag(c)]
    c.close(), s.close()

    s, spec = speculative()
    s.connect(local.getsockname())
    local.accept()[0].close()
    got["connect"] = [spec, tag(s), s.getpeername() == local.getsockname()]
    s.close()

    s, spec = speculative(socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    got["nonblocking"] = [spec, bool(fcntl.fcntl(s, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
                          bool(fcntl.fcntl(s, fcntl.F_GETFL) & os.O_NONBLOCK)]
    s.bind(("0.0.0.0", port))
    got["nonblocking"] += [tag(s), bool(fcntl.fcntl(s, fcntl.F_GETFL) & os.O_NONBLOCK)]
    s.close()

    s, spec = speculative()
    got["before"] = [spec, list(s.getsockname())]
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    libc = ctypes.CDLL(None, use_errno=True)  # the kernel's bind, past the library: the bind guard
    sin = (ctypes.c_ubyte * 16)(2, 0, 0x1f, 0x90, 127, 0, 0, 1)  # 127.0.0.1:8080, no endpoint of the container's
    got["raw elsewhere"] = errno.errorcode.get(ctypes.get_errno(), "0") if libc.syscall(49, s.fileno(), sin, 16) < 0 else "0"
    ino = os.fstat(s.fileno()).st_ino
    d = s.dup()  # a duplicate is the same socket: bound with it, not swapped by its next use
    s.bind(("0.0.0.0", port))
    got["bound"] = [tag(s), list(s.getsockname()), s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    os.fstat(s.fileno()).st_ino == ino, list(d.getsockname()), tag(d)]  # bound where it stands
    d.close()
    s.listen()
    print(json.dumps({"ready": True}), flush=True)
    conn, _ = s.accept()
    conn.sendall(conn.recv(10))
    conn.close(), s.close()  # last: its TIME_WAIT holds the port

    return got


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *map(int, sys.argv[2:]))), flush=True)
