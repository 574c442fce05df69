"""Egress enforced by the kernel (issue 13, item 1): a grafted socket reaches only what its
container's egress rules (and its fixed-port endpoints) name, on every path a datagram or a
connection can leave by, in every attach mode, whatever the program does after the grant.

A program in a container gets a UDP socket grafted by the egress rule `127.0.0.2/32=ep-out` (api
mode: bound to `ep-out` by name) and tries to reach `127.0.0.3`, which no rule names, with
`sendto`, `sendmsg`, `sendmmsg`, a re-`connect` + `send`, and io_uring's SENDMSG; then grafted TCP
sockets try to connect there (the fd service's connect from `ep-out`, a plain connect and a raw
`connect` syscall on a socket bound to a grafted endpoint). The host counts what arrived at
127.0.0.3: nothing may. What the rules name still works, a grafted UDP server answers its client and
a grafted TCP listener serves. Traffic goes to loopback addresses only."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from sockgraft.modes.registry import MODES as ATTACH_MODES
from tests.helpers import free_port, graft_cmd, stop
from tests.modes.seccomp.test_grafted_egress import _bound as _receiver, _drain  # receivers on host loopback

MODES = [m for m in ("api", "preload", "seccomp") if m in ATTACH_MODES]

PROGRAM = r"""
import ctypes, errno, json, mmap, os, socket, struct, sys
mode = sys.argv[1]
udp_ok, tcp_ok, udp_no, tcp_no = (int(a) for a in sys.argv[2:6])
ALLOWED, BLOCKED = "127.0.0.2", "127.0.0.3"
libc = ctypes.CDLL(None, use_errno=True)
out = {}

def attempt(name, fn):
    try:
        r = fn()
        out[name] = "ok" if r is None or isinstance(r, int) and r >= 0 else r
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))

def check(r):
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r

class SockaddrIn(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16), ("addr", ctypes.c_uint32), ("zero", ctypes.c_char * 8)]

def sockaddr(host, port):
    return SockaddrIn(socket.AF_INET, socket.htons(port), struct.unpack("I", socket.inet_aton(host))[0])

class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(Iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]

class Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]

keep = []
def msghdr(data, host, port):
    buf, sa = ctypes.create_string_buffer(data, len(data)), sockaddr(host, port)
    iov = Iovec(ctypes.addressof(buf), len(data))
    keep.extend([buf, sa, iov])
    return Msghdr(ctypes.addressof(sa), ctypes.sizeof(sa), ctypes.pointer(iov), 1, None, 0, 0)

def sendmmsg(s, host, port):
    vec = (Mmsghdr * 2)(Mmsghdr(msghdr(b"leak sendmmsg 1", host, port), 0), Mmsghdr(msghdr(b"leak sendmmsg 2", host, port), 0))
    n = check(libc.sendmmsg(s.fileno(), vec, 2, 0))
    if n == 0:
        raise OSError(errno.EAGAIN, "nothing sent")

def uring_sendmsg(s, host, port):
    # io_uring by raw syscalls: one IORING_OP_SENDMSG, its completion's result
    params = ctypes.create_string_buffer(120)
    fd = check(libc.syscall(425, 4, params))  # io_uring_setup
    try:
        f = struct.unpack_from("<IIIIIII", params, 0)
        sq_entries, cq_entries = f[0], f[1]
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = struct.unpack_from("<7I", params, 40)
        cq_head, cq_tail, cq_mask, _, _, cqes = struct.unpack_from("<6I", params, 80)
        sq = mmap.mmap(fd, sq_array + 4 * sq_entries, offset=0)
        cq = mmap.mmap(fd, cqes + 16 * cq_entries, offset=0x8000000)
        sqes = mmap.mmap(fd, 64 * sq_entries, offset=0x10000000)
        m = msghdr(b"leak io_uring", host, port)
        keep.append(m)
        sqe = bytearray(64)
        struct.pack_into("<BBHiQQIIQ", sqe, 0, 9, 0, 0, s.fileno(), 0, ctypes.addressof(m), 1, 0, 0x5ca)  # SENDMSG
        sqes[0:64] = bytes(sqe)
        tail = struct.unpack_from("<I", sq, sq_tail)[0]
        struct.pack_into("<I", sq, sq_array + 4 * (tail & struct.unpack_from("<I", sq, sq_mask)[0]), 0)
        struct.pack_into("<I", sq, sq_tail, tail + 1)
        check(libc.syscall(426, fd, 1, 1, 1, None, 0))  # io_uring_enter, GETEVENTS
        head = struct.unpack_from("<I", cq, cq_head)[0]
        mask = struct.unpack_from("<I", cq, cq_mask)[0]
        _data, res, _flags = struct.unpack_from("<QiI", cq, cqes + 16 * (head & mask))
        if res < 0:
            raise OSError(-res, os.strerror(-res))
    finally:
        os.close(fd)

