"""Runs a bench: topologies up, workloads interleaved run by run across topologies, everything down."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from itertools import groupby

from sockgraft.bench.debris import sweep, tag
from sockgraft.bench.stats import record, schedule
from sockgraft.bench.sysctl import TIME_WAIT, conntrack_stats, time_wait_overflows, time_wait_update
from sockgraft.bench.topologies import Topology, TopologyError, all_topologies
from sockgraft.bench.base import DIRECTIONS, Profile, Servers
from sockgraft.bench.workloads import WORKLOADS

PINNING = ("sockperf 'pinned': server on CPU 0, client on CPU 1 (taskset); 'unpinned': scheduler's choice. "
           "All other tools unpinned.")


@dataclass
class Result:
    profile: str
    records: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # topology -> why not measured
    na: dict[str, dict[str, str]] = field(default_factory=dict)  # topology -> workload -> why n/a
    traffic: dict[str, dict[str, float]] = field(default_factory=dict)  # topology -> "workload unit" -> amount moved
    links: dict[str, int] = field(default_factory=dict)  # nat topologies: bytes through their veths
    dnat: dict[str, int] = field(default_factory=dict)  # nat topologies: packets through the DNAT publish
    topologies: dict[str, dict] = field(default_factory=dict)  # name -> {"mtu", "describe"}
    # host conntrack: {"max", "peak", "drop", "early_drop", "insert_failed", "cells": [...]}, the
    # counters' increase over the run and per cell group where they moved ("table full")
    conntrack: dict = field(default_factory=dict)
    # TIME_WAIT: {"max": tcp_max_tw_buckets during the run, "was": before it, "overflows": the
    # TCPTimeWaitOverflow increase over the run (sockets closed without TIME_WAIT: a full table)}
    time_wait: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM and SIGHUP interrupt the bench like Ctrl-C, so that teardown runs."""
    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:  # a forked helper (pyroute2 forks for netns work): die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg()}


def select_topologies(names: list[str] | None, state_dir: str, quick: bool = False) -> list[Topology]:
    """The named topologies; none named: the default ones (of the quick profile's, with `quick`)."""
    topos = all_topologies(state_dir)
    if not names:
        return [t for t in topos if t.default and (t.quick or not quick)]
    known = {t.name: t for t in topos}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown topology {', '.join(unknown)} (known: {', '.join(known)})")
    return [known[n] for n in names]


def run_bench(profile: Profile, topologies: list[str] | None = None, workloads: list[str] | None = None,
              progress: bool = True, console=None) -> Result:
    names = workloads or list(WORKLOADS)
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload {', '.join(unknown)} (known: {', '.join(WORKLOADS)})")
    result = Result(profile.name)
    result.meta = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "runs": profile.runs, "warmup": profile.warmup, "seconds": profile.seconds,
                   "pinning": PINNING, **_machine()}
    sweep()
    state_dir = tempfile.mkdtemp(prefix=f"{tag()}-state-")
    topos = select_topologies(topologies, state_dir, quick=profile.name == "quick")
    active: list[Topology] = []
    with _signals_raise():
        try:
            for t in topos:
                why = t.unavailable()
                if why:
                    result.skipped[t.name] = why
                    continue
                try:
                    t.setup()
                except BaseException as e:
                    with contextlib.suppress(Exception):
                        t.teardown()
                    if not isinstance(e, Exception):
                        raise
                    result.skipped[t.name] = f"setup failed: {e}"
                    continue
                active.append(t)
                result.topologies[t.name] = {"mtu": t.mtu, "describe": t.describe()}
            time_wait_update(add=os.getpid())  # room for every cell's TIME_WAIT (bench/sysctl.py)
            try:
                before = time_wait_overflows()
                _run_all(profile, [WORKLOADS[n] for n in names], active, result, progress, console)
            finally:
                after = time_wait_overflows()
                with contextlib.suppress(OSError, ValueError):
                    result.time_wait = {"max": int(TIME_WAIT.read()), "was": TIME_WAIT.original(),
                                        "overflows": after - before if None not in (before, after) else None}
                time_wait_update(remove=os.getpid())
        finally:
            errors = []
            for t in active:
                try:
                    t.teardown()
                except Exception as e:
                    errors.append(f"{t.name}: {e}")
            shutil.rmtree(state_dir, ignore_errors=True)
            result.meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            result.meta["loadavg_end"] = os.getloadavg()
            if errors:
                result.errors.append({"where": "teardown", "error": "; ".join(errors)})
    return result


