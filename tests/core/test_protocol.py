import socket

import pytest
from hypothesis import given, strategies as st

from sockgraft.core.protocol import MAX_POOL, ProtocolError, Reply, Request, parse_reply, parse_request

REQUESTS = [
    Request("named", name="ep-http", family=0, type=1, proto=0, flags=frozenset({"reuseaddr"})),
    Request("dial", name="u", type=1, proto=0),
    Request("bind", family=2, addr="0.0.0.0", port=80, type=1, proto=6, flags=frozenset()),
    Request("connect", family=10, addr="::1", port=443, type=2, proto=0),
    Request("namedpool", name="ep-http", family=10, type=2, proto=0, count=16),
    Request("bindpool", family=2, addr="0.0.0.0", port=80, type=1, proto=6, flags=frozenset({"v6only"}), count=3),
    Request("resolve", name="ep"),
    Request("show"),
]


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: r.verb)
def test_request_round_trip(req):
    assert parse_request(req.encode()) == req


@pytest.mark.parametrize("data", [
    b"", b"named", b"named ep 0 1 0", b"named ep 0 1 0 - extra", b"bogus", b"named ep 3 1 0 -",
    b"named ep 0 1 0 hack", b"bind 2 1.2.3 80 1 0 -", b"bind 2 ::1 80 1 0 -", b"bind 1 x 80 1 0 -",
    b"connect 2 127.0.0.1 70000 1 0", b"named \xff 0 1 0 -", b"resolve " + b"x" * 16, b"x" * 5000,
    b"named ep -1 1 0 -", b"show  ",
    b"namedpool ep 0 1 0 0", b"namedpool ep 0 1 0 %d" % (MAX_POOL + 1), b"namedpool ep 0 1 0", b"namedpool ep 0 1 0 4 in:0.0.0.0:80=ep",
    b"namedpool ep 3 1 0 4", b"bindpool 2 0.0.0.0 80 1 0 - 0", b"bindpool 2 0.0.0.0 80 1 0 -", b"bindpool 2 0.0.0.0 80 1 0 - 2 out:0.0.0.0/0=ep",
])
def test_bad_requests(data):
    with pytest.raises(ProtocolError):
        parse_request(data)


@given(st.binary(max_size=200))
def test_request_parser_never_crashes(data):
    try:
        parse_request(data)
    except ProtocolError:
        pass


@pytest.mark.parametrize("reply", [
    Reply("ok", family=socket.AF_INET, addr="127.0.0.1", port=8080),
    Reply("ok", family=socket.AF_INET6, addr="::1", port=1),
    Reply("ok", family=socket.AF_UNIX, addr="/tmp/a b"),
    Reply("ok", lines=("a type ipv4 addr 1.1.1.1 port 1", "b type unix path /x")),
    Reply("ok"),
    Reply("local"),
    Reply("err", errno=13, message="no endpoint 'x' here"),
])
def test_reply_round_trip(reply):
    assert parse_reply(reply.encode()) == reply
