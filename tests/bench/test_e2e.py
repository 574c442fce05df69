"""A tiny real bench (seconds): every available topology carries real traffic in every direction,
and the command line writes valid JSON records, the report and plots. No speed is asserted."""
from __future__ import annotations

import json
import os

import pytest

from sockgraft.bench.runner import run_bench
from sockgraft.bench.stats import validate
from sockgraft.bench.debris import owned_processes
from sockgraft.bench.base import KIB, Profile
from tests.helpers import graft

pytestmark = pytest.mark.e2e

TINY = Profile("tiny", runs=1, warmup=0, seconds=1, py_seconds=0.3, directions=("c2h", "h2c", "c2c"),
               iperf=("tcp",), python=("stream",), ctl=("bind",))


def test_every_topology_carries_traffic_in_every_direction():
    res = run_bench(TINY, ["native", "nat", "graft-api", "graft-preload", "graft-seccomp"], ["iperf3", "python"],
                    progress=False)
    assert not res.errors, res.errors
    measured = set(res.topologies)
    assert {"native", "nat", "graft-api"} <= measured
    assert set(res.skipped) == {"native", "nat", "graft-api", "graft-preload", "graft-seccomp"} - measured
    for rec in res.records:
        validate(rec)
        assert rec["median"] > 0
    for topo in measured:
        want = {"python"} | ({"iperf3"} if topo != "graft-api" else set())
        dirs = {(r["workload"], r["direction"]) for r in res.records if r["topology"] == topo}
        assert dirs == {(w, d) for w in want for d in ("c2h", "h2c", "c2c")}, topo
        assert all(res.traffic[topo][f"{w} bytes"] > 0 for w in want), res.traffic
    assert res.na["graft-api"]["iperf3"]
    # nat traffic really crossed the veths and the DNAT publish (host->container)
    assert res.links["nat"] >= res.traffic["nat"]["iperf3 bytes"]
    assert res.dnat["nat"] > 0
    assert owned_processes(os.getpid()) == []


def test_cli_writes_json_report_and_plots(tmp_path):
    out = tmp_path / "out"
    js = tmp_path / "r.json"
    p = graft("bench", "--topologies", "native,nat,graft-preload,graft-seccomp", "--workloads", "sockperf,http,zmq",
              "--runs", "1", "--seconds", "1", "--quick", "--json", str(js), "--out", str(out), "--no-progress",
              timeout=240)
    records = json.loads(js.read_text())
    assert records and all(validate(r) is None for r in records)
    topos = {r["topology"] for r in records}
    assert {"native", "nat"} <= topos
    assert {r["workload"] for r in records} == {"sockperf", "http", "zmq"}
    report = (out / "report.md").read_text()
    assert "## Grafted vs native and vs nat" in report and "| nat | measured | 1500 |" in report
    assert any(f.suffix == ".png" for f in out.iterdir())
    assert "## Grafted vs native" in p.stdout


def test_cli_bad_input_is_one_line():
    p = graft("bench", "--topologies", "nonesuch", "--no-progress", check=False)
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "unknown topology nonesuch" in p.stderr


def test_siege_and_new_connection_per_request():
    prof = Profile("tiny-http", runs=1, warmup=0, seconds=1, http_sizes=(), http_close_sizes=(1024,), http_close_conns=(1,),
                   http_close_directions=("h2c",),
                   siege_sizes=(64,), http_directions=("h2c",))
    res = run_bench(prof, ["native", "graft-preload"], ["http"], progress=False)
    assert not res.errors, res.errors
    got = {(r["topology"], r["params"]["tool"], r["params"]["conn"]) for r in res.records}
    for topo in res.topologies:
        assert {(topo, "wrk", "close"), (topo, "siege", "keepalive")} <= got


def test_churn_with_nat_reports_conntrack_and_time_wait(tmp_path):
    """With the nat topology (conntrack on), the run's limit is the raised one, the entries the churn
    left are counted, and the report has its conntrack section. Every run raises the TIME_WAIT
    table's limit (no cell meets a full table: TCPTimeWaitOverflow does not move), says so in the
    report, and puts the limit back."""
    from sockgraft.bench.report import markdown
    from sockgraft.bench.sysctl import CONNTRACK_MAX, TIME_WAIT, TIME_WAIT_MAX

    limit = TIME_WAIT.read()
    prof = Profile("tiny-churn", runs=1, warmup=0, seconds=1, churn=3000, churn_warmup=0, directions=("c2h",))
    res = run_bench(prof, ["native", "nat"], ["churn"], progress=False)
    assert not res.errors, res.errors
    assert res.conntrack["max"] >= CONNTRACK_MAX
    assert res.conntrack["peak"] >= 3000  # TIME_WAIT entries of the churn (120 s each)
    assert res.time_wait["max"] >= TIME_WAIT_MAX and res.time_wait["overflows"] == 0, res.time_wait
    assert TIME_WAIT.read() == limit
    text = markdown(res)
    assert "## conntrack" in text and f"nf_conntrack_max {res.conntrack['max']:,} during the run" in text
    assert f"tcp_max_tw_buckets {res.time_wait['max']:,} during the run" in text


ROOTLESS = ["rootless-slirp4netns", "rootless-pasta", "rootless-graft"]


def test_rootless_topologies_carry_traffic_as_a_user_made_for_the_run():
    """iperf3 and wrk container -> host with the container side as a real unprivileged user the bench
    makes: grafted by `graft run` as that user, or networked by slirp4netns / pasta (host loopback
    as 10.0.2.2). The user is gone afterwards, with its processes; /dev/net/tun's mode is back."""
    import pwd
    import shutil

    from sockgraft.bench.debris import tag

    missing = [t for t, prog in (("rootless-slirp4netns", "slirp4netns"), ("rootless-pasta", "pasta"))
               if not shutil.which(prog)]
    if "rootless-slirp4netns" in missing:
        pytest.skip("slirp4netns is not installed (scripts/setup installs it)")
    tun_mode = os.stat("/dev/net/tun").st_mode
    prof = Profile("tiny-rootless", runs=1, warmup=0, seconds=1, directions=("c2h",), iperf=("tcp",),
                   http_sizes=(KIB,), http_modes=(("keepalive", 1),), http_close_sizes=(64,), http_close_conns=(1,),
                   http_directions=("c2h",), http_close_directions=("c2h", "h2c"), siege_sizes=())
    res = run_bench(prof, ["native", *ROOTLESS], ["iperf3", "http"], progress=False)
    assert not res.errors, res.errors
    want = set(ROOTLESS) - set(missing)
    assert want <= set(res.topologies), res.skipped
    got = {(r["topology"], r["workload"], r["params"].get("conn")) for r in res.records if r["metric"] != "errors"}
    for topo in want:
        assert {(topo, "iperf3", None), (topo, "http", "keepalive"), (topo, "http", "close")} <= got, topo
        assert res.traffic[topo]["iperf3 bytes"] > 0 and res.traffic[topo]["http requests"] > 0
        assert res.na[topo]["http h2c"]  # only container -> host is built
    assert not [u.pw_name for u in pwd.getpwall() if u.pw_name.startswith(tag())]
    from sockgraft.bench.sysctl import TUN

    if not TUN.owners():  # no other bench run holds it open
        assert os.stat("/dev/net/tun").st_mode == tun_mode
    assert owned_processes(os.getpid()) == []
