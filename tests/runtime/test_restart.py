"""graftd restarts (kill -9, SIGTERM) while a runc container (seccomp through graft-runtime) runs:
the listener keeper holds the container's seccomp listener, the new graftd adopts it, and the
container's own running process keeps being grafted: a new connect and a new bind after the
restart are served, and a call made while no graftd ran waits in the kernel and completes after the
restart (it used to fail with ENOSYS). Afterwards: no keeper, no fds, no socket left."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from sockgraft.runtime import keeper, ociconfig
from tests.helpers import free_port, graftd as start_graftd, stop, wait_for
from tests.runtime.common import PAGE, Graftd, HostServer, http_get
from tests.runtime.conftest import container_id
from tests.runtime.test_runc import make_bundle, runtime

pytestmark = pytest.mark.e2e

# the container's one long-lived shell makes every call on demand (a file the test drops in its
# rootfs), so the calls after a restart come from a process whose listener the old graftd received
SCRIPT = """
n=0
while :; do
  if [ -e /tmp/go-connect ]; then n=$((n+1)); rm /tmp/go-connect
     echo hello-$n | nc 127.0.0.1 {server}; echo $? >/tmp/connect.rc.tmp; mv /tmp/connect.rc.tmp /tmp/connect.rc; fi
  if [ -e /tmp/go-bind ]; then p=$(cat /tmp/go-bind); rm /tmp/go-bind
     httpd -p 0.0.0.0:$p -h /www; echo $? >/tmp/bind.rc.tmp; mv /tmp/bind.rc.tmp /tmp/bind.rc; fi
  sleep 0.05
