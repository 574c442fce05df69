"""Parsers of the tools' output (sockperf, wrk, siege, nginx's stub_status) and the check that a
wrk run with "Connection: close" really opened a connection per request."""
from __future__ import annotations

import re

from sockgraft.bench.topologies import TopologyError


def parse_sockperf(out: str) -> dict:
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)
    avg = re.search(r"avg-latency=\s*([\d.]+)", out)
    p50 = re.search(r"percentile 50\.000 =\s*([\d.]+)", out)
    p99 = re.search(r"percentile 99\.000 =\s*([\d.]+)", out)
    count = re.search(r"ReceivedMessages=(\d+)", out)
    if not (avg and p50 and p99 and count):
        raise TopologyError(f"sockperf printed no latency: {' | '.join(out.strip().splitlines()[-3:])}")
    return {"latency-avg": (float(avg.group(1)), "µs"), "latency-p50": (float(p50.group(1)), "µs"),
            "latency-p99": (float(p99.group(1)), "µs"), "_messages": (int(count.group(1)), "msgs")}


def parse_wrk(out: str) -> dict:
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)|Socket errors:.*", out)
    if not rps or not n or int(n.group(1)) == 0:
        raise TopologyError(f"wrk measured nothing: {' | '.join(out.strip().splitlines()[-3:])}")
    if errors and "Non-2xx" in errors.group(0):
        raise TopologyError(f"wrk: {errors.group(0)}")
    return {"requests": (float(rps.group(1)), "req/s"), "_requests": (int(n.group(1)), "req")}


def parse_siege(out: str) -> dict:
    rate = re.search(r"Transaction rate:\s*([\d.]+)", out)
    ok = re.search(r"Successful transactions:\s*(\d+)", out)
    failed = re.search(r"Failed transactions:\s*(\d+)", out)
    if not rate or not ok or int(ok.group(1)) == 0:
        raise TopologyError(f"siege measured nothing: {' | '.join(out.strip().splitlines()[-3:])}")
    if failed and int(failed.group(1)):
        raise TopologyError(f"siege: {failed.group(1)} failed transactions")
    return {"transactions": (float(rate.group(1)), "trans/s"), "_requests": (int(ok.group(1)), "req")}


def parse_stub_status(out: str) -> dict:
    """nginx's stub_status page -> {"accepts", "handled", "requests"} (counters since nginx started)."""
    m = re.search(r"server accepts handled requests\s+(\d+)\s+(\d+)\s+(\d+)", out)
    if not m:
        raise TopologyError(f"not an nginx stub_status page: {out.strip()[:120]!r}")
    return {"accepts": int(m.group(1)), "handled": int(m.group(2)), "requests": int(m.group(3))}


def new_connections(before: dict, after: dict, wrk_requests: int, close: bool) -> dict:
    """What nginx saw between two stub_status reads (each read is one connection and one request of
    its own; the second read counts itself): {"connections", "requests"} of the run in between.
    With close=True every request must have come on a connection of its own (connections >=
    requests >= what wrk counted): wrk without the header (or with "Connection:close", without the
    space) silently keeps connections alive, and that is refused here."""
    conns = after["accepts"] - before["accepts"] - 1
    reqs = after["requests"] - before["requests"] - 1
    if reqs < wrk_requests:
        raise TopologyError(f"nginx served {reqs} requests, wrk counted {wrk_requests}: not this nginx?")
    if close and conns < reqs:
        raise TopologyError(f"wrk reused connections: {reqs} requests on {conns} new connections "
                            "(is the header exactly 'Connection: close'?)")
    return {"connections": conns, "requests": reqs}
