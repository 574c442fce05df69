"""The bind guard: the kernel refuses bind() on a socket that carries a container's mark and has no
port, and lets a socket handed over unbound (UNBOUND_TAG) bind only to its container's endpoints."""
import errno
import os
import socket
import subprocess
import sys

import pytest

from sockgraft.core.engine import GRANT, Decision
from sockgraft.core.tables import MARK_TAG, UNBOUND_TAG
from sockgraft.host import bindguard, ebpf, hostsock

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching a cgroup BPF program needs root")


@pytest.fixture(scope="module", autouse=True)
def guard():
    bindguard.ensure()


def test_the_programs_are_whole_and_end_in_exit():
    for attach_type in bindguard.NAMES:
        code = bindguard.program(attach_type, 3)
        assert len(code) % 8 == 0 and code.endswith(bytes([0x95]) + bytes(7))


def test_map_keys_name_an_ipv4_endpoint_by_its_v4_mapped_form():
    k4 = bindguard.key(MARK_TAG | 7, "127.0.0.1", 8080)
    assert len(k4) == bindguard.KEY_SIZE and k4 == bindguard.key(MARK_TAG | 7, "::ffff:127.0.0.1", 8080)
    assert k4[4:6] == (8080).to_bytes(2, "big") and k4 != bindguard.key(MARK_TAG | 8, "127.0.0.1", 8080)


