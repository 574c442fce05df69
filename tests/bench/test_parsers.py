"""Parsers of the tools' real output (captured from this machine's sockperf 3.7, wrk 4.1, siege 4.0,
nginx 1.22's stub_status) and the checks made on what the servers saw."""
from __future__ import annotations

import pytest

from sockgraft.bench.topologies import TopologyError
from sockgraft.bench.base import size_label
from sockgraft.bench.connsetup import check_closes
from sockgraft.bench.parsers import new_connections, parse_siege, parse_sockperf, parse_stub_status, parse_wrk
from sockgraft.bench.pypeer import _percentile

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


STUB = """Active connections: 1 
server accepts handled requests
 1040 1040 1045 
Reading: 0 Writing: 1 Waiting: 0 
"""


def test_stub_status():
    assert parse_stub_status(STUB) == {"accepts": 1040, "handled": 1040, "requests": 1045}
    with pytest.raises(TopologyError):
        parse_stub_status("<html>404 Not Found</html>")


def test_new_connection_per_request_is_checked():
    before = {"accepts": 10, "handled": 10, "requests": 10}
    # wrk counted 1000 requests; nginx saw 1000 + the second status read, each on a connection of its own
    seen = new_connections(before, {"accepts": 1011, "handled": 1011, "requests": 1011}, 1000, close=True)
    assert seen == {"connections": 1000, "requests": 1000}
    # the same requests over 16 kept-alive connections: refused for a close cell, fine for keep-alive
    kept = {"accepts": 27, "handled": 27, "requests": 1011}
    with pytest.raises(TopologyError, match="reused connections"):
        new_connections(before, kept, 1000, close=True)
    assert new_connections(before, kept, 1000, close=False) == {"connections": 16, "requests": 1000}
    with pytest.raises(TopologyError, match="not this nginx"):  # fewer requests than wrk says it made
        new_connections(before, {"accepts": 511, "handled": 511, "requests": 511}, 1000, close=True)


def test_churn_close_check():
    check_closes({"server": {"fin": 300, "rst": 0}}, 300)
    with pytest.raises(TopologyError, match="reset"):
        check_closes({"server": {"fin": 0, "rst": 300}}, 300)  # SO_LINGER 0 would look like this
    with pytest.raises(TopologyError, match="saw 299"):
        check_closes({"server": {"fin": 299, "rst": 0}}, 300)


def test_percentile_nearest_rank():
    ns = sorted(range(1000, 101_000, 1000))  # 1..100 µs
    assert _percentile(ns, 0.50) == 50.0 and _percentile(ns, 0.99) == 99.0 and _percentile([7000], 0.99) == 7.0
