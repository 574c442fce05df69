import errno
import ipaddress
import socket

import pytest
from hypothesis import given, strategies as st

from sockgraft.core.endpoint import SpecError, parse_endpoint
from sockgraft.core.engine import DENY, GRANT, LOCAL, Op, Policy
from sockgraft.core.rules import parse_egress, parse_ingress

S, D = socket.SOCK_STREAM, socket.SOCK_DGRAM
V4, V6 = socket.AF_INET, socket.AF_INET6


class Ask:
    """A policy asked one verb at a time (each question is one `Op` for `Policy.decide`)."""

    def __init__(self, pol: Policy):
        self.pol = pol

    def named(self, name, family=0, sotype=S, proto=0, **kw):
        return self.pol.decide(Op("named", family, type=sotype, proto=proto, name=name, **kw))

    def dial(self, name, sotype=S, proto=0, **kw):
        return self.pol.decide(Op("dial", type=sotype, proto=proto, name=name, **kw))

    def bind(self, family, addr, port, sotype, proto=0, **kw):
        return self.pol.decide(Op("bind", family, addr, port, sotype, proto, **kw))

    def connect(self, family, addr, port, sotype, proto=0, **kw):
        return self.pol.decide(Op("connect", family, addr, port, sotype, proto, **kw))

    def sendto(self, family, addr, port, sotype, proto=0, **kw):
        return self.pol.decide(Op("sendto", family, addr, port, sotype, proto, **kw))


def policy(eps=(), ingress=(), egress=()):
    endpoints = {e.name: e for e in map(parse_endpoint, eps)}
    return Ask(Policy(endpoints, [parse_ingress(p) for p in ingress], [parse_egress(r) for r in egress]))


def test_ingress_forms():
    p = parse_ingress("0.0.0.0:80=ep-http")
    assert (str(p.addr), p.port_lo, p.port_hi, p.endpoint) == ("0.0.0.0", 80, 80, "ep-http")
    assert parse_ingress("[::]:80=e").addr == ipaddress.ip_address("::")
    assert parse_ingress(":::80=e").addr == ipaddress.ip_address("::")
    r = parse_ingress("127.0.0.1:8000-8100=e")
    assert (r.port_lo, r.port_hi) == (8000, 8100)
    assert str(parse_ingress(str(r))) == str(r)


@pytest.mark.parametrize("spec", ["0.0.0.0:80", "=e", "0.0.0.0=e", "1.2.3:80=e", "0.0.0.0:90-80=e",
                                  "0.0.0.0:70000=e", "[::]80=e", "0.0.0.0:80=" , "0.0.0.0:80=a b"])
def test_bad_ingress(spec):
    with pytest.raises(SpecError):
        parse_ingress(spec)


@pytest.mark.parametrize("spec", ["10.0.0.0/33=e", "10.0.0.1/8=e", "x/8=e", "10.0.0.0/8"])
def test_bad_egress(spec):
    with pytest.raises(SpecError):
        parse_egress(spec)


@given(st.text(max_size=40))
def test_rule_parsers_never_crash(text):
    for parser in (parse_ingress, parse_egress):
        try:
            parser(text)
        except SpecError:
            pass


@given(st.ip_addresses(v=4), st.integers(0, 65535), st.integers(0, 65535))
def test_ingress_round_trip(ip, lo, span):
    hi = min(65535, lo + span)
    pair = parse_ingress(f"{ip}:{lo}-{hi}=e")
    assert parse_ingress(str(pair)) == pair


HTTP = "ep-http type ipv4 addr 127.0.0.1 port 8080"
OUT = "ep-out type ipv4 addr 127.0.0.1 port dynamic"
OUT6 = "ep-out6 type ipv6 addr ::1 port dynamic"


def test_named_grant_and_unknown():
    p = policy([HTTP])
    d = p.named("ep-http", 0, S)
    assert (d.verdict, d.family, d.host) == (GRANT, V4, ("127.0.0.1", 8080))
    d = p.named("nope", 0, S)
    assert (d.verdict, d.errno) == (DENY, errno.EADDRNOTAVAIL)


def test_named_refuses_raw_and_other_protocols():
    p = policy([HTTP])
    assert p.named("ep-http", 0, socket.SOCK_RAW).errno == errno.EACCES
    assert p.named("ep-http", 0, S, socket.IPPROTO_UDP).errno == errno.EPROTONOSUPPORT
    assert p.named("ep-http", 0, D, socket.IPPROTO_UDP).granted


