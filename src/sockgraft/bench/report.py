"""The Markdown report, the ratio tables and the PNG plots of a bench result."""
from __future__ import annotations

import functools
import os

from sockgraft.bench import goals, paper
from sockgraft.bench.stats import group_key, lower_is_better, ratios
from sockgraft.bench.topologies import SeccompFloor, all_topologies
from sockgraft.bench.workloads import WORKLOADS

ROOTLESS_NETS = ("rootless-slirp4netns", "rootless-pasta")  # rootless Podman's user-mode networks
DIRECTION_NAMES = {"c2h": "container→host", "h2c": "host→container", "c2c": "container→container"}


@functools.cache
def topology_order() -> tuple[str, ...]:
    """The topologies' names in report order: topologies.all_topologies's."""
    return tuple(t.name for t in all_topologies(None))


def _order(names) -> list[str]:
    order = topology_order()
    return sorted(names, key=lambda n: (order.index(n) if n in order else 99, n))


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def params_label(workload: str, params: dict) -> str:
    w = WORKLOADS.get(workload)
    return w.label(params) if w else " ".join(f"{k}={v}" for k, v in params.items())


def _rows(records: list[dict]):
    """Records grouped by (workload, direction, params, metric), in first-seen order."""
    groups: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        groups.setdefault(group_key(rec), {})[rec["topology"]] = rec
    return groups


def is_grafted(topology: str) -> bool:
    return topology.startswith(("graft-", "rootless-graft"))


def baselines(topology: str) -> tuple[str, ...]:
    """What a topology's ratio columns compare it with: grafted rootful with native and nat, grafted
    rootless with native and the user-mode networks, those and seccomp's floor with native."""
    if topology.startswith("graft-"):
        return ("native", "nat")
    if topology.startswith("rootless-graft"):
        return ("native", *ROOTLESS_NETS)
    if topology in ROOTLESS_NETS or topology == SeccompFloor.name:
        return ("native",)
    return ()


def ratio_columns(topologies: list[str]) -> list[tuple[str, str]]:
    """(topology, baseline) pairs shown as ratio columns."""
    cols = []
    for t in topologies:
        cols += [(t, b) for b in baselines(t)]
    if "nat-mtu65520" in topologies:
        cols.append(("nat-mtu65520", "nat"))
    return [(t, b) for t, b in cols if b in topologies]