def raw_connect(s, host, port):
    sa = sockaddr(host, port)
    check(libc.syscall(42, s.fileno(), ctypes.byref(sa), ctypes.sizeof(sa)))  # connect, past any wrapper

if mode == "api":
    import sockgraft

def grafted_udp():
    # a UDP socket grafted by the egress rule (api mode: bound to its source endpoint by name)
    if mode == "api":
        u = sockgraft.socket(sockgraft.AF_GRAFT, socket.SOCK_DGRAM)
        u.bind("ep-out")
    else:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"granted", (ALLOWED, udp_ok))
    return u

def grafted_bound_tcp():
    # a TCP socket bound to a grafted endpoint, not connected (api: by name; else: an ingress pair)
    if mode == "api":
        t = sockgraft.socket(sockgraft.AF_GRAFT, socket.SOCK_STREAM)
        t.bind("ep-out")
    else:
        t = socket.socket()
        t.bind(("0.0.0.0", 1))
    t.settimeout(5)
    keep.append(t)
    return t

u = grafted_udp()
attempt("udp sendto", lambda: u.sendto(b"leak sendto", (BLOCKED, udp_no)))
attempt("udp sendmsg", lambda: u.sendmsg([b"leak sendmsg"], [], 0, (BLOCKED, udp_no)))
attempt("udp sendmmsg", lambda: sendmmsg(u, BLOCKED, udp_no))
attempt("udp io_uring sendmsg", lambda: uring_sendmsg(u, BLOCKED, udp_no))
def reconnect():
    u.connect((BLOCKED, udp_no))
    u.send(b"leak connect+send")
attempt("udp connect+send", reconnect)
u2 = grafted_udp()
attempt("udp raw connect+send", lambda: (raw_connect(u2, BLOCKED, udp_no), u2.send(b"leak raw connect+send"))[1])

if mode == "api":
    attempt("tcp connect from ep-out", lambda: keep.append(sockgraft.create_connection((BLOCKED, tcp_no), timeout=5, source="ep-out")))
attempt("tcp connect", lambda: grafted_bound_tcp().connect((BLOCKED, tcp_no)))
def raw_tcp():
    t = grafted_bound_tcp()
    t.setblocking(True)  # the caller sees the connect's outcome
    raw_connect(t, BLOCKED, tcp_no)
attempt("tcp raw connect", raw_tcp)

# what the rule names
if mode == "api":
    attempt("tcp allowed", lambda: keep.append(sockgraft.create_connection((ALLOWED, tcp_ok), timeout=5, source="ep-out")))
else:
    def allowed():
        t = socket.socket(); t.settimeout(5); keep.append(t)
        t.connect((ALLOWED, tcp_ok))
    attempt("tcp allowed", allowed)

# servers on ingress pairs: a UDP server answering its client, a TCP listener
if mode == "api":
    us = sockgraft.create_server("u-in", type=socket.SOCK_DGRAM)
    ts = sockgraft.create_server("t-in")
else:
    us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); us.bind(("0.0.0.0", 9000))
    ts = socket.socket(); ts.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); ts.bind(("0.0.0.0", 8000)); ts.listen()
