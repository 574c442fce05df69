"""The protocol extension the preload library uses: rules of the caller's environment travel on
bind/connect requests and are evaluated by the engine against the container's own table."""
import errno

import pytest

from sockgraft.core.endpoint import parse_endpoint
from sockgraft.modes.api.fdservice import FdService
from sockgraft.core.protocol import ProtocolError, Request, parse_request
from sockgraft.core.rules import parse_egress, parse_ingress
from sockgraft.host.store import Store
from tests.helpers import free_port

KEY, INO = "netns:4242424242", 4242424242


def test_rules_round_trip():
    for req in (Request("bind", family=2, addr="0.0.0.0", port=80, type=1, proto=0,
                        ingress=(parse_ingress("0.0.0.0:80=ep-http"), parse_ingress("[::]:8000-8100=ep6"))),
                Request("connect", family=10, addr="::1", port=5, type=2, proto=0,
                        egress=(parse_egress("10.0.0.0/8=ep-out"),), bbconn=("ep-any",))):
        assert parse_request(req.encode()) == req
    req = parse_request(b"connect 2 1.2.3.4 9 1 0 out:1.0.0.0/8=a bbconn:b")
    assert (req.ingress, [str(r) for r in req.egress], req.bbconn) == ((), ["1.0.0.0/8=a"], ("b",))


@pytest.mark.parametrize("data", [
    b"bind 2 0.0.0.0 80 1 0 - out:10.0.0.0/8=x",      # an egress rule on bind
    b"connect 2 1.1.1.1 80 1 0 in:0.0.0.0:80=x",        # an ingress pair on connect
    b"bind 2 0.0.0.0 80 1 0 - in:garbage",
    b"bind 2 0.0.0.0 80 1 0 - in:0.0.0.0:80=",
    b"bind 2 0.0.0.0 80 1 0 - ",
    b"connect 2 1.1.1.1 80 1 0 out:10.0.0.1/8=x",       # host bits set
    b"connect 2 1.1.1.1 80 1 0 bbconn:" + b"x" * 16,
    b"named ep 0 1 0 - in:0.0.0.0:80=x",                # only bind and connect take rules
])
def test_bad_rules(data):
    with pytest.raises(ProtocolError):
        parse_request(data)


@pytest.fixture
def service(state_dir):
    port = free_port()
    with Store(state_dir) as store:
        store.register(KEY, INO, "preload")
        store.add(KEY, parse_endpoint(f"ep-http type ipv4 addr 127.0.0.1 port {port}"), INO)
        store.add(KEY, parse_endpoint("ep-out type ipv4 addr 127.0.0.1 port dynamic"), INO)
        store.set_rules(KEY, [parse_ingress("0.0.0.0:9999=ep-http")], [])
    svc = FdService(state_dir, mode="preload")
    yield svc, port
    svc.close()


def ask(svc, data: bytes):
    reply, sock = svc.handle(KEY, INO, data)
    if sock is not None:
        name = sock.getsockname()
        sock.close()
        return reply, name
    return reply, None


def test_request_rules_replace_stored_ones(service):
    svc, port = service
    # the stored pair grafts :9999, not :80
    assert ask(svc, b"bind 2 0.0.0.0 80 1 0 -")[0].kind == "local"
    assert ask(svc, b"bind 2 0.0.0.0 9999 1 0 -")[1] == ("127.0.0.1", port)
    # the caller's pair grafts :80 and replaces the stored one for this request
    assert ask(svc, b"bind 2 0.0.0.0 80 1 0 - in:0.0.0.0:80=ep-http")[1] == ("127.0.0.1", port)
    assert ask(svc, b"bind 2 0.0.0.0 9999 1 0 - in:0.0.0.0:80=ep-http")[0].kind == "local"


def test_request_rules_map_only_onto_the_table(service):
    svc, _ = service
    reply, _ = ask(svc, b"bind 2 0.0.0.0 80 1 0 - in:0.0.0.0:80=not-mine")
    assert (reply.kind, reply.errno) == ("err", errno.EADDRNOTAVAIL)
    reply, _ = ask(svc, b"connect 2 127.0.0.1 80 1 0 bbconn:not-mine")
    assert (reply.kind, reply.errno) == ("err", errno.EADDRNOTAVAIL)


