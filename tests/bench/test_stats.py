"""Pure parts of graft bench: statistics, interleaving, ratios, record schema, report, plots."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from sockgraft.bench import paper, report
from sockgraft.bench.runner import Result
from sockgraft.bench.stats import RECORD_KEYS, ratios, record, schedule, summarize, validate


def test_summarize_median_min_max():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"]) == (2.5, 1.0, 10.0)
    assert s["runs"] == [3.0, 1.0, 2.0, 10.0]
    with pytest.raises(ValueError):
        summarize([])


@given(st.lists(st.floats(min_value=0, max_value=1e12, allow_nan=False), min_size=1, max_size=30))
def test_records_from_any_runs_validate(values):
    rec = record("iperf3", "nat", "c2h", {"proto": "tcp"}, "throughput", "Gbit/s", values)
    validate(rec)
    assert rec["min"] <= rec["median"] <= rec["max"]


def test_schedule_interleaves_run_by_run_with_warmup_first():
    plan = schedule(["A", "B"], runs=2, warmup=1)
    assert [(r, c) for r, c, _ in plan] == [(0, "A"), (0, "B"), (1, "A"), (1, "B"), (2, "A"), (2, "B")]
    assert [w for _, _, w in plan] == [True, True, False, False, False, False]


@pytest.mark.parametrize("mutate", [
    lambda r: r.pop("runs"),
    lambda r: r.update(extra=1),
    lambda r: r.update(median="fast"),
    lambda r: r.update(runs=[]),
    lambda r: r.update(min=r["max"] + 1),
    lambda r: r.update(median=r["median"] + 0.5),
    lambda r: r.update(params="tcp"),
    lambda r: r.update(topology=""),
])
def test_validate_rejects_malformed(mutate):
    rec = record("sockperf", "native", "c2h", {"proto": "udp"}, "latency-avg", "µs", [5.0, 6.0, 9.0])
    mutate(rec)
    with pytest.raises(ValueError):
        validate(rec)


def _records():
    recs = []
    for topo, vals in (("native", [10, 12, 11]), ("nat", [5, 6, 4]), ("graft-preload", [11, 9, 10])):
        recs.append(record("iperf3", topo, "c2h", {"proto": "tcp", "streams": 1}, "throughput", "Gbit/s", vals))
    for topo, vals in (("native", [7, 7, 7]), ("nat", [9, 9, 9]), ("graft-preload", [7.7, 7.7, 7.7])):
        recs.append(record("sockperf", topo, "c2h", {"proto": "tcp", "msg": 14, "pinned": True}, "latency-avg", "µs", vals))
    return recs


def test_ratios_against_native_and_nat():
    r = ratios(_records())
    key = ("iperf3", "c2h", (("proto", "tcp"), ("streams", 1)), "throughput")
    assert r[key]["graft-preload"]["native"] == pytest.approx(10 / 11)
    assert r[key]["graft-preload"]["nat"] == pytest.approx(10 / 5)
    assert r[key]["nat"]["nat"] == pytest.approx(1.0)


def test_ratio_without_baseline_is_none():
    recs = [record("python", "graft-api", "c2h", {"test": "stream"}, "throughput", "Gbit/s", [1.0])]
    assert ratios(recs)[("python", "c2h", (("test", "stream"),), "throughput")]["graft-api"] == {"native": None, "nat": None}


def test_markdown_report_has_ratios_paper_and_skips(tmp_path):
    res = Result("quick", records=_records())
    res.skipped = {"graft-seccomp": "graft run has no mode 'seccomp' in this checkout"}
    res.na = {"graft-api": {"iperf3": "unmodified binaries cannot use the graft API"}}
    res.topologies = {"native": {"mtu": 65536, "describe": "lo"}, "nat": {"mtu": 1500, "describe": "bridge"},
                      "graft-preload": {"mtu": 65536, "describe": "grafted"}}
    res.traffic = {"nat": {"iperf3 bytes": 123456}}
    text = report.markdown(res, [str(tmp_path / "iperf3-c2h-throughput.png")])
    assert "graft-preload/native" in text and "graft-preload/nat" in text
    assert "0.91×" in text and "2.00×" in text  # 10/11 and 10/5
    assert "1.10×" in text  # latency 7.7 vs 7
    assert "skipped" in text and "no mode 'seccomp'" in text
    assert "n/a" in text and "unmodified binaries" in text
    assert "35.97" in text and "8.82" in text  # the paper beside ours
    assert "| 1500 |" in text  # MTU printed
    assert "iperf3 bytes" in text and "123,456" in text


def test_paper_notes_cover_the_headline_rows():
    assert "18.00" in paper.note("iperf3", "c2h", {"proto": "tcp", "streams": 1}, "throughput")
    assert "+63%" in paper.note("http", "h2c", {"tool": "wrk", "size": "256KiB", "conn": "keepalive", "c": 1}, "requests")
    assert "1.94" in paper.note("zmq", "c2h", {"pattern": "push-pull", "size": 128 * 1024}, "throughput")
    assert paper.note("control", "c2h", {"op": "bind"}, "ops") == ""


def test_plots_are_png_files(tmp_path):
    res = Result("quick", records=_records())
    paths = report.plots(res, str(tmp_path))
    assert {p.rsplit("/", 1)[1] for p in paths} == {"iperf3-c2h-throughput.png", "sockperf-c2h-latency-avg.png"}
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_record_keys_are_the_documented_schema():
    assert set(RECORD_KEYS) == {"workload", "topology", "direction", "params", "metric", "unit", "median", "min",
                                "max", "runs"}
    json.dumps(_records())  # serialisable as is


def _setup_records():
    recs = []
    close = {"tool": "wrk", "size": "64B", "conn": "close", "c": 16}
    for topo, vals in (("native", [9000, 10000, 9500]), ("nat", [8000, 8000, 8000]), ("graft-seccomp", [4000, 5000, 5000])):
        recs.append(record("http", topo, "c2h", close, "requests", "req/s", vals))
    for topo, vals in (("native", [40, 50, 45]), ("nat", [60, 60, 60]), ("graft-seccomp", [80, 100, 90])):
        recs.append(record("control", topo, "c2h", {"op": "connect"}, "connect-p50", "µs", vals))
    for topo in ("native", "nat", "graft-seccomp"):
        recs.append(record("churn", topo, "c2h", {"n": 30000}, "errors", "errors", [0, 0, 0]))
    recs.append(record("http", "native", "c2h", {**close, "conn": "keepalive"}, "requests", "req/s", [1.0]))
    return recs


def test_setup_table_spread_ratios_and_added_latency():
    text = report.setup_table(_setup_records())
    assert "9,500 [0.95]" in text  # median [min/median]
    assert "5,000 [0.80]" in text and "0.53×" in text and "0.62×" in text  # 5000/9500, 5000/8000
    assert "90.0 [0.90]" in text  # latency: median [median/max]
    assert "2.00× (+45 µs)" in text and "1.50× (+30 µs)" in text
    assert "conn=keepalive" not in text  # only connection-setup cells
    assert "n=30,000 client closes first" in text
    full = report.markdown(Result("quick", records=_setup_records()))
    assert full.index("## Connection setup") < full.index("## Grafted vs native")


def test_plan_puts_close_cells_in_both_directions_with_one_warmup_per_group():
    from sockgraft.bench import runner
    from sockgraft.bench import topologies as T
    from sockgraft.bench.base import FULL, QUICK
    from sockgraft.bench.workloads import WORKLOADS

    topos = [T.Native(), T.Graft("api")]
    res = Result("quick")
    plan = runner._plan(QUICK, [WORKLOADS["http"], WORKLOADS["churn"], WORKLOADS["control"]], topos, res)
    http = {d: [(p["conn"], p["size"], p["c"]) for p in group] for w, d, group, _ in plan if w.name == "http"}
    assert http == {"c2h": [("keepalive", "1KiB", 1), ("close", "64B", 1), ("close", "64B", 16)],
                    "h2c": [("close", "64B", 1), ("close", "64B", 16)]}
    assert res.na["graft-api"]["http"]  # binaries only
    churn = [(d, group, [t.name for t in cells]) for w, d, group, cells in plan if w.name == "churn"]
    assert churn == [("c2h", [{"n": 30000}], ["native", "graft-api"])]
    assert WORKLOADS["churn"].warm_params({"n": 30000}, QUICK) == {"n": QUICK.churn_warmup}
    full_close = [p for p in WORKLOADS["http"].variants(FULL) if p["conn"] == "close"]
    assert {(p["size"], p["c"]) for p in full_close} == {("64B", 1), ("64B", 16), ("1KiB", 1), ("1KiB", 16)}
    assert FULL.churn == 100_000 and QUICK.churn >= 30_000
    assert set(QUICK.http_close_directions) == set(FULL.http_close_directions) == {"c2h", "h2c"}


def test_report_lists_cells_that_saw_the_conntrack_table_full():
    from sockgraft.bench.report import conntrack_section

    assert "not loaded" in "\n".join(conntrack_section({}))
    quiet = "\n".join(conntrack_section({"max": 2097152, "peak": 100, "drop": 0, "early_drop": 0, "insert_failed": 0}))
    assert "No cell saw the table full." in quiet and "2,097,152" in quiet
    full = "\n".join(conntrack_section({"max": 262144, "peak": 262144, "drop": 7, "early_drop": 3, "insert_failed": 0,
                                        "cells": [{"workload": "churn", "direction": "c2h", "params": ["30000 conns"],
                                                   "topologies": ["native", "nat"], "count": 262144, "drop": 7,
                                                   "early_drop": 3}]}))
    assert "| churn container→host 30000 conns | native, nat | 262,144 | 7 | 3 | 0 |" in full
    assert "7 packets dropped on a full table" in full
