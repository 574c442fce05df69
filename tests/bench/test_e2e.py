"""A tiny real bench (seconds): every available topology carries real traffic in every direction,
and the command line writes valid JSON records, the report and plots. No speed is asserted."""
from __future__ import annotations

import json
import os

import pytest

from sockgraft.bench.runner import run_bench
from sockgraft.bench.stats import validate
from sockgraft.bench.debris import owned_processes
from sockgraft.bench.base import Profile
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