def test_egress_and_bbconn(service):
    svc, _ = service
    reply, name = ask(svc, b"connect 2 127.0.0.1 80 1 0 out:127.0.0.0/8=ep-out")
    assert reply.kind == "ok" and name[0] == "127.0.0.1" and name[1] > 0
    assert ask(svc, b"connect 2 10.1.2.3 80 1 0 out:127.0.0.0/8=ep-out")[0].kind == "local"
    # an unconnected send (no traffic here: the socket is only bound) through GRAFT_BBCONN
    reply, name = ask(svc, b"sendto 2 10.1.2.3 80 2 0 bbconn:ep-out")
    assert reply.kind == "ok" and name[0] == "127.0.0.1" and name[1] > 0
    # bbconn of an ipv4 endpoint leaves IPv6 destinations inside the container
    assert ask(svc, b"connect 10 ::1 80 1 0 bbconn:ep-out")[0].kind == "local"
    assert ask(svc, b"connect 2 10.1.2.3 80 1 0")[0].kind == "local"  # nothing stored


def test_malformed_rule_is_a_clear_einval(service):
    svc, _ = service
    reply, _ = ask(svc, b"bind 2 0.0.0.0 80 1 0 - in:garbage")
    assert (reply.kind, reply.errno) == ("err", errno.EINVAL)
    assert "garbage" in reply.message and "environment" in reply.message


def test_new_verbs_round_trip():
    for req in (Request("sendto", family=2, addr="127.0.0.1", port=53, type=2, egress=(parse_egress("127.0.0.0/8=a"),)),
                Request("prefilter", ingress=(parse_ingress("0.0.0.0:80=a"),), bbconn=("b",)),
                Request("named", name="ep", family=0, type=1, addr="::1", port=80),
                Request("named", name="ep", family=2, type=1, addr="127.0.0.1", port=80)):
        assert parse_request(req.encode()) == req
    for bad in (b"named ep 0 1 0 - 127.0.0.1", b"named ep 0 1 0 - 127.0.0.1 0", b"named ep 0 1 0 - nohost 80",
                b"prefilter 1", b"sendto 2 127.0.0.1 53 2 0 in:0.0.0.0:80=a"):
        with pytest.raises(ProtocolError):
            parse_request(bad)


def test_prefilter_answers_the_effective_rules(service):
    svc, _ = service
    reply, _ = ask(svc, b"prefilter")
    stored = reply.lines[-1]
    assert reply.lines[:-1] == ("bind 4 0.0.0.0 9999 9999",) and stored.startswith("version ")
    reply, _ = ask(svc, b"prefilter out:10.0.0.0/8=ep-out bbconn:ep-out")
    assert reply.lines[:-1] == ("bind 4 0.0.0.0 9999 9999", "egress 4 10.0.0.0 8", "egress 4 0.0.0.0 0")
    assert reply.lines[-1].startswith("version ") and reply.lines[-1] != stored  # the policy's digest
    # a caller outside the container's netns is not told
    reply, _ = svc.handle(KEY, INO + 1, b"prefilter")
    assert (reply.kind, reply.errno) == ("err", errno.EPERM)
    # a table that does not fit in one reply is never sent truncated (the library then asks always)
    with Store(svc.store.dir) as store:
        store.set_rules(KEY, [parse_ingress(f"127.0.{i // 250}.{i % 250 + 1}:{1000 + i}=ep-http") for i in range(300)], [])
    svc2 = FdService(svc.store.dir, mode="preload")
    try:
        reply, _ = svc2.handle(KEY, INO, b"prefilter")
        assert (reply.kind, reply.errno) == ("err", errno.EMSGSIZE)
    finally:
        svc2.close()


def test_connect_is_handed_over_connected_and_sendto_bound(service):
    svc, port = service
    svc.store.set_rules(KEY, [], [parse_egress("127.0.0.1/32=ep-out")])  # the kernel lets only stored rules' destinations through
    with __import__("socket").create_server(("127.0.0.1", 0)) as server:
        dst = server.getsockname()[1]
        reply, sock = svc.handle(KEY, INO, f"connect 2 127.0.0.1 {dst} 1 0 out:127.0.0.1/32=ep-out".encode())
        try:
            assert reply.kind == "ok" and reply.port > 0
            server.settimeout(5)
            conn, peer = server.accept()
            conn.close()
            assert peer == ("127.0.0.1", reply.port)  # connected by the service, from its chosen port
        finally:
            sock.close()
    reply, sock = svc.handle(KEY, INO, b"sendto 2 127.0.0.1 53 2 0 out:127.0.0.1/32=ep-out")
    try:
        assert reply.kind == "ok" and sock.getsockname()[1] == reply.port > 0
        with pytest.raises(OSError):
            sock.getpeername()  # bound, not connected
    finally:
        sock.close()