def test_v6_socket_on_v4_endpoint_is_v4_mapped():
    d = policy([HTTP]).named("ep-http", V6, S)
    assert (d.family, d.host) == (V6, ("::ffff:127.0.0.1", 8080))
    assert policy([OUT6]).named("ep-out6", V4, S).errno == errno.EAFNOSUPPORT


def test_ingress_first_match_and_wildcards():
    p = policy([HTTP, "other type ipv4 addr 127.0.0.2 port 9"],
               ["10.0.0.1:80=other", "0.0.0.0:80=ep-http", "0.0.0.0:80=other"])
    assert p.bind(V4, "10.0.0.1", 80, S).endpoint.name == "other"
    assert p.bind(V4, "127.0.0.1", 80, S).endpoint.name == "ep-http"
    assert p.bind(V4, "127.0.0.1", 81, S).verdict == LOCAL
    assert p.bind(V6, "::", 80, S, v6only=True).verdict == LOCAL  # no v6 pair
    assert p.bind(V6, "::1", 80, S).verdict == LOCAL  # not a wildcard: IPv6 only
    assert p.bind(socket.AF_UNIX, "", 0, S).verdict == LOCAL


def test_ingress_ranges_and_missing_endpoint():
    p = policy([HTTP], ["0.0.0.0:8000-8100=ep-http", "0.0.0.0:9000=gone"])
    assert p.bind(V4, "0.0.0.0", 8050, S).host == ("127.0.0.1", 8080)
    assert p.bind(V4, "0.0.0.0", 8101, S).verdict == LOCAL
    d = p.bind(V4, "0.0.0.0", 9000, S)
    assert (d.verdict, d.errno) == (DENY, errno.EADDRNOTAVAIL)


def test_egress_longest_prefix():
    p = policy([OUT, "narrow type ipv4 addr 127.0.0.3 port dynamic"],
               egress=["127.0.0.0/8=ep-out", "127.0.0.9/32=narrow"])
    assert p.connect(V4, "127.0.0.5", 80, S).endpoint.name == "ep-out"
    d = p.connect(V4, "127.0.0.9", 80, S)
    assert (d.endpoint.name, d.host) == ("narrow", ("127.0.0.3", 0))
    assert p.connect(V4, "10.0.0.1", 80, S).verdict == LOCAL
    assert p.sendto(V4, "127.0.0.5", 53, D).granted


def test_egress_v4_mapped_destination_and_family_mismatch():
    p = policy([OUT, OUT6], egress=["127.0.0.0/8=ep-out", "::/0=ep-out6"])
    d = p.connect(V6, "::ffff:127.0.0.1", 80, S)
    assert (d.family, d.host) == (V6, ("::ffff:127.0.0.1", 0))
    assert p.connect(V6, "::1", 80, S).endpoint.name == "ep-out6"
    p2 = policy([OUT6], egress=["127.0.0.0/8=ep-out6"])
    assert p2.connect(V4, "127.0.0.1", 80, S).errno == errno.EAFNOSUPPORT


def test_bbconn():
    ep = parse_endpoint(OUT)
    p = Ask(Policy({"ep-out": ep}).with_caller_rules(bbconn=["ep-out"]))
    assert p.connect(V4, "127.0.0.1", 1, S).granted
    assert p.connect(V6, "::1", 1, S).verdict == LOCAL
    unknown = Ask(Policy({"ep-out": ep}).with_caller_rules(bbconn=["nope"]))
    assert unknown.connect(V4, "127.0.0.1", 1, S).errno == errno.EADDRNOTAVAIL


def test_caller_rules_replace_stored_rules_of_their_kind_only():
    p = policy([HTTP, OUT], ["0.0.0.0:80=ep-http"], ["127.0.0.0/8=ep-out"]).pol
    q = Ask(p.with_caller_rules(ingress=[parse_ingress("0.0.0.0:81=ep-http")]))
    assert q.bind(V4, "0.0.0.0", 80, S).verdict == LOCAL and q.bind(V4, "0.0.0.0", 81, S).granted
    assert q.connect(V4, "127.0.0.1", 1, S).granted  # stored egress kept


def test_dual_stack_wildcard_bind_is_matched_by_ipv4_pairs():
    p = policy([HTTP], ["0.0.0.0:80=ep-http"])
    d = p.bind(V6, "::", 80, S)  # Go's ":80", busybox httpd: [::]:80 with V6ONLY off
    assert (d.verdict, d.family, d.host) == (GRANT, V6, ("::ffff:127.0.0.1", 8080))
    assert "dual-stack" in d.reason
    assert p.bind(V6, "::", 80, S, v6only=True).verdict == LOCAL
    assert p.bind(V6, "::", 81, S).verdict == LOCAL
    ranged = policy([HTTP], ["127.0.0.1:8000-8100=ep-http"])
    assert ranged.bind(V6, "::", 8050, S).granted  # the [::] socket listens on 127.0.0.1 too
    # an IPv6 pair listed first wins, as pairs match in order
    both = policy([HTTP, "six type ipv6 addr ::1 port 80"], ["[::]:80=six", "0.0.0.0:80=ep-http"])
    assert both.bind(V6, "::", 80, S).endpoint.name == "six"


