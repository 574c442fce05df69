import pytest
from hypothesis import given, strategies as st

from sockgraft.core.endpoint import Endpoint, SpecError, conflicts, parse_endpoint

names = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=15)


def test_parse_forms():
    assert parse_endpoint("ep-http type ipv4 addr 127.0.0.1 port 80") == Endpoint("ep-http", "ipv4", "127.0.0.1", 80)
    assert parse_endpoint("o type ipv6 addr ::1 port dynamic") == Endpoint("o", "ipv6", "::1", None)
    assert parse_endpoint("u type unix path /run/x.sock") == Endpoint("u", "unix", path="/run/x.sock")
    # keywords in any order, as iproute2 allows
    assert parse_endpoint("e port 8 addr 10.0.0.1 type ipv4").port == 8


def test_ipv6_normalised():
    assert parse_endpoint("e type ipv6 addr 0:0:0:0:0:0:0:1 port 1").addr == "::1"


@pytest.mark.parametrize("spec,msg", [
    ("", "missing endpoint name"),
    ("0123456789abcdef type ipv4 addr 1.1.1.1 port 1", "1 to 15"),
    ("é type ipv4 addr 1.1.1.1 port 1", "printable ASCII"),
    ("e type ipv5 addr 1.1.1.1 port 1", "type must be"),
    ("e type ipv4 addr 1.1.1 port 1", "bad address"),
    ("e type ipv4 addr ::1 port 1", "not an IPv4"),
    ("e type ipv6 addr 1.1.1.1 port 1", "not an IPv6"),
    ("e type ipv4 addr 1.1.1.1 port 65536", "bad port"),
    ("e type ipv4 addr 1.1.1.1 port -1", "bad port"),
    ("e type ipv4 addr 1.1.1.1 port 0x10", "bad port"),
    ("e type ipv4 addr 1.1.1.1", "takes exactly"),
    ("e type ipv4 addr 1.1.1.1 port 1 path /x", "takes exactly"),
    ("e type ipv4 addr 1.1.1.1 port", "needs a value"),
    ("e type unix path /" + "x" * 107, "too long"),
    ("e type unix path rel.sock", "absolute"),
    ("e type unix addr 1.1.1.1", "takes exactly"),
    ("e colour red", "unknown keyword"),
    ("e type ipv4 type ipv4 addr 1.1.1.1 port 1", "given twice"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(SpecError, match=msg):
        parse_endpoint(spec)


def test_unix_path_limit_is_107_bytes():
    assert parse_endpoint("e type unix path /" + "x" * 106).path
    with pytest.raises(SpecError):
        parse_endpoint("e type unix path /" + "é" * 54)  # 109 bytes in UTF-8


@given(names, st.sampled_from(["127.0.0.1", "10.1.2.3", "0.0.0.0"]), st.one_of(st.none(), st.integers(0, 65535)))
def test_line_and_json_round_trip(name, addr, port):
    ep = Endpoint(name, "ipv4", addr, port)
    assert parse_endpoint(ep.line()) == ep
    assert Endpoint.from_json(ep.to_json()) == ep


@given(st.text(max_size=60))
def test_parser_never_crashes(text):
    try:
        parse_endpoint(text)
    except SpecError:
        pass


def test_conflicts():
    a = parse_endpoint("a type ipv4 addr 127.0.0.1 port 80")
    assert conflicts(a, parse_endpoint("b type ipv4 addr 127.0.0.1 port 80"))
    assert conflicts(a, parse_endpoint("b type ipv4 addr 0.0.0.0 port 80"))
    assert not conflicts(a, parse_endpoint("b type ipv4 addr 127.0.0.2 port 80"))
    assert not conflicts(a, parse_endpoint("b type ipv4 addr 127.0.0.1 port dynamic"))
    assert conflicts(parse_endpoint("u type unix path /a"), parse_endpoint("v type unix path /a"))