def _plan(profile: Profile, workloads, active: list[Topology], result: Result):
    """[(workload, direction, [params...] with one server set, [topologies])]"""
    plan = []
    for w in workloads:
        cells = []
        for t in active:
            why = t.na(w.kind) or (t.na("python-peer") if w.python_peer else None)
            if why:
                result.na.setdefault(t.name, {})[w.name] = why
            else:
                cells.append(t)
        if not cells:
            continue
        variants = w.variants(profile)
        for direction in w.directions(profile):
            here = [p for p in variants if w.applies(p, direction, profile)]
            built = []
            for t in cells:
                why = t.na_direction(direction)
                if why and here:
                    result.na.setdefault(t.name, {})[f"{w.name} {direction}"] = why
                elif not why:
                    built.append(t)
            if not built:
                continue
            for _key, group in groupby(here, key=w.server_key):
                plan.append((w, direction, list(group), built))
    return plan


def _progress(console, enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console or Console(stderr=True), transient=False)


COUNTERS = ("drop", "early_drop", "insert_failed")


def _conntrack_cell(result: Result, before: dict, w, direction: str, group: list, cells: list[Topology]) -> dict:
    """Note what conntrack did during one cell group (entries peak, counters moved); the new stats."""
    now = conntrack_stats()
    ct = result.conntrack
    if not now:
        return now
    if not ct:
        ct.update(max=now["max"], peak=now["count"], **{k: 0 for k in COUNTERS})
    if not before:
        return now
    ct["max"] = max(ct.get("max", 0), now["max"])
    ct["peak"] = max(ct.get("peak", 0), now["count"])
    moved = {k: now[k] - before[k] for k in COUNTERS if now[k] > before[k]}
    for k, v in moved.items():
        ct[k] = ct.get(k, 0) + v
    if moved:
        ct.setdefault("cells", []).append({"workload": w.name, "direction": direction,
                                           "params": [w.label(p) for p in group], "count": now["count"],
                                           "topologies": [t.name for t in cells], **moved})
    return now


def _run_all(profile: Profile, workloads, active: list[Topology], result: Result, progress: bool, console) -> None:
    plan = _plan(profile, workloads, active, result)
    ct = _conntrack_cell(result, {}, None, "", [], [])
    total = sum((len(params) * profile.runs + profile.warmup) * len(cells) for _w, _d, params, cells in plan)
    with _progress(console, progress) as bar:
        task = bar.add_task("bench", total=total) if bar else None
        for w, direction, group, cells in plan:
            client_side, server_side = DIRECTIONS[direction]
            servers: dict[str, Servers] = {}
            failed: dict[str, str] = {}
            try:
                for t in cells:
                    s = Servers(t)
                    servers[t.name] = s
                    try:
                        w.start(s, server_side, group[0])
                    except Exception as e:
                        failed[t.name] = f"server: {e}"
                for i, params in enumerate(group):
                    values: dict[tuple[str, str, str], list[float]] = {}
                    broken = dict(failed)
                    # one warm-up per server group: the first variant measured on freshly started servers
                    for run, t, warm in schedule(cells, profile.runs, profile.warmup if i == 0 else 0):
                        if bar:
                            bar.update(task, description=f"{w.name} {w.label(params)} {direction} {t.name} "
                                                         f"{'warm-up' if warm else f'run {run}'}")
                        if t.name not in broken:
                            try:
                                m = w.measure(t, servers[t.name], client_side,
                                              w.warm_params(params, profile) if warm else params, profile)
                            except (TopologyError, ValueError, KeyError, OSError) as e:
                                broken[t.name] = str(e)
                            else:
                                if not warm:
                                    for metric, (value, unit) in m.items():
                                        values.setdefault((t.name, metric, unit), []).append(value)
                        if bar:
                            bar.advance(task)
                    for (tname, metric, unit), vals in values.items():
                        if tname in broken:
                            continue
                        if metric.startswith("_"):
                            tr = result.traffic.setdefault(tname, {})
                            k = f"{w.name} {metric[1:]}"
                            tr[k] = tr.get(k, 0) + sum(vals)
                        else:
                            result.records.append(record(w.name, tname, direction, params, metric, unit, vals))
                    for tname, err in broken.items():
                        result.errors.append({"workload": w.name, "topology": tname, "direction": direction,
                                              "params": dict(params), "error": err})
            finally:
                for s in servers.values():
                    s.stop()
                ct = _conntrack_cell(result, ct, w, direction, group, cells)
        for t in active:
            if hasattr(t, "link_bytes"):
                with contextlib.suppress(Exception):
                    result.links[t.name] = t.link_bytes()
                    result.dnat[t.name] = t.dnat_packets()
