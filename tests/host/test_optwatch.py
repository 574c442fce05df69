"""host/optwatch.py: the cgroup setsockopt program notes, per socket outside the host's netns, which
of COPIED_OPTIONS it was given; it changes nothing of the call."""
from __future__ import annotations

import os
import socket
import struct
import threading

from sockgraft.core.tables import COPIED_OPTIONS
from sockgraft.host import ebpf, netns, optwatch


def bit(name: str) -> int:
    return 1 << [o.name for o in COPIED_OPTIONS].index(name)


def in_netns(path: str, make):
    """make() run in a thread that entered the netns at `path` (its sockets are that netns')."""
    out, fd = {}, os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def body():
        try:
            netns.setns(fd)
            out["v"] = make()
        except BaseException as e:  # re-raised in the test's thread
            out["e"] = e
    try:
        t = threading.Thread(target=body)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "e" in out:
        raise out["e"]
    return out["v"]


def test_the_program_matches_every_copied_option_and_assembles():
    code = optwatch.program(3, 0x1234_5678_9ABC)
    assert len(code) % 8 == 0
    # a compare of the level and of the name, a 16-byte constant and a jump per option
    assert len(code) // 8 >= 5 * len(COPIED_OPTIONS)
    assert len(COPIED_OPTIONS) <= 64  # a bit each


def test_options_set_in_a_container_netns_are_noted(ns):
    optwatch.ensure()
    optwatch.ensure()  # once
    with ebpf.cgroup(None) as cg:
        assert len(ebpf.attached(cg, optwatch.SETSOCKOPT, optwatch.NAME)) == 1
    w = optwatch.Watch()
    try:
        assert w.current() >= 0

        def make():
            s = socket.socket()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not a copied option: not noted
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 32)
            # longer than a page: the program may read only a page of it, the call goes on as made
            big = socket.socket()
            big.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, struct.pack("i", 50000) + b"\0" * 5000)
            return s, u, socket.socket(), big
        s, u, fresh, big = in_netns(f"/run/netns/{ns}", make)
        with s, u, fresh, big:
            assert w.options_set(s.fileno()) == bit("TCP_NODELAY") | bit("SO_KEEPALIVE") | bit("SO_RCVBUF")
            assert w.options_set(u.fileno()) == bit("IPV6_TCLASS")
            assert w.options_set(fresh.fileno()) == 0
            assert w.options_set(big.fileno()) == bit("SO_SNDBUF")
            # the calls took effect with the caller's values
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 65536
            assert u.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS) == 32
            assert big.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 50000
        with socket.socket() as h:  # the host's own sockets are not watched
            h.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert w.options_set(h.fileno()) == 0
            assert h.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        w.close()


def test_a_watch_whose_program_went_reads_every_option_again(ns):
    """Replaced (detached and attached anew: another map), the old map is no longer used."""
    w = optwatch.Watch()
    try:
        assert w.current() >= 0
        optwatch.remove()
        optwatch.ensure()
        w.checked -= 2  # its once-a-second look is due
        assert w.current() == -1
        s = in_netns(f"/run/netns/{ns}", socket.socket)
        with s:
            assert w.options_set(s.fileno()) is None  # not known: every option is read back
    finally:
        w.close()
    assert optwatch.active()


def test_status_attach_detach_from_a_shell():
    assert optwatch.main(["status"]) == 0
    assert optwatch.main(["frobnicate"]) == 2
