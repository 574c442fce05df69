"""`graft bench`: native vs docker0-like NAT vs grafted, on this machine."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys

import click

from sockgraft.core.endpoint import SpecError


def _split(values: tuple[str, ...]) -> list[str] | None:
    out = [v for item in values for v in item.replace(",", " ").split() if v]
    return out or None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="Small profile (container→host, one variant per tool, plus connection setup both ways; < 4 min).")
@click.option("--json", "json_file", metavar="FILE", help="Write the result records as a JSON list to FILE.")
@click.option("--out", "out_dir", metavar="DIR", help="Directory for report.md, results.json and plots "
              "(default ./graft-bench-UTCTIME).")
@click.option("--workloads", "workloads", multiple=True, metavar="LIST",
              help="iperf3,sockperf,http,zmq,python,control,churn (default: all).")
@click.option("--topologies", "topologies", multiple=True, metavar="LIST",
              help="native,nat,nat-mtu65520,graft-api,graft-preload,graft-seccomp,seccomp-floor,docker (default: these; "
                   "--quick leaves out nat-mtu65520) and, only when named, rootless-slirp4netns,rootless-pasta,"
                   "rootless-graft,rootless-graft-seccomp (the container side as a user made for the run).")
@click.option("--runs", type=click.IntRange(1, 100), help="Measured runs per cell (a warm-up run comes on top).")
@click.option("--seconds", type=click.FloatRange(0.5, 60), help="Duration of one tool measurement in seconds (whole seconds for iperf3/sockperf/wrk/siege; "
              "Python peers run half of it).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--no-progress", is_flag=True, help="No live progress display.")
def bench(quick, json_file, out_dir, workloads, topologies, runs, seconds, no_plots, no_progress) -> None:
    """Measure native vs docker0-like NAT vs grafted sockets with real tools (iperf3, sockperf,
    nginx+wrk/siege, ZeroMQ), connection setup (new connection per request, client-first-close
    churn, the control path) and write a Markdown report with plots."""
    from rich.console import Console

    from sockgraft.bench import report
    from sockgraft.bench.runner import run_bench
    from sockgraft.bench.stats import validate
    from sockgraft.bench.topologies import TopologyError
    from sockgraft.bench.base import FULL, QUICK

    if os.geteuid() != 0:
        raise SpecError("graft bench needs root (it builds namespaces, links and nft tables)")
    profile = QUICK if quick else FULL
    if runs:
        profile = dataclasses.replace(profile, runs=runs)
    if seconds:
        profile = dataclasses.replace(profile, seconds=seconds, py_seconds=seconds / 2)
    topo_list = _split(topologies)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = out_dir or f"graft-bench-{stamp}"
    console = Console(stderr=True)
    try:
        result = run_bench(profile, topo_list, _split(workloads), progress=not no_progress, console=console)
    except (ValueError, TopologyError) as e:
        raise SpecError(str(e)) from None
    for rec in result.records:
        validate(rec)
    os.makedirs(out_dir, exist_ok=True)
    records_json = json.dumps(result.records, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        f.write(records_json)
    if json_file:
        with open(json_file, "w") as f:
            f.write(records_json)
    pngs = [] if no_plots else report.plots(result, out_dir)
    text = report.markdown(result, pngs)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    click.echo(text)
    console.print(f"report: {os.path.join(out_dir, 'report.md')}" + (f", json: {json_file}" if json_file else ""))
    if not result.records:
        sys.exit(1)