def summary_table(records: list[dict], with_paper: bool = True) -> str:
    """One Markdown table: per row every topology's median, the grafted/native and grafted/nat ratios
    and the paper's figure."""
    if not records:
        return "_no results_\n"
    topos = _order({r["topology"] for r in records})
    cols = ratio_columns(topos)
    rat = ratios(records)
    head = ["workload", "direction", "params", "metric", *topos, *[f"{t}/{b}" for t, b in cols]]
    if with_paper:
        head.append("paper (GRAFT vs NAT)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_topo in _rows(records).items():
        any_rec = next(iter(by_topo.values()))
        cells = _row_label(any_rec)
        for t in topos:
            r = by_topo.get(t)
            cells.append(f"{fmt(r['median'])} ({fmt(r['min'])}–{fmt(r['max'])})" if r else "n/a")
        for t, b in cols:
            cells.append(fmt_ratio(rat[key].get(t, {}).get(b)))
        if with_paper:
            cells.append(paper.note(any_rec["workload"], any_rec["direction"], any_rec["params"], any_rec["metric"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _row_label(rec: dict) -> list[str]:
    """The first four cells of a results row: workload, direction, params, metric (unit)."""
    return [rec["workload"], DIRECTION_NAMES.get(rec["direction"], rec["direction"]),
            params_label(rec["workload"], rec["params"]), f"{rec['metric']} ({rec['unit']})"]


def is_setup(rec: dict) -> bool:
    """A connection-setup cell: wrk with a new connection per request, the churn, the control path."""
    return rec["workload"] in ("churn", "control") or (rec["workload"] == "http" and rec["params"].get("conn") == "close")


def spread(rec: dict) -> float | None:
    """Run-to-run spread of a cell, 1.0 = none: min/median for rates, median/max for latencies
    (the worst run against the median, either way)."""
    if lower_is_better(rec["unit"]):
        return rec["median"] / rec["max"] if rec["max"] else None
    return rec["min"] / rec["median"] if rec["median"] else None


def setup_table(records: list[dict]) -> str:
    """Connection setup: every topology's median with its spread, each graft mode against native
    and nat (latencies also as added µs per connect)."""
    recs = [r for r in records if is_setup(r)]
    if not recs:
        return "_no connection-setup cells measured_\n"
    topos = _order({r["topology"] for r in recs})
    cols = ratio_columns(topos)
    rat = ratios(recs)
    head = ["workload", "direction", "params", "metric", *topos, *[f"{g}/{b}" for g, b in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_topo in _rows(recs).items():
        rec = next(iter(by_topo.values()))
        cells = _row_label(rec)
        for t in topos:
            r = by_topo.get(t)
            cells.append("n/a" if not r else f"{fmt(r['median'])} [{fmt_spread(spread(r))}]")
        for g, b in cols:
            r, base = by_topo.get(g), by_topo.get(b)
            if rec["metric"] == "errors" or not r or not base:
                cells.append("–" if r else "n/a")
                continue
            text = fmt_ratio(rat[key][g][b])
            if lower_is_better(rec["unit"]):
                text += f" ({r['median'] - base['median']:+.0f} µs)"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fmt_spread(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def ratio_summary(records: list[dict]) -> str:
    """Compact: per workload row, grafted/native and grafted/nat for each graft topology."""
    topos = _order({r["topology"] for r in records})
    cols = [(t, b) for t, b in ratio_columns(topos) if is_grafted(t)]
    rat = ratios(records)
    head = ["workload", "direction", "params", "metric"] + [f"{g}/{b}" for g, b in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_topo in _rows(records).items():
        rec = next(iter(by_topo.values()))
        if rec["metric"] in ("latency-p50", "latency-p99", "loss", "bandwidth", "errors"):
            continue
        cells = [rec["workload"], rec["direction"], params_label(rec["workload"], rec["params"]), rec["metric"]]
        cells += [fmt_ratio(rat[key].get(g, {}).get(b)) if g in by_topo else "n/a" for g, b in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(result, plots: list[str] = ()) -> str:
    m = result.meta
    out = [f"# graft bench report ({result.profile})", "",
           f"- Run: {m.get('started')} → {m.get('finished')} UTC; {m.get('runs')} measured runs per cell "
           f"(median, min–max), {m.get('warmup')} warm-up run discarded; topologies interleaved run by run.",
           f"- Machine: {m.get('cpus')} CPUs, {m.get('cpu')}, Linux {m.get('kernel')}, Python {m.get('python')}; "
           f"load average at start {_load(m.get('loadavg_start'))}, at end {_load(m.get('loadavg_end'))} "
           "(other work on the machine shows up as noise).",
           f"- CPU pinning: {m.get('pinning')}",
           "- Ratios are our median divided by the baseline's median; for latencies (µs) lower is better, "
           "so a ratio below 1 means faster.",
           f"- Paper: {paper.SOURCE}", "", "## Topologies", "",
           "| topology | status | data-path MTU | how |", "|---|---|---|---|"]
    for name in _order(set(result.topologies) | set(result.skipped)):
        if name in result.topologies:
            t = result.topologies[name]
            out.append(f"| {name} | measured | {t['mtu']} | {t['describe']} |")
        else:
            out.append(f"| {name} | skipped | – | {result.skipped[name]} |")
    if result.na:
        out += ["", "Cells marked n/a:", ""]
        for t, by_w in result.na.items():
            out.append(f"- {t}: {', '.join(sorted(by_w))} — {next(iter(by_w.values()))}")
    out += ["", "## Connection setup", "",
            "New connection per request (wrk `-H \"Connection: close\"`; nginx's counters confirm a connection per "
            "request), client-first-close churn through the `dynamic` endpoint, and the control path from "
            "inside the container. Each cell: median [spread], the spread being min/median for rates and "
            "median/max for latencies (1.00 = every run alike); ratios are medians, and for latencies the "
            "difference per connect in µs is given too.", "", setup_table(result.records)]
    goal_rows = goals.table(result.records)
    if goal_rows:
        out += ["## Issue 11's goals", "", "The goals of issue 11 (`bench/goals.py`) judged on this run's medians; goals "
                "whose cells this run did not measure are left out.", "", goal_rows]
    out += ["## Grafted vs native and vs nat", "", ratio_summary(result.records),
            "## All results", "", summary_table(result.records)]
    if plots:
        out += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    kinds = sorted({k for by_w in result.traffic.values() for k in by_w})
    out += ["## Traffic check", "", "What each topology moved over all measured runs (the tools' own counts):", "",
            "| topology | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for t, by_w in result.traffic.items():
        out.append(f"| {t} | " + " | ".join(fmt(by_w.get(k)) for k in kinds) + " |")
    for t, n in result.links.items():
        out.append(f"\n{t}: {n:,} bytes through its veths; {result.dnat.get(t, 0):,} packets through the DNAT publish.")
    out += conntrack_section(result.conntrack)
    out += time_wait_section(result.time_wait)
    if result.errors:
        out += ["", "## Errors (cells not measured)", ""]
        for e in result.errors:
            where = " ".join(str(e.get(k, "")) for k in ("workload", "topology", "direction") if e.get(k))
            out.append(f"- {where or e.get('where')} {params_label(e.get('workload', ''), e.get('params', {})) if e.get('params') else ''}: {e['error']}")
    return "\n".join(out) + "\n"


def time_wait_section(tw: dict) -> list[str]:
    """The host's TIME_WAIT table during the run: its limit, and whether it overflowed (a socket
    closed without TIME_WAIT costs less: cells that ran with a full table are not comparable)."""
    out = ["", "## TIME_WAIT", ""]
    if not tw:
        return out + ["The TIME_WAIT table's limit could not be read."]
    n = tw.get("overflows")
    out.append(f"tcp_max_tw_buckets {tw['max']:,} during the run (raised from {tw.get('was') or tw['max']} while a bench "
               "runs, so that every cell's client pays TIME_WAIT as clients do); sockets closed without TIME_WAIT "
               f"because the table was full: {'unknown' if n is None else f'{n:,}'} (host-wide).")
    if n:
        out.append("The connection-setup cells of this run met a full table part of the time: their ratios are suspect.")
    return out


def conntrack_section(ct: dict) -> list[str]:
    """The host's connection tracking during the run: its limit, the most entries seen, and the
    cells during which a full table dropped packets ("nf_conntrack: table full") or evicted entries."""
    out = ["", "## conntrack", ""]
    if not ct:
        return out + ["Connection tracking was not loaded in the host netns during the run."]
    out.append(f"nf_conntrack_max {ct['max']:,} during the run (a nat topology raises it to at least 2,097,152 "
               "while it is up, and it is restored after); "
               f"most entries seen after a cell: {ct['peak']:,}. Over the whole run: {ct.get('drop', 0):,} packets "
               f"dropped on a full table, {ct.get('early_drop', 0):,} entries evicted early, "
               f"{ct.get('insert_failed', 0):,} failed inserts (host-wide counters: other work on the machine counts too).")
    cells = ct.get("cells", [])
    if cells:
        out += ["", "| cell | topologies | entries after | dropped (table full) | evicted early | failed inserts |",
                "|---|---|---|---|---|---|"]
        for c in cells:
            label = f"{c['workload']} {DIRECTION_NAMES.get(c['direction'], c['direction'])} {', '.join(c['params'])}"
            out.append(f"| {label} | {', '.join(c['topologies'])} | {c['count']:,} | {c.get('drop', 0):,} | "
                       f"{c.get('early_drop', 0):,} | {c.get('insert_failed', 0):,} |")
        out += ["", "Cells listed here may have lost packets to the table, not to the topology: their spread is suspect."]
    else:
        out.append("No cell saw the table full.")
    return out


def _load(v) -> str:
    return " ".join(f"{x:.2f}" for x in v) if v else "?"


def plots(result, out_dir: str) -> list[str]:
    """Grouped bar charts with min–max error bars, one per (workload, direction, metric), like the
    original figures (Host / GRAFT / NAT bars per message size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"native": "#4c72b0", "nat": "#dd8452", "nat-mtu65520": "#f2c45f", "graft-api": "#55a868",
              "graft-preload": "#2f7d4a", "graft-seccomp": "#8fd19e", "seccomp-floor": "#bdbdbd", "docker": "#c44e52",
              "rootless-slirp4netns": "#8172b3", "rootless-pasta": "#b39ddb", "rootless-graft": "#1b5e20",
              "rootless-graft-seccomp": "#66bb6a"}
    figs: dict[tuple, dict] = {}
    for rec in result.records:
        if rec["metric"] in ("latency-p50", "latency-p99", "loss", "bandwidth", "errors"):
            continue
        key = (rec["workload"], rec["direction"], rec["metric"], rec["unit"])
        figs.setdefault(key, {}).setdefault(params_label(rec["workload"], rec["params"]), {})[rec["topology"]] = rec
    written = []
    for (workload, direction, metric, unit), by_param in figs.items():
        labels = list(by_param)
        topos = _order({t for v in by_param.values() for t in v})
        width = 0.8 / len(topos)
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels) + 2), 3.6))
        for i, t in enumerate(topos):
            xs, ys, lo, hi = [], [], [], []
            for j, lab in enumerate(labels):
                r = by_param[lab].get(t)
                if r:
                    xs.append(j + (i - (len(topos) - 1) / 2) * width)
                    ys.append(r["median"])
                    lo.append(r["median"] - r["min"])
                    hi.append(r["max"] - r["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=t, color=colors.get(t), edgecolor="black", linewidth=0.4)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20 if len(labels) > 3 else 0, fontsize=8)
        ax.set_ylabel(f"{metric} ({unit})")
        ax.set_title(f"{workload}, {DIRECTION_NAMES.get(direction, direction)}"
                     + (" (lower is better)" if lower_is_better(unit) else ""), fontsize=10)
        ax.grid(axis="y", linestyle=":", linewidth=0.5)
        ax.legend(fontsize=7, ncol=min(len(topos), 4), loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(labels) > 3 else -0.1),
                  frameon=False)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{workload}-{direction}-{metric}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
