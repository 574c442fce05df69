"""Parsers of the tools' real output (captured from this machine's sockperf 3.7, wrk 4.1, siege 4.0)."""
from __future__ import annotations

import pytest

from sockgraft.bench.topologies import TopologyError
from sockgraft.bench.workloads import parse_siege, parse_sockperf, parse_wrk, size_label

SOCKPERF = """sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=32178; ReceivedMessages=32178
sockperf: \x1b[2;35m====> avg-latency=8.526 (std-dev=43.260)\x1b[0m
sockperf: ---> percentile 99.000 =   15.203
sockperf: ---> percentile 50.000 =    6.866
"""
WRK = """Running 1s test @ http://127.0.0.1:49763/f1k
  1038 requests in 1.00s, 1.21MB read
Requests/sec:   1035.83
Transfer/sec:      1.21MB"""
SIEGE = """Transactions:		        1024 hits
Transaction rate:	      632.10 trans/sec
Successful transactions:        1024
Failed transactions:	        0
"""


def test_sockperf():
    r = parse_sockperf(SOCKPERF)
    assert r["latency-avg"] == (8.526, "µs") and r["latency-p50"][0] == 6.866 and r["latency-p99"][0] == 15.203
    assert r["_messages"][0] == 32178
    with pytest.raises(TopologyError):
        parse_sockperf("sockperf: ERROR: Can`t connect socket (errno=111 Connection refused)")


def test_wrk_and_siege():
    assert parse_wrk(WRK)["requests"] == (1035.83, "req/s")
    with pytest.raises(TopologyError):
        parse_wrk(WRK.replace("1038 requests", "0 requests"))
    assert parse_siege(SIEGE)["transactions"] == (632.10, "trans/s")
    with pytest.raises(TopologyError):
        parse_siege(SIEGE.replace("Failed transactions:\t        0", "Failed transactions:\t        7"))


def test_size_labels():
    assert [size_label(n) for n in (64, 1024, 65536, 1 << 20)] == ["64B", "1KiB", "64KiB", "1MiB"]
