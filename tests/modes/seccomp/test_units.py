"""Pure parts of seccomp mode: the BPF program, struct packing, sockaddr decoding."""
from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from hypothesis import given, strategies as st

from sockgraft.modes.seccomp import bpf
from sockgraft.modes.seccomp import kernel as K

PROG = bpf.filter_program().assemble()
NR = K.SYS


def verdict(nr, args=(), arch=K.AUDIT_ARCH_X86_64):
    return bpf.run(PROG, bpf.seccomp_data(nr, args, arch))


def test_traps_the_decisions():
    for name in ("bind", "connect", "getsockname"):
        assert verdict(NR[name]) == bpf.RET_USER_NOTIF


def test_sendto_only_with_a_destination():
    assert verdict(NR["sendto"], (3, 0x1000, 10, 0, 0, 0)) == bpf.RET_ALLOW  # send()
    assert verdict(NR["sendto"], (3, 0x1000, 10, 0, 0x7FFF0000, 16)) == bpf.RET_USER_NOTIF
    assert verdict(NR["sendto"], (3, 0x1000, 10, 0, 1 << 40, 16)) == bpf.RET_USER_NOTIF  # high half


def test_socket_ioctls_only():
    assert verdict(NR["ioctl"], (3, 0x8912)) == bpf.RET_USER_NOTIF  # SIOCGIFCONF
    assert verdict(NR["ioctl"], (3, 0x894C)) == bpf.RET_USER_NOTIF  # SIOCGSKNS
    assert verdict(NR["ioctl"], (3, 0xFFFFFFFF00008912)) == bpf.RET_USER_NOTIF  # cmd is 32 bits
    assert verdict(NR["ioctl"], (1, 0x5401)) == bpf.RET_ALLOW  # TCGETS
    assert verdict(NR["ioctl"], (3, 0x541B)) == bpf.RET_ALLOW  # FIONREAD


def test_setsockopt_bindtodevice_only():
    assert verdict(NR["setsockopt"], (3, 1, 25)) == bpf.RET_USER_NOTIF
    assert verdict(NR["setsockopt"], (3, 1, 62)) == bpf.RET_USER_NOTIF
    assert verdict(NR["setsockopt"], (3, 1, 2)) == bpf.RET_ALLOW  # SO_REUSEADDR
    assert verdict(NR["setsockopt"], (3, 6, 25)) == bpf.RET_ALLOW  # IPPROTO_TCP, 25


def test_io_uring_x32_and_foreign_arch():
    assert verdict(NR["io_uring_setup"]) == bpf.RET_ERRNO | errno.ENOSYS
    assert verdict(K.X32_SYSCALL_BIT | NR["bind"]) == bpf.RET_ERRNO | errno.ENOSYS
    assert verdict(102, arch=0x40000003) == bpf.RET_KILL_PROCESS  # i386 socketcall
    assert verdict(NR["bind"], arch=0xC00000B7) == bpf.RET_KILL_PROCESS  # aarch64


@given(st.integers(0, 460))
def test_everything_else_allowed(nr):
    if nr in (NR["bind"], NR["connect"], NR["getsockname"], NR["sendto"], NR["ioctl"], NR["setsockopt"],
              NR["io_uring_setup"]):
        return
    assert verdict(nr, (3, 0x8912, 25, 0, 1, 0)) == bpf.RET_ALLOW


def test_assembler_rejects_backward_and_undefined_jumps():
    p = bpf.Program().label("top").ld(0).jeq(1, "top").ret(0)
    with pytest.raises(ValueError):
        p.assemble()
    with pytest.raises(ValueError):
        bpf.Program().jeq(1, "nowhere").ret(0).assemble()


u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)


@given(u64, u32, u32, st.integers(-2**31, 2**31 - 1), u32, u64, st.tuples(u64, u64, u64, u64, u64, u64))
def test_notif_roundtrip(nid, pid, flags, nr, arch, ip, args):
    n = K.Notif(nid, pid, flags, nr, arch, ip, args)
    raw = n.pack()
    assert len(raw) == K.NOTIF_SIZE and K.Notif.unpack(raw) == n
    assert struct.unpack_from("=Q", raw)[0] == nid and struct.unpack_from("=6Q", raw, 32) == args


@given(u64, st.integers(-2**63, 2**63 - 1), st.integers(0, 4095))
def test_resp_packing(nid, val, err):
    raw = K.pack_resp(nid, val, err, K.SECCOMP_USER_NOTIF_FLAG_CONTINUE)
    assert len(raw) == 24
    assert struct.unpack("=QqiI", raw) == (nid, val, -err, 1)


def test_addfd_packing():
    raw = K.pack_addfd(7, 5, 3, K.SECCOMP_ADDFD_FLAG_SETFD, 0o2000000)
    assert struct.unpack("=QIIII", raw) == (7, 1, 5, 3, 0o2000000)


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@given(ipv4, ports)
def test_sockaddr_in_roundtrip(addr, port):
    raw = K.encode_sockaddr(socket.AF_INET, addr, port)
    assert len(raw) == 16
    assert K.decode_sockaddr(raw) == (socket.AF_INET, addr, port)
    # the same bytes the kernel/libc would build
    assert raw[2:8] == struct.pack("!H", port) + socket.inet_aton(addr)


