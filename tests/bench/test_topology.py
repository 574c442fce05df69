"""Topologies are built for real and leave nothing behind: links, netns, nft tables, processes,
ip_forward; a killed run's debris is swept by the next one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import pytest

from sockgraft.bench import debris, sysctl
from sockgraft.bench import topologies as T
from sockgraft.bench.debris import owned_processes
from sockgraft.bench.base import Servers
from sockgraft.bench.workloads import Iperf3
from tests.helpers import wait_for


def _leftovers(owner: int) -> dict:
    """Everything on the machine named for `owner` or marked as started by it."""
    tagname = f"sgb{owner}"
    links = [l["ifname"] for l in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True).stdout)
             if l["ifname"].startswith(tagname)]
    try:
        netns = [n for n in os.listdir("/run/netns") if n.startswith(tagname)]
    except FileNotFoundError:
        netns = []
    tables = [t["table"]["name"] for t in json.loads(subprocess.run(["nft", "-j", "list", "tables"], capture_output=True,
                                                                    text=True).stdout)["nftables"]
              if "table" in t and t["table"]["name"].startswith(tagname)]
    return {"links": links, "netns": netns, "nft": tables, "processes": owned_processes(owner)}


EMPTY = {"links": [], "netns": [], "nft": [], "processes": []}


_forward_owners = sysctl.forward_owners


def test_nat_builds_routes_and_tears_down():
    before = sysctl.read_forward()
    n = T.Nat()
    try:
        n.setup()
        assert sysctl.read_forward() == "1"
        assert os.getpid() in _forward_owners()
        # its table turned conntrack on: the limit is raised for the bench (room for the churn cells)
        assert os.getpid() in sysctl.CONNTRACK.owners()
        ct_before = sysctl.CONNTRACK.original()
        assert int(sysctl.CONNTRACK.read()) == max(int(ct_before), sysctl.CONNTRACK_MAX)
        assert sysctl.conntrack_stats()["max"] == int(sysctl.CONNTRACK.read())
        assert _leftovers(os.getpid())["nft"] == [n.table]
        # destinations resolve via our bridge / the container's eth0, never a default route
        n.check_route("host", n.addr["c1"])
        n.check_route("c1", n.addr["host"])
        with pytest.raises(T.TopologyError):
            n.check_route("c1", "192.0.2.1")
        out = subprocess.run(["ip", "-n", n.netns["c1"], "-j", "link"], capture_output=True, text=True).stdout
        assert {l["ifname"]: l["mtu"] for l in json.loads(out)} == {"lo": 65536, "eth0": 1500}
        p = n.popen("c1", ["sleep", "60"])
        assert os.readlink(f"/proc/{p.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    finally:
        n.teardown()
    assert _leftovers(os.getpid()) == EMPTY
    assert os.getpid() not in _forward_owners()
    if not _forward_owners():  # no other bench running: the value found before is back
        assert sysctl.read_forward() == before
    assert os.getpid() not in sysctl.CONNTRACK.owners()
    if not sysctl.CONNTRACK.owners():  # back, unless the entries (other runs' churn) do not fit yet
        count = sysctl.conntrack_stats()["count"]
        assert sysctl.CONNTRACK.read() == ct_before or (count > int(ct_before) and sysctl.CONNTRACK.original() == ct_before)


def test_a_shared_setting_waits_to_be_restored_until_it_may(tmp_path):
    """The last owner gone, a setting whose `can_restore` says no (conntrack entries that do not
    fit under the original limit yet) stays as it is, with no owner; a later update restores it."""
    value, state = tmp_path / "value", tmp_path / "state.json"
    value.write_text("100")
    may = []
    s = sysctl.Shared(str(value), str(state), lambda original: "800", lambda original: bool(may))
    s.update(add=os.getpid())
    assert value.read_text() == "800" and s.owners() == [os.getpid()]
    s.update(remove=os.getpid())
    assert value.read_text() == "800" and s.owners() == [] and s.original() == "100"
    s.update()
    assert value.read_text() == "800"
    may.append(True)
    s.update()
    assert value.read_text() == "100" and not state.exists()


def test_nat_mtu_variant():
    n = T.Nat(mtu=65520)
    try:
        n.setup()
        assert n.name == "nat-mtu65520"
        out = subprocess.run(["ip", "-n", n.netns["c2"], "-j", "link", "show", "eth0"], capture_output=True, text=True).stdout
        assert json.loads(out)[0]["mtu"] == 65520
    finally:
        n.teardown()
    assert _leftovers(os.getpid()) == EMPTY


def test_native_refuses_non_loopback():
    with pytest.raises(T.TopologyError):
        T.Native().check_route("c1", "192.0.2.1")
    T.Native().check_route("c1", "127.0.0.1")


def test_a_tool_that_times_out_is_stopped_and_says_what_it_printed_last():
    from sockgraft.bench.system import ToolTimeout

    with pytest.raises(ToolTimeout, match=r"timed out after 1s in native/host; last output: hello"):
        T.Native().run("host", ["sh", "-c", "echo hello >&2; exec sleep 30"], timeout=1)


def test_base_topology_is_abstract():
    with pytest.raises(TypeError):
        T.Topology()
    assert [t.name for t in T.all_topologies(None)] == ["native", "nat", "nat-mtu65520", "graft-api", "graft-preload",
                                                        "graft-seccomp", "seccomp-floor", "docker",
                                                        "rootless-slirp4netns", "rootless-pasta", "rootless-graft",
                                                        "rootless-graft-seccomp"]
    # the rootless ones are measured only when named
    from sockgraft.bench.runner import select_topologies

    assert [t.name for t in select_topologies(None, "/nonexistent")] == ["native", "nat", "nat-mtu65520", "graft-api",
                                                                         "graft-preload", "graft-seccomp",
                                                                         "seccomp-floor", "docker"]
    assert [t.name for t in select_topologies(["rootless-pasta"], "/nonexistent")] == ["rootless-pasta"]
    assert [t.name for t in select_topologies(None, "/nonexistent", quick=True)] == [
        "native", "nat", "graft-api", "graft-preload", "graft-seccomp", "seccomp-floor", "docker"]


def test_seccomp_floor_runs_the_container_side_under_the_floor_and_cleans_up():
    from sockgraft.modes.seccomp.floor import FLOOR

    t = T.SeccompFloor()
    assert t.unavailable() is None
    t.setup()
    try:
        d = t.dir
        assert os.path.getsize(os.path.join(d, "filter")) > 0
        assert t.command("host", ["true"], []) == ["true"]
        assert t.command("c1", ["true"], [])[0] == FLOOR
        # under the floor, a program's connect runs on a host socket put in its place
        probe = ("import os, socket; l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1); s = socket.socket(); "
                 "i = os.fstat(s.fileno()).st_ino; s.connect(l.getsockname()); print(os.fstat(s.fileno()).st_ino != i)")
        assert t.run("c1", [sys.executable, "-c", probe]).strip() == "True"
        assert t.run("host", [sys.executable, "-c", probe]).strip() == "False"
    finally:
        t.teardown()
    assert not os.path.exists(d) and t.dir is None


def test_graft_servers_and_agents_stop(tmp_path):
    g = T.Graft("api", str(tmp_path / "state"))
    s = Servers(g)
    try:
        Iperf3().start(s, "host", {"proto": "tcp", "streams": 1})  # a real server on the host side
        out = g.run("c1", [sys.executable, "-c", "import socket; print([n for _, n in socket.if_nameindex()])"])
        assert out.strip() == "['lo']"  # the container has only lo
        assert g.client_port("c1") > 0
        assert len(owned_processes(os.getpid())) >= 2
    finally:
        s.stop()
        g.teardown()
    wait_for(lambda: _leftovers(os.getpid()) == EMPTY, what="nothing left of the graft topology")


KILLED_RUN = r"""
import subprocess, sys, time, os
from sockgraft.bench.debris import OWNER_ENV
from sockgraft.bench.topologies import Nat
n = Nat()
n.setup()
n.popen("c1", ["sleep", "300"])
env = dict(os.environ, **{OWNER_ENV: str(os.getpid())})
subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)  # no parent-death signal: must be swept
print("ready", flush=True)
time.sleep(300)
"""


def test_sweep_removes_debris_of_a_killed_run():
    p = subprocess.Popen([sys.executable, "-c", KILLED_RUN], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        left = _leftovers(p.pid)
        assert left["links"] and left["netns"] and left["nft"] and left["processes"]
        assert p.pid in _forward_owners() and p.pid in sysctl.CONNTRACK.owners()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # its container process dies with it (parent-death signal); the rest stays: killed runs do not clean up
    wait_for(lambda: len(_leftovers(p.pid)["processes"]) == 1, what="the parent-death signal")
    assert _leftovers(p.pid)["links"]
    swept = debris.sweep()
    assert f"sgb{p.pid}nbr" in swept["links"]
    assert _leftovers(p.pid) == EMPTY
    assert p.pid not in _forward_owners() and p.pid not in sysctl.CONNTRACK.owners()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_bench_tears_everything_down(sig, tmp_path):
    from tests.helpers import graft_cmd

    p = subprocess.Popen([*graft_cmd(), "bench", "--topologies", "native,nat,graft-api", "--workloads", "python",
                          "--runs", "50", "--no-progress", "--out", str(tmp_path / "out")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         # a test run started in the background of a shell without job control has
                         # SIGINT ignored, and the bench would inherit that: give it Ctrl-C's default
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: len(_leftovers(p.pid)["processes"]) >= 2 or p.poll() is not None, 60, "bench servers")
        assert p.poll() is None, p.stderr.read()
        assert _leftovers(p.pid)["links"]
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    assert "Traceback" not in err
    assert _leftovers(p.pid) == EMPTY
    assert p.pid not in _forward_owners() and p.pid not in sysctl.CONNTRACK.owners()
    assert not (tmp_path / "out").exists()


KILLED_ROOTLESS_RUN = """
import time
from sockgraft.bench.topologies.rootless import RootlessSlirp
t = RootlessSlirp()
t.setup()
print("ready", t.user.name, t.user.uid, flush=True)
time.sleep(300)
"""


def test_sweep_removes_the_user_of_a_killed_rootless_run():
    """A run killed with its slirp4netns topology up leaves its user, its loopback guard table and
    /dev/net/tun opened (its processes die with it: parent-death signal): the next sweep removes
    the user (killing whatever of it still runs) and the table, and puts the mode back."""
    import pwd
    import shutil

    from sockgraft.bench.users import uid_pids

    if not shutil.which("slirp4netns"):
        pytest.skip("slirp4netns is not installed (scripts/setup installs it)")
    p = subprocess.Popen([sys.executable, "-c", KILLED_ROOTLESS_RUN], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline().split()
        assert line[:1] == ["ready"], line
        name, uid = line[1], int(line[2])
        assert pwd.getpwnam(name).pw_uid == uid and uid_pids(uid)
        assert p.pid in sysctl.TUN.owners() and os.stat("/dev/net/tun").st_mode & 0o666 == 0o666
        assert _leftovers(p.pid)["nft"]
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    swept = debris.sweep()
    assert name in swept["users"]
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    wait_for(lambda: uid_pids(uid) == [], 10, "the user's processes to be gone")
    assert _leftovers(p.pid) == EMPTY
    assert p.pid not in sysctl.TUN.owners()