done
"""


class Box:
    """One detached runc container through graft-runtime that makes calls when asked."""

    def __init__(self, tmp_path, rootfs, g: Graftd, server: HostServer):
        self.g, self.server = g, server
        self.root = str(tmp_path / "runc-root")
        self.port1, self.port2 = free_port(), free_port()
        ann = {"io.sockgraft.endpoints": (f"h1 type ipv4 addr 127.0.0.1 port {self.port1}; "
                                          f"h2 type ipv4 addr 127.0.0.1 port {self.port2}; "
                                          "out type ipv4 addr 127.0.0.1 port dynamic"),
               "io.sockgraft.ingress": "0.0.0.0:8081=h1 0.0.0.0:8082=h2",
               "io.sockgraft.egress": "127.0.0.1/32=out"}
        self.bundle = make_bundle(tmp_path, rootfs, ["sh", "-c", SCRIPT.format(server=server.port)], ann)
        self.rootfs = os.path.join(self.bundle, "rootfs")
        self.cid = container_id()
        self.key = f"graft-oci-{self.cid}"
        self.binds = 0
        self.created = False

    def start(self) -> None:
        runtime(self.g, self.root, "run", "-d", "-b", self.bundle, self.cid)
        self.created = True
        wait_for(lambda: self.g.graftd_view()["seccomp_listeners"].get(self.key) == 1, 15, "graftd to supervise it")

    def _rc(self, name: str, timeout: float) -> int:
        path = os.path.join(self.rootfs, "tmp", name)
        wait_for(lambda: os.path.exists(path), timeout, f"the container's {name}")
        rc = int(open(path).read())
        os.unlink(path)
        return rc

    def ask_connect(self) -> None:
        open(os.path.join(self.rootfs, "tmp", "go-connect"), "w").close()

    def connect_done(self, n: int, timeout: float = 20) -> None:
        """The n-th connect: nc exited 0 and its line reached the host server from 127.0.0.1."""
        assert self._rc("connect.rc", timeout) == 0
        wait_for(lambda: len(self.server.received) >= n, 10, "the line at the host server")
        peer, data = self.server.received[n - 1]
        assert data == f"hello-{n}\n".encode() and peer[0] == "127.0.0.1"

    def bind(self) -> None:
        """A new grafted bind: httpd on the next container port, served on its host port."""
        self.binds += 1
        cport, hport = (8081, self.port1) if self.binds == 1 else (8082, self.port2)
        tmp = os.path.join(self.rootfs, "tmp", "go-bind.tmp")
        with open(tmp, "w") as f:
            f.write(str(cport))
        os.rename(tmp, os.path.join(self.rootfs, "tmp", "go-bind"))
        assert self._rc("bind.rc", 20) == 0
        assert http_get(hport) == PAGE

    def delete(self) -> None:
        if self.created:
            runtime(self.g, self.root, "delete", "--force", self.cid, check=False)
            self.created = False


def keeper_pid(g: Graftd) -> int | None:
    held = keeper.listing(g.runtime)
    return held["pid"] if held else None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def debris(runtime_dir: str) -> None:
    """What a killed keeper leaves: its socket file, bound by nobody."""
    os.makedirs(runtime_dir, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(keeper.socket_path(runtime_dir))
    s.close()


@pytest.mark.parametrize("with_debris", [False, True], ids=["clean", "after-debris"])
def test_kill9_restart_keeps_the_container_supervised(tmp_path, rootfs, with_debris):
    fds_before = len(os.listdir("/proc/self/fd"))
    base = tmp_path / "g"
    if with_debris:
        debris(str(base / "run"))
    g = Graftd(str(base), metrics=True)
    server = HostServer()
    box = Box(tmp_path, rootfs, g, server)
    kpid = None
    try:
        box.start()
        kpid = keeper_pid(g)
        assert kpid and alive(kpid)
        held = keeper.listing(g.runtime)
        assert [e["key"] for e in held["entries"]] == [box.key] and held["owner"] == g.proc.pid
        # the keeper is in a session of its own: a kill of graftd's process group does not reach it
        assert os.getsid(kpid) == kpid != os.getsid(g.proc.pid)
        box.ask_connect()
        box.connect_done(1)
        box.bind()  # 8081 -> port1, before any restart

        n = 1
        for rnd in range(1, 3):  # twice in a row
            old = g.proc.pid
            g.proc.send_signal(signal.SIGKILL)
            g.proc.wait()
            # a call made while no graftd runs waits in the kernel (it used to fail with ENOSYS)
            box.ask_connect()
            time.sleep(1.0)
            assert not os.path.exists(os.path.join(box.rootfs, "tmp", "connect.rc"))
            assert len(server.received) == n
            assert keeper_pid(g) == kpid and [e["key"] for e in keeper.listing(g.runtime)["entries"]] == [box.key]
            g.proc = start_graftd(g.state, g.runtime, "--metrics", f"127.0.0.1:{g.metrics_port}", log=g._logf)
            assert g.proc.pid != old
            n += 1
            box.connect_done(n)  # answered by the new graftd
            adopts = [e for e in g.events() if e["event"] == "keeper-adopt"]
            assert len(adopts) == rnd
            assert adopts[-1]["containers"] == [box.key] and adopts[-1]["listeners"] == 1
            assert adopts[-1]["keeper"] == kpid
            assert g.graftd_view()["seccomp_listeners"].get(box.key) == 1
            box.ask_connect()  # and a new one after the restart
            n += 1
            box.connect_done(n)
        box.bind()  # 8082 -> port2: a new grafted bind after the restarts
        assert http_get(box.port1) == PAGE  # the first one still serves

        # a second graftd is still refused, and does not disturb the keeper
        p = subprocess.run(["graftd", "--state-dir", g.state, "--runtime-dir", g.runtime], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 1 and p.stderr.startswith("graftd: another graftd already serves")
        assert p.stderr.count("\n") == 1
        assert keeper.listing(g.runtime)["owner"] == g.proc.pid

        # the container goes: its entry goes (POLLHUP); graftd stops: the keeper goes
        box.delete()
        wait_for(lambda: keeper.listing(g.runtime)["entries"] == [], 15, "the keeper to release the entry")
        g.close()
        wait_for(lambda: not alive(kpid), 10, "the keeper to exit")
        assert not os.path.exists(keeper.socket_path(g.runtime))
    finally:
        box.delete()
        g.close()
        server.close()
        if kpid and alive(kpid):
            os.kill(kpid, signal.SIGKILL)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_keeper_killed_sigterm_restart_and_stop_for_good(tmp_path, rootfs):
    """A keeper killed under a running graftd is replaced (graftd keeps its listeners again); a
    SIGTERM restart (an upgrade) is as invisible as a kill -9; `graftd --stop` releases everything:
    the keeper goes, and the container's next trapped call fails with ENOSYS, as without a keeper."""
    fds_before = len(os.listdir("/proc/self/fd"))
    g = Graftd(str(tmp_path / "g"), metrics=True)
    server = HostServer()
    box = Box(tmp_path, rootfs, g, server)
    pids = []
    try:
        box.start()
        pids.append(keeper_pid(g))
        box.ask_connect()
        box.connect_done(1)

        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: (keeper_pid(g) or pids[0]) != pids[0], 15, "graftd to start a new keeper")
        pids.append(keeper_pid(g))
        wait_for(lambda: [e["key"] for e in keeper.listing(g.runtime)["entries"]] == [box.key], 10,
                 "graftd to keep its listener again")
        g.wait_event(lambda e: e["event"] == "keeper-rekept" and e["listeners"] == 1)
        assert not alive(pids[0])

        stop(g.proc)  # SIGTERM: graftd goes, the keeper keeps the listener
        held = keeper.listing(g.runtime)
        assert held["pid"] == pids[1] and held["owner"] is None and [e["key"] for e in held["entries"]] == [box.key]
        box.ask_connect()
        time.sleep(0.5)
        assert len(server.received) == 1
        g.proc = start_graftd(g.state, g.runtime, "--metrics", f"127.0.0.1:{g.metrics_port}", log=g._logf)
        box.connect_done(2)
        box.bind()

        p = subprocess.run(["graftd", "--stop", "--state-dir", g.state, "--runtime-dir", g.runtime],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert p.stderr == (f"graftd: stopped graftd pid {g.proc.pid}; stopped the listener keeper "
                            "(1 listeners released)\n")
        assert g.proc.wait(10) == 0
        wait_for(lambda: not alive(pids[1]), 10, "the keeper to exit")
        assert not os.path.exists(keeper.socket_path(g.runtime)) and keeper.listing(g.runtime) is None
        box.ask_connect()  # nobody supervises it any more: ENOSYS at once, no hang
        assert box._rc("connect.rc", 10) != 0
        p = subprocess.run(["graftd", "--stop", "--state-dir", g.state, "--runtime-dir", g.runtime],
                           capture_output=True, text=True, timeout=60)
        assert (p.returncode, p.stderr) == (0, "graftd: nothing was running\n")
    finally:
        box.delete()
        g.close()
        server.close()
        for pid in pids:
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_agent_registered_table_of_a_container_gone_while_graftd_was_down(tmp_path, rootfs):
    """Plain runc pointed at graftd's agent (the agent registered the table from the annotations):
    the container ends while no graftd runs; the keeper drops its listener, and the next graftd
    forgets the table (it would otherwise stay forever)."""
    g = Graftd(str(tmp_path / "g"))
    root, cid = str(tmp_path / "runc-root"), container_id()
    kpid = None
    try:
        bundle = make_bundle(tmp_path, rootfs, ["sleep", "600"], {
            "io.sockgraft.endpoints": "out type ipv4 addr 127.0.0.1 port dynamic"})
        config = json.loads(open(os.path.join(bundle, "config.json")).read())
        ociconfig.merge_seccomp(config, g.agent)
        open(os.path.join(bundle, "config.json"), "w").write(json.dumps(config))
        with open(tmp_path / "runc.out", "w") as out:
            subprocess.run(["runc", "--root", root, "run", "-d", "-b", bundle, cid], stdin=subprocess.DEVNULL,
                           stdout=out, stderr=out, timeout=60, check=True)
        key = g.wait_event(lambda e: e["event"] == "agent-listener" and e["container_id"] == cid)["container"]
        assert key.startswith("netns:")
        kpid = keeper_pid(g)
        assert keeper.listing(g.runtime)["entries"][0]["registered"] is True
        g.proc.send_signal(signal.SIGKILL)
        g.proc.wait()
        subprocess.run(["runc", "--root", root, "delete", "--force", cid], capture_output=True, timeout=60, check=True)
        # its listener hangs up: the keeper, holding nothing and with no graftd, exits, leaving a note
        wait_for(lambda: not alive(kpid), 15, "the keeper to drop the listener and exit")
        assert os.path.exists(os.path.join(g.runtime, keeper.GONE_NAME))
        assert any(c["key"] == key for c in g.status()["containers"])  # no graftd: the table is still there
        g.proc = start_graftd(g.state, g.runtime, log=g._logf)
        g.wait_event(lambda e: e["event"] == "agent-forget" and e["container"] == key)
        assert all(c["key"] != key for c in g.status()["containers"])
        assert not os.path.exists(os.path.join(g.runtime, keeper.GONE_NAME))
    finally:
        subprocess.run(["runc", "--root", root, "delete", "--force", cid], capture_output=True, timeout=60)
        g.close()
        if kpid and alive(kpid):
            os.kill(kpid, signal.SIGKILL)