@given(ipv6, ports, u32, u32)
def test_sockaddr_in6_roundtrip(addr, port, flow, scope):
    raw = K.encode_sockaddr(socket.AF_INET6, addr, port, flow, scope)
    assert len(raw) == 28
    fam, a, p = K.decode_sockaddr(raw)
    assert (fam, p) == (socket.AF_INET6, port)
    assert socket.inet_pton(socket.AF_INET6, a) == socket.inet_pton(socket.AF_INET6, addr)
    assert K.decode_sockaddr(raw[:24])[2] == port  # RFC 2133 length without scope id


@given(st.binary(max_size=40))
def test_decode_never_crashes(raw):
    try:
        fam, addr, port = K.decode_sockaddr(raw)
    except K.BadSockaddr:
        return
    assert fam in (socket.AF_INET, socket.AF_INET6) and 0 <= port <= 65535
    assert len(raw) >= (16 if fam == socket.AF_INET else 24)


@given(ipv4, ports, ports)
def test_with_port(addr, p1, p2):
    raw = K.encode_sockaddr(socket.AF_INET, addr, p1)
    assert K.decode_sockaddr(K.with_port(raw, p2)) == (socket.AF_INET, addr, p2)


def test_decode_rejects_short_and_foreign():
    with pytest.raises(K.BadSockaddr):
        K.decode_sockaddr(b"\x02\x00")
    with pytest.raises(K.BadSockaddr):
        K.decode_sockaddr(struct.pack("=H", socket.AF_UNIX) + b"/tmp/x\0")


def test_other_architectures_refused(monkeypatch):
    import platform

    from sockgraft.core.endpoint import SpecError
    from sockgraft.modes.seccomp.attach import SeccompAttach

    K.check_arch()  # this machine: x86_64
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(K.UnsupportedArch, match="x86_64 only"):
        K.check_arch()
    with pytest.raises(SpecError, match="x86_64 only"):
        SeccompAttach(None).prepare()


# -- the filter a container's table needs (core.tables.trapped_for) ------------------------------
def verdict_of(trapped, nr, args=()):
    return bpf.run(bpf.filter_program(trapped).assemble(), bpf.seccomp_data(nr, args))


def test_empty_table_traps_nothing():
    from sockgraft.core.tables import trapped_for

    t = trapped_for(endpoints=False, ingress=False)
    for name in ("bind", "connect", "getsockname", "ioctl", "setsockopt"):
        assert verdict_of(t, NR[name], (3, 0x8912, 1, 25)) == bpf.RET_ALLOW, name
    assert verdict_of(t, NR["sendto"], (3, 0x1000, 10, 0, 0x7FFF0000, 16)) == bpf.RET_ALLOW
    assert verdict_of(t, NR["io_uring_setup"]) == bpf.RET_ERRNO | errno.ENOSYS  # always refused


def test_egress_only_leaves_getsockname_untrapped():
    from sockgraft.core.tables import trapped_for

    t = trapped_for(endpoints=True, ingress=False)
    assert verdict_of(t, NR["getsockname"]) == bpf.RET_ALLOW
    for name in ("bind", "connect"):  # bind: the guard of a grafted socket whose connect failed
        assert verdict_of(t, NR[name]) == bpf.RET_USER_NOTIF, name
    assert verdict_of(t, NR["sendto"], (3, 0x1000, 10, 0, 0x7FFF0000, 16)) == bpf.RET_USER_NOTIF
    assert verdict_of(t, NR["sendto"], (3, 0x1000, 10, 0, 0, 0)) == bpf.RET_ALLOW
    assert verdict_of(t, NR["ioctl"], (3, 0x8912)) == bpf.RET_USER_NOTIF
    assert verdict_of(t, NR["io_uring_setup"]) == bpf.RET_ERRNO | errno.ENOSYS


def test_ingress_traps_everything():
    from sockgraft.core.tables import TRAPPED, trapped_for

    t = trapped_for(endpoints=True, ingress=True)
    assert dict(t) == dict(TRAPPED)
    assert bpf.filter_program(t).assemble() == PROG


def test_views_of_grafted_binds_stay_bounded():
    """A target whose program binds and closes grafted sockets over and over keeps the views of the
    live ones only (Target.bound prunes the closed ones whenever `views` doubles)."""
    from sockgraft.modes.seccomp.targets import VIEWS_MIN, Target

    t = Target(-1, "k", None)
    keep = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    keep.bind(("127.0.0.1", 0))
    listening = socket.socket(socket.AF_INET6)
    listening.bind(("::1", 0))
    listening.listen()
    with keep, listening:
        t.bound(os.fstat(keep.fileno()).st_ino, keep.getsockname(), b"kept")
        t.bound(os.fstat(listening.fileno()).st_ino, listening.getsockname()[:2], b"listening")
        for i in range(3 * VIEWS_MIN):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if i % 2 else socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                if not i % 2:
                    s.listen()
                t.bound(os.fstat(s.fileno()).st_ino, s.getsockname(), b"v")
            assert len(t.views) <= VIEWS_MIN + 2
        # the live sockets' views are kept
        assert t.views[os.fstat(keep.fileno()).st_ino] == b"kept"
        assert t.views[os.fstat(listening.fileno()).st_ino] == b"listening"
