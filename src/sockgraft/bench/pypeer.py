"""Python TCP peers for `graft bench`, identical in every topology; with --graft-* they use the
graft API (`sockgraft.create_server` / `create_connection`), the only way into graft-api.

    python3 -m sockgraft.bench.pypeer serve --bind 0.0.0.0 --port P [--graft-endpoint NAME]
    python3 -m sockgraft.bench.pypeer stream|pingpong --connect A --port P --seconds S [--graft-source NAME]
    python3 -m sockgraft.bench.pypeer ctl-bind --bind A --port P --seconds S [--graft-endpoint NAME]
    python3 -m sockgraft.bench.pypeer ctl-connect --connect A --port P --seconds S [--graft-source NAME]
    python3 -m sockgraft.bench.pypeer ctl-local --what bind|connect --seconds S
    python3 -m sockgraft.bench.pypeer churn --connect A --port P --count N [--max-seconds S] [--graft-source NAME]

`serve` handles the connections in the order they come, one at a time: header b"S" = sink (reads
to EOF, answers the byte count), b"P"+size = echo fixed-size messages, b"C" = answer (as a JSON line) how the connections closed
since the last b"C" ("fin": the client closed first, normally; "rst": it reset) and start counting
anew; a connection the client closes at once (ctl-connect, churn) is counted and closed after the
client's FIN, so TIME_WAIT stays on the client's side. Clients print one JSON object.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import selectors
import socket
import statistics
import struct
import sys
import time

CHUNK = 128 * 1024


def _recv_exactly(c: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = c.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed")
        buf += part
    return bytes(buf)


def _server(args) -> socket.socket:
    if args.graft_endpoint:
        import sockgraft

        return sockgraft.create_server(args.graft_endpoint, backlog=4096)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((args.bind, args.port))
    s.listen(4096)
    return s


def _connect(args) -> socket.socket:
    if args.graft_source:
        import sockgraft

        c = sockgraft.create_connection((args.connect, args.port), source=args.graft_source)
    else:
        c = socket.create_connection((args.connect, args.port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def serve(args) -> dict:
    """Accepts every connection that is ready at each wake-up, and handles each once its first byte
    (or its EOF) is there, in order: a server of connections closed at once (ctl-connect, churn)
    must not be what the cell measures (with one wake-up per connection it was the bottleneck of a
    churn cell whose client did not pay TIME_WAIT)."""
    s = _server(args)
    print("listening", flush=True)
    s.setblocking(False)
    closed = {"fin": 0, "rst": 0}
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is s:
                ready = []
                while True:
                    try:
                        ready.append(s.accept()[0])
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # (EMFILE, a connection reset before its accept, ...)
                        break
            else:
                key = sel.get_map().get(key.fd)
                if key is None:
                    continue  # settled (and closed) by a b"C" handled before it in this batch
                sel.unregister(key.fileobj)
                ready = [key.fileobj]
            for c in ready:
                if _handle(c, closed, sel) == "quit":
                    return {"stopped": True}


def _handle(c: socket.socket, closed: dict, sel) -> str | None:
    """One accepted connection: its first byte read without waiting (none yet: it waits in `sel`),
    then served by it (see the module's docstring)."""
    try:
        c.setblocking(False)
        head = _first_byte(c, closed)
    except (BlockingIOError, InterruptedError):
        sel.register(c, selectors.EVENT_READ)
        return None
    with c:
        if head is None:
            return None
        try:
            c.setblocking(True)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if head == b"C":
                _settle(closed, sel)
                c.sendall(json.dumps(closed).encode() + b"\n")
                closed.update(fin=0, rst=0)
            elif head == b"S":
                total = 0
                buf = bytearray(CHUNK)
                while n := c.recv_into(buf):
                    total += n
                c.sendall(struct.pack("!Q", total))
            elif head == b"P":
                size = struct.unpack("!I", _recv_exactly(c, 4))[0]
                while True:
                    try:
                        c.sendall(_recv_exactly(c, size))
                    except ConnectionError:
                        break
            elif head == b"Q":
                return "quit"
        except OSError:
            pass
    return None


def _settle(closed: dict, sel) -> None:
    """Before a b"C" answer: the connections accepted before it whose first byte was not there yet
    (a client closes each before it asks), counted as they close (at most 5 s each; one that sends
    a byte instead is not a closed one: closed uncounted)."""
    for key in list(sel.get_map().values()):
        c = key.fileobj
        if c.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            continue  # the listener
        sel.unregister(c)
        with c:
            c.settimeout(5)
            _first_byte(c, closed)


def _first_byte(c: socket.socket, closed: dict) -> bytes | None:
    """The connection's first byte; None when it closed (counted in `closed`: "fin" or "rst") or
    failed. A non-blocking socket with nothing yet raises BlockingIOError."""
    try:
        head = c.recv(1)
    except (BlockingIOError, InterruptedError):
        raise
    except ConnectionResetError:
        closed["rst"] += 1
        return None
    except OSError:
        return None
    if head == b"":
        closed["fin"] += 1
        return None
    return head


def stream(args) -> dict:
    c = _connect(args)
    buf = b"x" * CHUNK
    c.sendall(b"S")
    t0 = time.perf_counter()
    t_end = t0 + args.seconds
    sent = 0
    while time.perf_counter() < t_end:
        for _ in range(16):
            c.sendall(buf)
        sent += 16 * CHUNK
    c.shutdown(socket.SHUT_WR)
    total = struct.unpack("!Q", _recv_exactly(c, 8))[0]
    dt = time.perf_counter() - t0
    c.close()
    if total != sent:
        raise ConnectionError(f"sent {sent} bytes, server counted {total}")
    return {"bytes": total, "seconds": dt, "gbit_s": total * 8 / dt / 1e9}


def pingpong(args) -> dict:
    c = _connect(args)
    msg = b"x" * args.size
    c.sendall(b"P" + struct.pack("!I", args.size))
    clock = time.perf_counter_ns
    rtts = []
    t_end = time.perf_counter() + args.seconds
    while time.perf_counter() < t_end:
        t0 = clock()
        c.sendall(msg)
        _recv_exactly(c, args.size)
        rtts.append(clock() - t0)
    c.close()
    return {"count": len(rtts), "median_us": statistics.median(rtts) / 1000, "mean_us": statistics.fmean(rtts) / 1000}


def _rate(op, seconds: float) -> dict:
    n = 0
    t0 = time.perf_counter()
    t_end = t0 + seconds
    while True:
        for _ in range(32):
            op()
        n += 32
        now = time.perf_counter()
        if now >= t_end:
            return {"ops": n, "seconds": now - t0, "ops_per_s": n / (now - t0)}


def ctl_bind(args) -> dict:
    if args.graft_endpoint:
        import sockgraft

        def op():
            s = sockgraft.socket(sockgraft.AF_GRAFT, socket.SOCK_STREAM)
            s.bind(args.graft_endpoint)
            s.close()
    else:
        def op():
            s = socket.socket()
            s.bind((args.bind, args.port))
            s.close()
    return _rate(op, args.seconds)


def ctl_local(args) -> dict:
    """What no rule matches, in the container: socket+bind([::1]:0)+close (--what bind) or
    socket+connect+accept+close to a listener of this process on [::1] (--what connect; the bench's
    tables have IPv4 rules only, so ::1 stays in the container's netns)."""
    if args.what == "bind":
        def op():
            s = socket.socket(socket.AF_INET6)
            s.bind(("::1", 0))
            s.close()
        return _rate(op, args.seconds)
    srv = socket.socket(socket.AF_INET6)
    srv.bind(("::1", 0))
    srv.listen(64)
    addr = srv.getsockname()[:2]

    def op():  # the accept in the same thread: no scheduling of a second one in the figure
        c = socket.socket(socket.AF_INET6)
        c.connect(addr)
        a, _ = srv.accept()
        c.close()  # the client closes first
        a.close()
    with srv:
        return _rate(op, args.seconds)


def _dialer(args):
    """socket + blocking connect, closed normally by the caller (client first: TIME_WAIT is ours)."""
    if args.graft_source:
        import sockgraft

        return lambda: sockgraft.create_connection((args.connect, args.port), source=args.graft_source)

    def dial():
        c = socket.socket()
        try:
            c.connect((args.connect, args.port))
        except BaseException:
            c.close()
            raise
        return c
    return dial


def _percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in µs."""
    return sorted_ns[min(len(sorted_ns) - 1, max(0, math.ceil(q * len(sorted_ns)) - 1))] / 1000


def ctl_connect(args) -> dict:
    """socket+connect+close for --seconds: operations/s and the latency of socket+connect (p50, p99)."""
    dial = _dialer(args)
    clock = time.perf_counter_ns
    lat = []
    t0 = time.perf_counter()
    t_end = t0 + args.seconds
    while time.perf_counter() < t_end or not lat:
        a = clock()
        c = dial()
        lat.append(clock() - a)
        c.close()
    dt = time.perf_counter() - t0
    lat.sort()
    return {"ops": len(lat), "seconds": dt, "ops_per_s": len(lat) / dt, "connect_p50_us": _percentile(lat, 0.50),
            "connect_p99_us": _percentile(lat, 0.99), "server": _server_closes(dial)}


def churn(args) -> dict:
    """--count x (socket, connect, close), the client closing first; errors counted by errno, not
    fatal. Stops early (counted) after --max-seconds or --max-errors."""
    dial = _dialer(args)
    ok = 0
    errnos: dict[str, int] = {}
    t0 = time.perf_counter()
    deadline = t0 + args.max_seconds
    done = 0
    while done < args.count:
        done += 1
        try:
            c = dial()
        except OSError as e:
            name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
            errnos[name] = errnos.get(name, 0) + 1
            if sum(errnos.values()) >= args.max_errors:
                break
        else:
            c.close()
            ok += 1
        if done % 256 == 0 and time.perf_counter() > deadline:
            break
    dt = time.perf_counter() - t0
    return {"count": args.count, "attempted": done, "ok": ok, "errors": done - ok, "errnos": errnos, "seconds": dt,
            "conns_per_s": ok / dt, "server": _server_closes(dial)}


def _server_closes(dial) -> dict:
    """How the server saw this client's connections close (asked with b"C" on one more connection)."""
    with dial() as c:
        c.settimeout(30)
        c.sendall(b"C")
        line = b""
        while not line.endswith(b"\n"):
            part = c.recv(256)
            if not part:
                raise ConnectionError("server closed before answering C")
            line += part
    return json.loads(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m sockgraft.bench.pypeer", description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=["serve", "stream", "pingpong", "ctl-bind", "ctl-connect", "ctl-local", "churn"])
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--connect")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--what", choices=["bind", "connect"], default="connect", help="ctl-local: which operation")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=14)
    ap.add_argument("--count", type=int, default=1000, help="churn: connections to make")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="churn: stop after this long")
    ap.add_argument("--max-errors", type=int, default=1000, help="churn: stop after this many failed connects")
    ap.add_argument("--graft-endpoint", help="bind by graft endpoint name (graft API)")
    ap.add_argument("--graft-source", help="connect from this graft endpoint (graft API)")
    args = ap.parse_args(argv)
    if args.role in ("stream", "pingpong", "ctl-connect", "churn") and not args.connect:
        ap.error(f"{args.role} needs --connect")
    if args.role != "ctl-local" and not args.port:
        ap.error(f"{args.role} needs --port")
    role = {"serve": serve, "stream": stream, "pingpong": pingpong, "ctl-bind": ctl_bind, "ctl-connect": ctl_connect,
            "ctl-local": ctl_local, "churn": churn}
    try:
        result = role[args.role](args)
    except OSError as e:
        print(f"pypeer {args.role}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
