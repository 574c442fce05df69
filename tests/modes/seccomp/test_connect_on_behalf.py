"""An egress grant on connect carried out as the kernel does a plain connect (hostsock.open_connecting):
the source port chosen at connect time (TIME_WAIT reused under client-first-close churn), the app's
connect semantics kept (blocking, non-blocking + poll + SO_ERROR, SO_SNDTIMEO, refused, unreachable),
and the handed socket never re-bindable nor re-aimable."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import stop
from tests.modes.seccomp.util import client_egress, run

SERVER = r"""
import selectors, socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0)); l.listen(4096); l.setblocking(False)
print(l.getsockname()[1], flush=True)
sel = selectors.DefaultSelector(); sel.register(l, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is l:
            while True:
                try:
                    c, _ = l.accept()
                except BlockingIOError:
                    break
                c.setblocking(False); sel.register(c, selectors.EVENT_READ)
        else:  # closed only after the client closed: TIME_WAIT stays on the client's side
            c = key.fileobj
            try:
                data = c.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(c); c.close()
"""

CHURN = r"""
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
errors = {}
t = time.monotonic()
for _ in range(n):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", port))
    except OSError as e:
        errors[e.errno] = errors.get(e.errno, 0) + 1
    s.close()
print(n / (time.monotonic() - t), sum(errors.values()), errors)
"""


def test_client_first_close_churn(state_dir, ns):
    """30,000 x (socket, connect, close by the client first) through a dynamic endpoint: 0 errors.
    (With bind(addr, 0) before connect the same churn ran out of ports: EADDRINUSE by thousands.)"""
    srv = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = srv.stdout.readline().strip()
        # the source is 127.0.0.2: the ~28,000 TIME_WAIT sockets left for a minute must not stand in
        # the way of other tests' bind(("127.0.0.1", 0))
        r = run(ns, [sys.executable, "-c", CHURN, port, "30000"], timeout=600,
                endpoints=["out type ipv4 addr 127.0.0.2 port dynamic"], egress=["127.0.0.1/32=out"])
        rate, errors, detail = r.stdout.split(maxsplit=2)
        print(f"churn through seccomp: {float(rate):.0f} connections/s, errors {errors} {detail}")
        assert int(errors) == 0, r.stdout
    finally:
        stop(srv)


SEMANTICS = r"""
import errno, select, socket, struct, sys, time
port, closed, bh = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def name(e):
    return errno.errorcode.get(e, str(e))

# blocking
s = socket.socket(); s.connect(("127.0.0.1", port)); print("blocking", s.getsockname()[0])
try:
    s.bind(("127.0.0.2", 29999)); print("rebind OK")
except OSError as e:
    print("rebind", name(e.errno))
try:
    s.connect(("127.0.0.2", port)); print("reaim OK")
except OSError as e:
    print("reaim", name(e.errno))
s.close()

# non-blocking + poll + SO_ERROR
s = socket.socket(); s.setblocking(False)
code = s.connect_ex(("127.0.0.1", port))
p = select.poll(); p.register(s, select.POLLOUT); p.poll(5000)
print("nonblocking", name(code) if code else 0, s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
s.close()

# refused, blocking
s = socket.socket()
try:
    s.connect(("127.0.0.1", closed)); print("refused OK")
except OSError as e:
    print("refused", name(e.errno))
s.close()

# refused, non-blocking: the socket is handed over connecting, fails, and still cannot be re-bound
s = socket.socket(); s.setblocking(False)
code = s.connect_ex(("127.0.0.1", closed))
p = select.poll(); p.register(s, select.POLLOUT); p.poll(5000)
err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if code == errno.EINPROGRESS else code
try:
    s.bind(("127.0.0.2", 29998)); rebind = "OK"
except OSError as e:
    rebind = name(e.errno)
print("refused-nonblocking", name(err), rebind)
s.close()

# SO_SNDTIMEO on a blackholed destination (nobody answers ARP in the test's netns)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("=qq", 0, 500000))
t = time.monotonic()
try:
    s.connect((bh, 80)); print("sndtimeo connected")
except OSError as e:
    print("sndtimeo", name(e.errno), round(time.monotonic() - t, 1))
s.close()

# unreachable, blocking, no timeout: the neighbour never answers
s = socket.socket()
try:
    s.connect((bh, 80)); print("unreachable connected")
except OSError as e:
    print("unreachable", name(e.errno))
s.close()
"""


def _blackhole(make_netns) -> tuple[str, str, str]:
    """A veth from the host into a netns of the test whose end is down: its address never answers
    ARP. Returns (host address, blackholed address, host-side link name)."""
    other = make_netns()
    n = os.getpid() % 250
    host_if, peer_if = f"sgbh{n}a", f"sgbh{n}b"
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)
    subprocess.run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", other], check=True)
    subprocess.run(["ip", "addr", "add", f"10.237.{n}.1/30", "dev", host_if], check=True)
    subprocess.run(["ip", "link", "set", host_if, "up"], check=True)
    subprocess.run(["ip", "-n", other, "addr", "add", f"10.237.{n}.2/30", "dev", peer_if], check=True)
    return f"10.237.{n}.1", f"10.237.{n}.2", host_if


def test_connect_semantics_on_behalf(state_dir, ns, make_netns):
    import socket

    host_addr, bh, link = _blackhole(make_netns)
    try:
        with socket.socket() as srv, socket.socket() as gone:
            srv.bind(("127.0.0.1", 0))
            srv.listen(64)
            gone.bind(("127.0.0.1", 0))  # a port nobody listens on (held: nobody takes it meanwhile)
            args = [sys.executable, "-c", SEMANTICS, str(srv.getsockname()[1]), str(gone.getsockname()[1]), bh]
            r = run(ns, args, timeout=60,
                    endpoints=["out type ipv4 addr 127.0.0.1 port dynamic", f"bh type ipv4 addr {host_addr} port dynamic"],
                    egress=["127.0.0.0/8=out", f"{bh}/32=bh"])
        lines = r.stdout.splitlines()
        assert lines[0] == "blocking 127.0.0.1", lines  # a host socket: the endpoint's source
        assert lines[1] == "rebind EINVAL", lines
        assert lines[2] == "reaim EISCONN", lines
        assert lines[3] == "nonblocking EINPROGRESS 0", lines
        assert lines[4] == "refused ECONNREFUSED", lines
        # the re-bind is refused: EINVAL from the Python handler (a grafted socket), or EPERM from the
        # kernel's bind guard where the C loop lets a bind no pair matches run without looking at
        # the socket (pools on: seccomp_fast.c serve_unopened)
        assert lines[5] in ("refused-nonblocking ECONNREFUSED EINVAL", "refused-nonblocking ECONNREFUSED EPERM"), lines
        word, err, seconds = lines[6].split()
        assert (word, err) == ("sndtimeo", "EINPROGRESS") and 0.4 <= float(seconds) <= 2.0, lines
        assert lines[7] == "unreachable EHOSTUNREACH", lines
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
