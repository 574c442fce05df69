"""The Supervisor as a library, the way an OCI seccomp agent uses it: the listener arrives over a
unix socket (SCM_RIGHTS, as runc sends it to `linux.seccomp.listenerPath`) from a process that is
not our child, and `add_listener` gets no pid."""
from __future__ import annotations

import array
import socket
import subprocess
import sys

from sockgraft.host import netns
from sockgraft.core.endpoint import parse_endpoint
from sockgraft.modes.seccomp.supervisor import Supervisor
from sockgraft.host.store import Store
from sockgraft.core.rules import parse_ingress
from tests.helpers import free_port, wait_port

HELPER = r"""
import array, os, socket, sys
from sockgraft.modes.seccomp.attach import install_in_child
from sockgraft.modes.seccomp.bpf import filter_program
c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])  # before the filter: connect is trapped
fd = install_in_child(filter_program().assemble())
c.sendmsg([b"listener"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
os.close(fd); c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000)); s.listen(); s.settimeout(60)
print("bound", s.getsockname(), flush=True)
a, _ = s.accept(); a.sendall(b"agent ok"); a.close()
"""


def test_listener_from_a_foreign_process(state_dir, ns, tmp_path, procs):
    port = free_port()
    key = ns
    with Store(state_dir) as store:
        store.register(key, netns.by_name(ns).ino, "seccomp")
        store.add(key, parse_endpoint(f"web type ipv4 addr 127.0.0.1 port {port}"))
        store.set_rules(key, [parse_ingress("0.0.0.0:8000=web")], [])
    sup = Supervisor(state_dir)
    sup.start_thread()
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()
    try:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", HELPER, path],
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        conn, _ = srv.accept()
        fds = array.array("i")
        _msg, anc, _flags, _addr = conn.recvmsg(16, socket.CMSG_SPACE(4))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:4])
        conn.close()
        sup.add_listener(fds[0], key)  # no pid: the store gives the container's netns
        assert p.stdout.readline().startswith("bound ('0.0.0.0', 8000)")
        wait_port("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            # wait_port's probe took the first accept; this is the second, unanswered one
            pass
        assert p.wait(10) == 0
    finally:
        srv.close()
        sup.close()
