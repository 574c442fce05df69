"""Load: 50 containers x 100 concurrent short connections through ONE seccomp supervisor (the way
graftd serves OCI containers: listeners handed over a unix socket). Every connection must leave by
its own container's endpoint, none may fail, and the supervisor must hold no more fds afterwards."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading


from sockgraft.host import netns
from sockgraft.core.endpoint import parse_endpoint
from sockgraft.host.store import Store
from sockgraft.core.rules import parse_egress
from tests.helpers import wait_for

CONTAINERS = int(os.environ.get("GRAFT_LOAD_CONTAINERS", "50"))
CONNECTIONS = int(os.environ.get("GRAFT_LOAD_CONNECTIONS", "100"))

CONTAINER = r"""
import json, os, socket, sys, threading
from sockgraft.modes.seccomp.attach import install_in_child
from sockgraft.modes.seccomp.bpf import filter_program
agent_path, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.socket(socket.AF_UNIX); c.connect(agent_path)  # before the filter
fd = install_in_child(filter_program().assemble())
socket.send_fds(c, [b"listener"], [fd]); os.close(fd)
assert c.recv(1) == b"g"  # the supervisor has our listener
results, lock = [], threading.Lock()
def one():
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            r = s.recv(64).decode()
    except OSError as e:
        r = f"error {e}"
    with lock:
        results.append(r)
threads = [threading.Thread(target=one) for _ in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(results), flush=True)
"""


def _held_fds() -> int:
    """This process's open fds, but the audit log's: the supervisor opens it at its first line and
    keeps it open (not something it holds for a container)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) != "audit.log":
                n += 1
        except OSError:  # the listing's own fd, gone
            pass
    return n


class Echo:
    """A host loopback server answering each connection with the source address it saw."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, peer = self.sock.accept()
            except OSError:
                return
            try:
                c.sendall(peer[0].encode())
            except OSError:
                pass
            c.close()


def test_fifty_containers_through_one_supervisor(state_dir, make_netns, tmp_path):
    from sockgraft.modes.seccomp.supervisor import Supervisor

    server = Echo()
    names = [make_netns() for _ in range(CONTAINERS)]
    with Store(state_dir) as store:
        for i, name in enumerate(names):
            store.register(name, netns.by_name(name).ino, "seccomp")
            store.add(name, parse_endpoint(f"out type ipv4 addr 127.0.1.{i + 1} port dynamic"))
            store.set_rules(name, [], [parse_egress("127.0.0.1/32=out")])
    sup = Supervisor(state_dir)
    sup.start_thread()
    agent = socket.socket(socket.AF_UNIX)
    agent.bind(str(tmp_path / "agent.sock"))
    agent.listen(CONTAINERS)
    fds_before = _held_fds()
    procs = []
    try:
        for name in names:
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", name, sys.executable, "-c", CONTAINER, str(tmp_path / "agent.sock"),
                 str(server.port), str(CONNECTIONS)], stdout=subprocess.PIPE, text=True))
            conn, _ = agent.accept()
            _msg, fds, _flags, _ = socket.recv_fds(conn, 16, 1)
            sup.add_listener(fds[0], name)
            conn.send(b"g")
            conn.close()
        results = {}
        for name, p in zip(names, procs):
            out, _ = p.communicate(timeout=240)
            results[name] = json.loads(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        agent.close()
    wrong = {name: [r for r in rs if r != f"127.0.1.{i + 1}"] for i, (name, rs) in enumerate(results.items())}
    wrong = {k: v[:3] for k, v in wrong.items() if v}
    total = sum(len(rs) for rs in results.values())
    print(f"{CONTAINERS} containers x {CONNECTIONS} connections: {total} done, {len(wrong)} containers with failures")
    assert total == CONTAINERS * CONNECTIONS and not wrong, wrong
    # every target is gone: the supervisor lets go of all of them
    try:
        wait_for(lambda: _held_fds() <= fds_before, 20, "the supervisor to close what it held")
    finally:
        sup.close()