def test_ensure_attaches_one_copy_of_each():
    bindguard.ensure()
    bindguard.ensure()
    assert bindguard.active()
    cg = os.open(ebpf.cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert [len(bindguard._attached(cg, t)) for t in bindguard.NAMES] == [1, 1]
    finally:
        os.close(cg)


@pytest.mark.parametrize("family,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_a_marked_no_port_socket_cannot_be_bound_again(family, addr):
    """The re-bind attack of KERNEL-NOTES: a socket bound with IP_BIND_ADDRESS_NO_PORT, then marked,
    cannot be re-bound anywhere; an unmarked one still can (nothing else is judged)."""
    for mark, expect in ((MARK_TAG | 7, errno.EPERM), (0, None), (0x1234_0007, None)):
        with socket.socket(family) as s:
            s.setsockopt(socket.IPPROTO_IP, hostsock.IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((addr, 0))
            if mark:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            other = "127.0.0.2" if family == socket.AF_INET else "::1"
            if expect is None:
                s.bind((other, 0))
            else:
                with pytest.raises(OSError) as e:
                    s.bind((other, 29999))
                assert e.value.errno == expect


def test_the_product_binds_before_it_marks():
    d = Decision(GRANT, None, socket.AF_INET, ("127.0.0.1", 0), mark=MARK_TAG | 9)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        s, code = hostsock.open_connecting(d, socket.SOCK_STREAM, 0, srv.getsockname())
        with s:
            assert code in (0, errno.EINPROGRESS)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == MARK_TAG | 9
        with hostsock.open_bound(d, socket.SOCK_DGRAM) as u:
            assert u.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == MARK_TAG | 9
            with pytest.raises(OSError) as e:
                u.bind(("127.0.0.2", 0))
            assert e.value.errno in (errno.EPERM, errno.EINVAL)


def test_detach_and_attach_again_from_the_command_line():
    py = [sys.executable, "-m", "sockgraft.host.bindguard"]
    try:
        out = subprocess.run(py + ["detach"], capture_output=True, text=True, timeout=30)
        assert (out.returncode, out.stdout.strip()) == (0, "detached")
        assert not bindguard.active()
        cg = os.open(ebpf.cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert [len(bindguard._attached(cg, t)) for t in bindguard.NAMES] == [0, 0]
        finally:
            os.close(cg)
    finally:
        out = subprocess.run(py + ["attach"], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout.strip()) == (0, "attached")
    bad = subprocess.run(py + ["frob"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "usage" in bad.stderr


OWNER = b"test-own"


def _unbound(family: int, mark: int, v6only: int | None = None) -> socket.socket:
    s = socket.socket(family)
    if v6only is not None:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    return s


@pytest.fixture()
def granted():
    """Container 7's endpoints in the map: 127.0.0.1:P (fixed), 127.0.0.1 dynamic, [::1]:P+1."""
    from tests.helpers import free_port

    port = free_port()
    keys = {bindguard.key(MARK_TAG | 7, "127.0.0.1", port), bindguard.key(MARK_TAG | 7, "127.0.0.1", 0),
            bindguard.key(MARK_TAG | 7, "::1", port + 1)}
    bindguard.sync(OWNER, keys)
    try:
        yield port
    finally:
        bindguard.sync(OWNER, set())


def _bind(s: socket.socket, where: tuple):
    try:
        s.bind(where)
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    except OSError as e:
        return errno.errorcode[e.errno]


def test_an_unbound_socket_binds_only_to_its_containers_endpoints_and_is_marked_then(granted):
    """The attack: a socket handed over unbound for a bind, aimed elsewhere - another port, another
    address, another container's endpoint, a wildcard - is refused; its own endpoints are allowed
    and the socket then carries its container's mark (what the egress table judges)."""
    port = granted
    cases = [
        (socket.AF_INET, UNBOUND_TAG | 7, None, ("127.0.0.1", port), MARK_TAG | 7),
        (socket.AF_INET, UNBOUND_TAG | 7, None, ("127.0.0.1", 0), MARK_TAG | 7),  # the dynamic endpoint
        (socket.AF_INET6, UNBOUND_TAG | 7, None, ("::1", port + 1), MARK_TAG | 7),
        (socket.AF_INET6, UNBOUND_TAG | 7, 0, ("::ffff:127.0.0.1", port), MARK_TAG | 7),  # dual-stack, v4-mapped
        (socket.AF_INET, UNBOUND_TAG | 7, None, ("127.0.0.1", port + 2), "EPERM"),
        (socket.AF_INET, UNBOUND_TAG | 7, None, ("127.0.0.2", port), "EPERM"),
        (socket.AF_INET, UNBOUND_TAG | 7, None, ("0.0.0.0", port), "EPERM"),
        (socket.AF_INET, UNBOUND_TAG | 8, None, ("127.0.0.1", port), "EPERM"),  # another container's
        (socket.AF_INET6, UNBOUND_TAG | 7, None, ("::1", port), "EPERM"),
        (socket.AF_INET6, UNBOUND_TAG | 7, 0, ("::", port + 1), "EPERM"),
        (socket.AF_INET, MARK_TAG | 7, None, ("127.0.0.1", port), "EPERM"),  # marked unbound: never
        (socket.AF_INET, 0, None, ("127.0.0.1", 0), 0),  # not ours: not judged
    ]
    for family, mark, v6only, where, expect in cases:
        with _unbound(family, mark, v6only) as s:
            assert _bind(s, where) == expect, (hex(mark), where)


def test_a_failed_bind_leaves_a_socket_that_cannot_be_bound_elsewhere(granted):
    """Granted, but the port is taken: the bind fails as natively (EADDRINUSE) and the socket, marked
    by then, can never be bound again (not even to another endpoint of its container)."""
    port = granted
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with _unbound(socket.AF_INET, UNBOUND_TAG | 7) as s:
            assert _bind(s, ("127.0.0.1", port)) == "EADDRINUSE"
            assert _bind(s, ("127.0.0.1", 0)) == "EPERM"


def test_the_grants_follow_the_map(granted):
    port = granted
    keys = {bindguard.key(MARK_TAG | 7, "127.0.0.1", port)}
    assert bindguard.holds(OWNER, keys) and not bindguard.holds(b"other-st", keys)
    bindguard.sync(OWNER, set())  # revoked: refused from the next bind on
    assert not bindguard.holds(OWNER, keys)
    with _unbound(socket.AF_INET, UNBOUND_TAG | 7) as s:
        assert _bind(s, ("127.0.0.1", port)) == "EPERM"
    bindguard.sync(b"other-st", keys)  # another store's entries are left alone by this one's sync
    try:
        bindguard.sync(OWNER, set())
        assert bindguard.holds(b"other-st", keys)
    finally:
        bindguard.sync(b"other-st", set())
