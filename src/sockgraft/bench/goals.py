"""Issue 11's goals, judged on a bench's records: one row per goal and grafted mode, with the
figure, the goal and whether this run met it (pure: records in, rows out; report.py prints them).

A goal is a ratio of a grafted cell against the same cell of `native` (or `nat`), a difference
in µs per connect, or a cell's own run-to-run spread. A goal whose cells this run did not
measure is left out (the quick profile has no server-side c=1, ...); a mode the goal does not
apply to (`n/a`: wrk cannot use the graft API) is left out too.
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("graft-api", "graft-preload", "graft-seccomp")


@dataclass(frozen=True)
class Goal:
    label: str
    workload: str
    direction: str
    params: dict
    metric: str
    kind: str  # "ratio": grafted/base >= want; "cost": grafted's cost per operation / base's <= want;
    #            "added": grafted - base <= want (µs); "spread": min/median >= want; "zero": max == 0
    want: dict  # per mode (missing: the goal does not apply to that mode)
    base: str = "native"


def _modes(api=None, preload=None, seccomp=None) -> dict:
    return {m: v for m, v in zip(MODES, (api, preload, seccomp)) if v is not None}


def _close(c: int) -> dict:
    return {"tool": "wrk", "size": "64B", "conn": "close", "c": c}


GOALS: tuple[Goal, ...] = tuple(
    [Goal(f"wrk close c={c}, client in container", "http", "c2h", _close(c), "requests", "ratio",
          _modes(preload=0.8, seccomp=0.6)) for c in (1, 16)]
    + [Goal(f"wrk close c={c}, client in container, vs nat", "http", "c2h", _close(c), "requests", "ratio",
            _modes(preload=1.0, seccomp=1.0), base="nat") for c in (1, 16)]
    + [Goal(f"wrk close c={c}, server in container (keep ~1.0x)", "http", "h2c", _close(c), "requests",
            "ratio", _modes(preload=0.9, seccomp=0.9)) for c in (1, 16)]
    + [Goal(f"spread of wrk close c={c} {d} (min/median)", "http", d, _close(c), "requests", "spread",
            _modes(preload=0.8, seccomp=0.8)) for d in ("c2h", "h2c") for c in (1, 16)]
    + [Goal("churn, client closes first", "churn", "c2h", {}, "connections", "ratio",
            _modes(api=0.8, preload=0.8, seccomp=0.6)),
       Goal("churn errors", "churn", "c2h", {}, "errors", "zero", _modes(api=0, preload=0, seccomp=0)),
       Goal("socket+connect+close (control)", "control", "c2h", {"op": "connect"}, "ops", "ratio",
            _modes(api=0.8, preload=0.8, seccomp=0.6)),
       Goal("socket+bind+close to an endpoint (control)", "control", "c2h", {"op": "bind"}, "ops", "ratio",
            _modes(api=0.25, preload=0.25, seccomp=0.25)),
       Goal("local bind (no rule matches), cost vs native", "control", "c2h", {"op": "local-bind"}, "ops", "cost",
            _modes(preload=2.0, seccomp=2.0)),
       Goal("local connect (no rule matches), cost vs native", "control", "c2h", {"op": "local-connect"}, "ops",
            "cost", _modes(preload=2.0, seccomp=2.0)),
       Goal("sockperf TCP ping-pong latency", "sockperf", "c2h", {"proto": "tcp", "msg": 14, "pinned": True},
            "latency-avg", "cost", _modes(seccomp=1.3)),
       Goal("added latency per connect, p50 (µs)", "control", "c2h", {"op": "connect"}, "connect-p50", "added",
            _modes(api=10.0, preload=10.0, seccomp=40.0))])


def _find(records: list[dict], goal: Goal, topology: str) -> dict | None:
    for r in records:
        if (r["topology"] == topology and r["workload"] == goal.workload and r["direction"] == goal.direction
                and r["metric"] == goal.metric and all(r["params"].get(k) == v for k, v in goal.params.items())):
            return r
    return None


FLOOR = ("graft-seccomp", "seccomp-floor")  # a mode, and the topology that is its floor on this machine


def _figure(goal: Goal, rec: dict, base: dict | None, want: float) -> tuple[float, str, str, bool]:
    """A goal's figure for one cell against its base: value, shown, the goal as text, met."""
    if goal.kind == "ratio":
        value = rec["median"] / base["median"] if base["median"] else 0.0
        return value, f"{value:.2f}x", f">= {want}x", value >= want
    if goal.kind == "cost":  # a rate (ops/s) or a latency (µs): grafted cost / native cost
        per_op = goal.metric.startswith("latency")
        value = (rec["median"] / base["median"]) if per_op else (base["median"] / rec["median"] if rec["median"] else float("inf"))
        return value, f"{value:.2f}x", f"<= {want}x", value <= want
    if goal.kind == "added":
        value = rec["median"] - base["median"]
        return value, f"+{value:.0f} µs", f"<= +{want:.0f} µs", value <= want
    if goal.kind == "spread":
        value = rec["min"] / rec["median"] if rec["median"] else 0.0
        return value, f"{value:.2f}", f">= {want}", value >= want
    value = rec["max"]  # zero
    return value, f"{value:.0f}", "0", value == 0


def judge(records: list[dict]) -> list[dict]:
    """One row per (goal, mode) measured: label, mode, value (float), shown (text), want (text), met,
    and `floor`: the same figure of seccomp-floor where the mode is seccomp and it was measured
    (shown: what the mode could at best reach here), else ""."""
    rows = []
    for goal in GOALS:
        base = _find(records, goal, goal.base)
        for mode, want in goal.want.items():
            rec = _find(records, goal, mode)
            if rec is None or (goal.kind in ("ratio", "cost", "added") and base is None):
                continue
            value, shown, target, met = _figure(goal, rec, base, want)
            floor = _find(records, goal, FLOOR[1]) if mode == FLOOR[0] else None
            rows.append({"goal": goal.label, "mode": mode, "value": value, "shown": shown, "want": target,
                         "met": met, "floor": _figure(goal, floor, base, want)[1] if floor else ""})
    return rows


def table(records: list[dict]) -> str:
    """The goals section's Markdown table ('' when no goal's cells were measured)."""
    rows = judge(records)
    if not rows:
        return ""
    lines = ["| goal | mode | this run | seccomp floor | goal | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['goal']} | {r['mode'].removeprefix('graft-')} | {r['shown']} | {r['floor']} | {r['want']} | "
                     f"{'yes' if r['met'] else '**no**'} |")
    met = sum(r["met"] for r in rows)
    return ("\n".join(lines) + f"\n\n{met} of {len(rows)} met. The seccomp floor column: the same figure for "
            "seccomp-floor (seccomp mode's filter and a supervisor doing the least), where it was measured.\n")