us.settimeout(20); ts.settimeout(20)
print(json.dumps(out), flush=True)
data, peer = us.recvfrom(100)
us.sendmsg([b"answer to " + data], [], 0, peer)  # sendmsg: no trap in any mode, the kernel judges
c, _ = ts.accept()
c.sendall(b"served")
c.close()
print("done", flush=True)
"""

# what every attempt must give: an error, whatever its errno, and nothing arriving
REFUSED = ["udp sendto", "udp sendmsg", "udp sendmmsg", "udp io_uring sendmsg", "udp connect+send",
           "udp raw connect+send", "tcp connect", "tcp raw connect"]


@pytest.mark.parametrize("mode", MODES)
def test_grafted_sockets_reach_only_what_the_rules_name(mode, tmp_path, state_dir, ns, procs):
    rx = {(a, t): _receiver(a, t) for a in ("127.0.0.2", "127.0.0.3") for t in (socket.SOCK_DGRAM, socket.SOCK_STREAM)}
    port = {k: s.getsockname()[1] for k, s in rx.items()}
    u_port, t_port = free_port(sotype=socket.SOCK_DGRAM), free_port()
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM)
    p = subprocess.Popen([*graft_cmd(), "run", "-n", ns, "--mode", mode,
                          "--endpoint", "ep-out type ipv4 addr 127.0.0.1 port dynamic",
                          "--endpoint", f"u-in type ipv4 addr 127.0.0.1 port {u_port}",
                          "--endpoint", f"t-in type ipv4 addr 127.0.0.1 port {t_port}",
                          "--ingress", "0.0.0.0:9000=u-in", "--ingress", "0.0.0.0:8000=t-in",
                          "--ingress", "0.0.0.0:1=ep-out", "--egress", "127.0.0.2/32=ep-out",
                          "--", "timeout", "120", sys.executable, str(script), mode,
                          str(port["127.0.0.2", socket.SOCK_DGRAM]), str(port["127.0.0.2", socket.SOCK_STREAM]),
                          str(port["127.0.0.3", socket.SOCK_DGRAM]), str(port["127.0.0.3", socket.SOCK_STREAM])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    try:
        line = p.stdout.readline()
        if not line:
            p.wait(30)
            raise AssertionError(f"the program said nothing: {p.stderr.read()}")
        out = json.loads(line)
        # the servers: a host client from 127.0.0.4 (no rule names it) gets the UDP server's answer
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.4", 0))
            client.settimeout(10)
            client.sendto(b"ping", ("127.0.0.1", u_port))
            answer = client.recv(100)
        with socket.create_connection(("127.0.0.1", t_port), timeout=10) as c:
            served = c.recv(100)
        assert p.stdout.readline().strip() == "done", p.stderr.read()
        p.wait(30)
        time.sleep(0.1)  # a datagram sent asynchronously (io_uring) has long arrived by now
        leaked = _drain(rx["127.0.0.3", socket.SOCK_DGRAM])
        connected = _drain(rx["127.0.0.3", socket.SOCK_STREAM])
        granted = _drain(rx["127.0.0.2", socket.SOCK_DGRAM])
        allowed = _drain(rx["127.0.0.2", socket.SOCK_STREAM])
        for c, _ in connected + allowed:
            c.close()
    finally:
        stop(p)
        for s in rx.values():
            s.close()
    print(f"mode {mode}: {json.dumps(out)}; arrived at 127.0.0.3: {len(leaked)} datagrams "
          f"{[d for d, _ in leaked]}, {len(connected)} connections")
    assert [d for d, _ in leaked] == [], out
    assert connected == [], out
    refused = {k: v for k, v in out.items() if k in REFUSED or k == "tcp connect from ep-out"}
    assert "ok" not in refused.values(), out
    if mode == "seccomp":
        assert out["udp io_uring sendmsg"] == "ENOSYS"  # the filter refuses io_uring_setup
    # what the rules name still works, and these sockets were host sockets (source 127.0.0.1)
    assert [(d, a[0]) for d, a in granted] == [(b"granted", "127.0.0.1")] * 2, granted
    assert out["tcp allowed"] == "ok" and len(allowed) == 1 and allowed[0][1][0] == "127.0.0.1"
    assert answer == b"answer to ping" and served == b"served"
