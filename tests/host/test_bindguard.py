"""The bind guard: the kernel refuses bind() on a socket that carries a container's mark."""
import errno
import os
import socket
import subprocess
import sys

import pytest

from sockgraft.core.engine import GRANT, Decision
from sockgraft.core.tables import MARK_TAG
from sockgraft.host import bindguard, hostsock

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching a cgroup BPF program needs root")


@pytest.fixture(scope="module", autouse=True)
def guard():
    bindguard.ensure()


def test_the_program_judges_the_mark_under_the_tag_only():
    code = bindguard.program()
    assert len(code) % 8 == 0 and code.endswith(bytes([0x95]) + bytes(7))


def test_ensure_attaches_one_copy_of_each():
    bindguard.ensure()
    bindguard.ensure()
    assert bindguard.active()
    cg = os.open(bindguard._cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
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
        cg = os.open(bindguard._cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert [len(bindguard._attached(cg, t)) for t in bindguard.NAMES] == [0, 0]
        finally:
            os.close(cg)
    finally:
        out = subprocess.run(py + ["attach"], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout.strip()) == (0, "attached")
    bad = subprocess.run(py + ["frob"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "usage" in bad.stderr
