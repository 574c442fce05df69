"""Topologies are built for real and leave nothing behind: links, netns, nft tables, processes,
ip_forward; a killed run's debris is swept by the next one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sockgraft.bench import topology as T
from sockgraft.bench.workloads import Iperf3, Profile, Servers


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
    return {"links": links, "netns": netns, "nft": tables, "processes": T.owned_processes(owner)}


EMPTY = {"links": [], "netns": [], "nft": [], "processes": []}


def _forward_owners() -> list[int]:
    try:
        with open(T.FORWARD_STATE) as f:
            return json.load(f)["owners"]
    except FileNotFoundError:
        return []


def test_nat_builds_routes_and_tears_down():
    before = T._read_forward()
    n = T.Nat()
    try:
        n.setup()
        assert T._read_forward() == "1"
        assert os.getpid() in _forward_owners()
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
        assert T._read_forward() == before


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
        T.Topology().check_route("c1", "192.0.2.1")
    T.Topology().check_route("c1", "127.0.0.1")


def test_graft_servers_and_agents_stop(tmp_path):
    g = T.Graft("api", str(tmp_path / "state"))
    prof = Profile("t", runs=1, seconds=1)
    s = Servers(g)
    try:
        Iperf3().start(s, "host", {"proto": "tcp", "streams": 1})  # a real server on the host side
        out = g.run("c1", [sys.executable, "-c", "import socket; print([n for _, n in socket.if_nameindex()])"])
        assert out.strip() == "['lo']"  # the container has only lo
        assert g.client_port("c1") > 0
        assert len(T.owned_processes(os.getpid())) >= 2
    finally:
        s.stop()
        g.teardown()
    time.sleep(0.2)
    assert _leftovers(os.getpid()) == EMPTY
    del prof


KILLED_RUN = r"""
import subprocess, sys, time, os
from sockgraft.bench.topology import Nat, OWNER_ENV
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
        assert p.pid in _forward_owners()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    time.sleep(0.3)
    assert _leftovers(p.pid)["links"]  # still there: killed runs do not clean up
    swept = T.sweep()
    assert f"sgb{p.pid}nbr" in swept["links"]
    assert _leftovers(p.pid) == EMPTY
    assert p.pid not in _forward_owners()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_bench_tears_everything_down(sig, tmp_path):
    from tests.helpers import graft_cmd

    p = subprocess.Popen([*graft_cmd(), "bench", "--topologies", "native,nat,graft-api", "--workloads", "python",
                          "--runs", "50", "--no-progress", "--out", str(tmp_path / "out")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        T.wait_until(lambda: len(_leftovers(p.pid)["processes"]) >= 2 or p.poll() is not None, 60, "bench servers")
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
    assert p.pid not in _forward_owners()
    assert not (tmp_path / "out").exists()