def test_dial_needs_a_fixed_port():
    p = policy([HTTP, OUT])
    assert p.dial("ep-http").granted
    d = p.dial("ep-out")
    assert (d.verdict, d.errno) == (DENY, errno.EINVAL)


def test_bound_socket_stays_local_on_egress():
    p = policy([OUT], egress=["127.0.0.0/8=ep-out"])
    assert p.connect(V4, "127.0.0.1", 80, S).granted
    assert p.connect(V4, "127.0.0.1", 80, S, bound=True).verdict == LOCAL


def test_foreign_caller_is_never_granted():
    p = policy([HTTP, OUT], ["0.0.0.0:80=ep-http"], ["127.0.0.0/8=ep-out"])
    for d in (p.bind(V4, "0.0.0.0", 80, S, foreign=True), p.connect(V4, "127.0.0.1", 1, S, foreign=True),
              p.named("ep-http", foreign=True), p.sendto(V4, "127.0.0.1", 1, D, foreign=True)):
        assert (d.verdict, d.errno) == (DENY, errno.EPERM)
    assert p.bind(V4, "0.0.0.0", 81, S, foreign=True).verdict == LOCAL  # what no rule matches stays


def test_grafted_socket_reaches_only_what_egress_rules_name():
    p = policy([HTTP, OUT], ["0.0.0.0:80=ep-http"], ["127.0.0.2/32=ep-out"])
    for verb in (p.connect, p.sendto):
        assert verb(V4, "127.0.0.2", 53, D, grafted=True).granted
        d = verb(V4, "127.0.0.3", 53, D, grafted=True)
        assert (d.verdict, d.errno) == (DENY, errno.EPERM)
        assert verb(V6, "::1", 53, D, grafted=True).verdict == DENY
    none = policy([HTTP], ["0.0.0.0:80=ep-http"])
    assert none.sendto(V4, "127.0.0.1", 9, D, grafted=True).verdict == DENY


def test_side_doors():
    p = policy()
    for verb in ("ioctl", "bindtodevice"):
        assert p.pol.decide(Op(verb, V4, grafted=True)).errno == errno.EPERM
        assert p.pol.decide(Op(verb, V4)).verdict == LOCAL
    assert p.pol.decide(Op("ioctl", V4, supported=False)).verdict == DENY


def test_unix_endpoint():
    p = policy(["u type unix path /tmp/x.sock"])
    d = p.named("u", 0, S)
    assert (d.family, d.host) == (socket.AF_UNIX, "/tmp/x.sock")
    assert p.named("u", V4, S).errno == errno.EAFNOSUPPORT
    assert policy(["a type unix path @abs"]).named("a").host == "\0abs"


# -- the prefilter: a client may skip asking only where the engine would say "local" ------------
EPS = [HTTP, OUT, OUT6, "web6 type ipv6 addr ::1 port 8443"]
_ports = st.integers(0, 65535)
_pairs = st.one_of(
    st.builds(lambda a, lo, n, e: f"{a}:{lo}-{min(65535, lo + n)}={e}",
              st.sampled_from(["0.0.0.0", "127.0.0.1", "10.1.2.3"]), _ports, st.integers(0, 3), st.sampled_from(["ep-http", "ep-out", "nope"])),
    st.builds(lambda a, lo, e: f"[{a}]:{lo}={e}", st.sampled_from(["::", "::1"]), _ports, st.sampled_from(["web6", "ep-out6"])))
_rules = st.one_of(
    st.builds(lambda n, e: f"{n}={e}", st.sampled_from(["0.0.0.0/0", "127.0.0.0/8", "127.0.0.2/32", "10.0.0.0/8"]),
              st.sampled_from(["ep-out", "ep-http", "nope"])),
    st.builds(lambda n, e: f"{n}={e}", st.sampled_from(["::/0", "::1/128", "fd00::/8"]), st.sampled_from(["ep-out6", "ep-out"])))
_addrs4 = st.sampled_from(["0.0.0.0", "127.0.0.1", "127.0.0.2", "127.0.0.3", "10.1.2.3", "10.9.9.9", "192.0.2.1"])
_addrs6 = st.sampled_from(["::", "::1", "fd00::5", "2001:db8::1", "::ffff:127.0.0.1", "::ffff:10.1.2.3"])


