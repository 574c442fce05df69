"""Pure parts of `graft bench`: summaries, the interleaved schedule, ratios, the record schema."""
from __future__ import annotations

import statistics

RECORD_KEYS = ("workload", "topology", "direction", "params", "metric", "unit", "median", "min", "max", "runs")
LOWER_IS_BETTER_UNITS = ("µs", "µs rtt")


def summarize(values: list[float]) -> dict:
    """Median with min and max of the measured runs (the warm-up run is not among them)."""
    if not values:
        raise ValueError("no runs to summarize")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def schedule(cells: list, runs: int, warmup: int = 1) -> list[tuple[int, object, bool]]:
    """Run by run, every cell once per run (A B A B ...): [(run, cell, is_warmup)]."""
    return [(r, c, r < warmup) for r in range(warmup + runs) for c in cells]


EXTRA_BASELINES = ("rootless-slirp4netns", "rootless-pasta")  # what rootless grafting is compared with


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def record(workload: str, topology: str, direction: str, params: dict, metric: str, unit: str,
           values: list[float]) -> dict:
    return {"workload": workload, "topology": topology, "direction": direction, "params": dict(params),
            "metric": metric, "unit": unit, **summarize(values)}


def validate(rec: dict) -> None:
    """Raise ValueError unless `rec` is a well-formed result record."""
    if not isinstance(rec, dict) or set(rec) != set(RECORD_KEYS):
        raise ValueError(f"record keys {sorted(rec) if isinstance(rec, dict) else type(rec)} != {sorted(RECORD_KEYS)}")
    for k in ("workload", "topology", "direction", "metric", "unit"):
        if not isinstance(rec[k], str) or not rec[k]:
            raise ValueError(f"{k} must be a non-empty string")
    if not isinstance(rec["params"], dict):
        raise ValueError("params must be an object")
    runs = rec["runs"]
    if not isinstance(runs, list) or not runs or not all(isinstance(v, (int, float)) for v in runs):
        raise ValueError("runs must be a non-empty list of numbers")
    for k in ("median", "min", "max"):
        if not isinstance(rec[k], (int, float)):
            raise ValueError(f"{k} must be a number")
    if not rec["min"] <= rec["median"] <= rec["max"]:
        raise ValueError("need min <= median <= max")
    if rec["min"] != min(runs) or rec["max"] != max(runs) or rec["median"] != statistics.median(runs):
        raise ValueError("median/min/max do not match runs")


def group_key(rec: dict) -> tuple:
    return (rec["workload"], rec["direction"], tuple(sorted(rec["params"].items())), rec["metric"])


def ratios(records: list[dict]) -> dict[tuple, dict[str, dict[str, float | None]]]:
    """For every (workload, direction, params, metric): each topology's median / native's and / nat's
    (and / the rootless user-mode networks', where measured)."""
    by_group: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        by_group.setdefault(group_key(rec), {})[rec["topology"]] = rec
    out = {}
    for key, topos in by_group.items():
        native = topos.get("native", {}).get("median")
        nat = topos.get("nat", {}).get("median")
        extra = [b for b in EXTRA_BASELINES if b in topos]
        out[key] = {t: {"native": ratio(r["median"], native), "nat": ratio(r["median"], nat),
                        **{b: ratio(r["median"], topos[b]["median"]) for b in extra}} for t, r in topos.items()}
    return out


def lower_is_better(unit: str) -> bool:
    return unit in LOWER_IS_BETTER_UNITS
