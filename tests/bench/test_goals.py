"""bench/goals.py: issue 11's goals judged on records (pure)."""
from sockgraft.bench import goals


def rec(topo, workload, metric, median, params, direction="c2h", lo=None, hi=None):
    return {"topology": topo, "workload": workload, "direction": direction, "params": params, "metric": metric,
            "unit": "x", "median": median, "min": median if lo is None else lo, "max": median if hi is None else hi,
            "runs": [median]}


CLOSE1 = {"tool": "wrk", "size": "64B", "conn": "close", "c": 1}


def rows(records, label):
    return {r["mode"]: r for r in goals.judge(records) if r["goal"] == label}


def test_ratio_goal_per_mode_against_native_and_nat():
    recs = [rec("native", "http", "requests", 1000, CLOSE1), rec("nat", "http", "requests", 900, CLOSE1),
            rec("graft-preload", "http", "requests", 850, CLOSE1), rec("graft-seccomp", "http", "requests", 590, CLOSE1)]
    r = rows(recs, "wrk close c=1, client in container")
    assert (r["graft-preload"]["met"], r["graft-seccomp"]["met"]) == (True, False)
    assert r["graft-preload"]["shown"] == "0.85x"
    vs_nat = rows(recs, "wrk close c=1, client in container, vs nat")
    assert (vs_nat["graft-preload"]["met"], vs_nat["graft-seccomp"]["met"]) == (False, False)
    assert "graft-api" not in r  # wrk cannot use the graft API: the goal does not apply


def test_cost_added_spread_and_zero():
    ctl = {"op": "connect"}
    recs = [rec("native", "control", "connect-p50", 25.0, ctl), rec("graft-preload", "control", "connect-p50", 34.0, ctl),
            rec("graft-seccomp", "control", "connect-p50", 80.0, ctl),
            rec("native", "control", "ops", 100_000, {"op": "local-bind"}),
            rec("graft-seccomp", "control", "ops", 40_000, {"op": "local-bind"}),
            rec("graft-preload", "churn", "errors", 0, {"n": 10}, hi=3),
            rec("graft-preload", "http", "requests", 100, CLOSE1, lo=70)]
    added = rows(recs, "added latency per connect, p50 (µs)")
    assert added["graft-preload"]["met"] and not added["graft-seccomp"]["met"]
    assert added["graft-seccomp"]["shown"] == "+55 µs"
    local = rows(recs, "local bind (no rule matches), cost vs native")
    assert local["graft-seccomp"]["value"] == 2.5 and not local["graft-seccomp"]["met"]
    assert not rows(recs, "churn errors")["graft-preload"]["met"]  # one run had 3 errors
    spread = rows(recs, "spread of wrk close c=1 c2h (min/median)")
    assert spread["graft-preload"]["shown"] == "0.70" and not spread["graft-preload"]["met"]


def test_unmeasured_goals_are_left_out_and_table_counts():
    assert goals.table([]) == ""
    recs = [rec("native", "control", "ops", 1000, {"op": "bind"}), rec("graft-api", "control", "ops", 300, {"op": "bind"})]
    out = goals.table(recs)
    assert "| socket+bind+close to an endpoint (control) | api | 0.30x |  | >= 0.25x | yes |" in out
    assert "\n1 of 1 met." in out


def test_seccomp_rows_show_the_floor_figure_beside_theirs():
    ctl = {"op": "connect"}
    recs = [rec("native", "control", "ops", 30_000, ctl), rec("graft-seccomp", "control", "ops", 10_500, ctl),
            rec("seccomp-floor", "control", "ops", 12_000, ctl), rec("graft-preload", "control", "ops", 25_500, ctl),
            rec("native", "control", "connect-p50", 20.0, ctl), rec("graft-seccomp", "control", "connect-p50", 70.0, ctl)]
    r = rows(recs, "socket+connect+close (control)")
    assert (r["graft-seccomp"]["shown"], r["graft-seccomp"]["floor"], r["graft-seccomp"]["met"]) == ("0.35x", "0.40x", False)
    assert r["graft-preload"]["floor"] == ""  # the floor is seccomp's only
    assert rows(recs, "added latency per connect, p50 (µs)")["graft-seccomp"]["floor"] == ""  # not measured
    assert "| socket+connect+close (control) | seccomp | 0.35x | 0.40x | >= 0.6x | **no** |" in goals.table(recs)


def test_the_floor_goals_name_is_the_topologys():
    from sockgraft.bench.topologies import Graft, SeccompFloor

    assert goals.FLOOR == (Graft("seccomp").name, SeccompFloor.name)