@given(st.lists(_pairs, max_size=4), st.lists(_rules, max_size=4), st.sampled_from(["bind", "connect", "sendto"]),
       st.booleans(), _addrs4, _addrs6, _ports, st.booleans(), st.booleans(), st.sampled_from([S, D]))
def test_prefilter_never_skips_what_the_engine_would_graft(pairs, rules, verb, v6, a4, a6, port, v6only, bound, t):
    pol = policy(EPS, pairs, rules).pol
    op = Op(verb, V6 if v6 else V4, a6 if v6 else a4, port, t, v6only=v6only, bound=bound)
    if pol.decide(op).verdict != LOCAL:
        assert pol.prefilter().might_graft(op), (pairs, rules, op)


def test_prefilter_skips_what_no_rule_can_match():
    pol = policy(EPS, ["0.0.0.0:80=ep-http"], ["127.0.0.2/32=ep-out"]).pol
    pf = pol.prefilter()
    assert not pf.might_graft(Op("bind", V4, "0.0.0.0", 81))
    assert not pf.might_graft(Op("bind", V6, "::", 80, v6only=True))
    assert pf.might_graft(Op("bind", V6, "::", 80))  # dual-stack
    assert not pf.might_graft(Op("connect", V4, "127.0.0.3", 80))
    assert pf.might_graft(Op("connect", V6, "::ffff:127.0.0.2", 80))
    assert pf.lines() == ("bind 4 0.0.0.0 80 80", "egress 4 127.0.0.2 32", f"version {pol.version()}")


def test_the_policy_version_changes_with_anything_in_it():
    """The preload library drops its pooled sockets when the prefilter's text changes: an endpoint
    moved to another address must change it even though no prefix did."""
    def pol(addr, mark=0):
        return Policy({"o": parse_endpoint(f"o type ipv4 addr {addr} port dynamic")}, [],
                      [parse_egress("127.0.0.0/8=o")], mark)

    assert pol("127.0.0.1").version() == pol("127.0.0.1").version()
    assert len({pol("127.0.0.1").version(), pol("127.0.0.2").version(), pol("127.0.0.1", 5).version()}) == 3


@given(st.lists(_rules, max_size=5), st.booleans(), _addrs4, _addrs6, _ports, st.sampled_from([S, D]),
       st.sampled_from([0, socket.IPPROTO_TCP, socket.IPPROTO_UDP]))
def test_egress_table_grants_exactly_what_the_engine_grants(rules, v6, a4, a6, port, t, proto):
    pol = policy(EPS + ["fixed type ipv4 addr 127.0.0.9 port 4000"], egress=rules + ["127.0.0.9/32=fixed"]).pol
    op = Op("connect", V6 if v6 else V4, a6 if v6 else a4, port, t, proto)
    d, fast = pol.decide(op), pol.egress_table().lookup(op)
    if fast[0] == "grant":
        assert d.granted and (d.family, d.host) == fast[1:], (rules, op, d, fast)
    elif fast[0] == "local":
        assert d.verdict == LOCAL
    elif d.granted:  # "ask" is always safe; but a plain grant must not cost a trip to Python
        assert proto not in (0, socket.IPPROTO_TCP if t == S else socket.IPPROTO_UDP), (rules, op, d)


def test_egress_table_takes_the_common_case():
    pol = policy([OUT, OUT6], egress=["127.0.0.0/8=ep-out", "::/0=ep-out6", "10.0.0.0/8=nope"]).pol
    table = pol.egress_table()
    assert table.lookup(Op("connect", V4, "127.0.0.1", 80, S)) == ("grant", V4, ("127.0.0.1", 0))
    assert table.lookup(Op("connect", V6, "::ffff:127.0.0.1", 80, S)) == ("grant", V6, ("::ffff:127.0.0.1", 0))
    assert table.lookup(Op("connect", V6, "::1", 80, D)) == ("grant", V6, ("::1", 0))
    assert table.lookup(Op("connect", V4, "192.0.2.1", 80, S)) == ("local",)
    assert table.lookup(Op("connect", V4, "10.1.1.1", 80, S)) == ("ask",)  # the engine denies: it says so
    assert table.lookup(Op("connect", V4, "127.0.0.1", 80, S, bound=True)) == ("ask",)
    assert table.lines() == ("4 127.0.0.0 8 ipv4 127.0.0.1 0", "4 10.0.0.0 8 ask - 0", "6 :: 0 ipv6 ::1 0")
