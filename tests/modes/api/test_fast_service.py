"""The fd service with its native fast path (the default) and without it (GRAFT_FDSERVICE_FAST=0)
answers the same requests of a caller inside the container the same way: the same replies, the
same sockets (connected to the same destination, bound to the same endpoint address, as many, with
the same mark), the same audit records; and the fast path is what answered the connect and pool
requests its table decides."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from sockgraft.core.endpoint import parse_endpoint
from sockgraft.core.protocol import MAX_POOL
from sockgraft.core.rules import parse_egress, parse_ingress
from sockgraft.host import netns
from sockgraft.host.audit import Audit
from sockgraft.host.store import Store
from sockgraft.modes.api.fdservice import FdService

# Each request is sent by a client in the container's netns; it prints one JSON line per reply:
# the reply's text and, for a socket, where it is bound and where it leads once connected.
CLIENT = textwrap.dedent("""
    import json, select, socket, sys
    from sockgraft.core.protocol import MAX_POOL
    path, requests = sys.argv[1], json.loads(sys.argv[2])
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.connect(path)
    for r in requests:
        c.send(r.encode("latin-1"))
        msg, fds, _, _ = socket.recv_fds(c, 8192, MAX_POOL)
        sock = None
        for extra in fds[1:]:
            socket.socket(fileno=extra).close()
        if fds:
            s = socket.socket(fileno=fds[0])
            if s.type == socket.SOCK_STREAM:
                select.select([], [s], [], 5)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            try:
                peer = list(s.getpeername()[:2])
            except OSError:
                peer = None
            sock = {"family": s.family, "type": s.type, "addr": s.getsockname()[0], "peer": peer, "err": err,
                    "n": len(fds), "mark": s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK),
                    "v6only": s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) if s.family == socket.AF_INET6 else None}
            s.close()
        print(json.dumps({"reply": msg.decode("latin-1"), "sock": sock}), flush=True)
""")


@pytest.fixture
def listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


def requests(port: int, closed: int) -> list[str]:
    return [
        f"connect 2 127.0.0.1 {port} 1 0",                            # grant, table: the container's rules
        f"connect 2 127.0.0.1 {port} 1 6",
        f"connect 10 ::ffff:127.0.0.1 {port} 1 0",                   # grant onto an IPv4 endpoint, v4-mapped
        f"connect 2 127.0.0.1 {closed} 2 0",                          # grant, datagram
        f"connect 2 127.0.0.1 {closed} 1 0",                          # grant, refused (in SO_ERROR)
        f"connect 2 10.9.9.9 {port} 1 0",                             # local: no rule matches
        f"connect 2 127.0.0.3 {port} 1 0",                            # fail: the endpoint's address is not here
        f"connect 2 127.0.0.4 {port} 1 0",                            # ask: a unix endpoint (Python denies)
        f"connect 2 127.0.0.1 {port} 3 0",                            # ask: raw socket
        f"connect 2 127.0.0.1 {port} 1 0 out:127.0.0.0/8=ep-out2",    # caller rules: first handed back,
        f"connect 2 127.0.0.1 {port} 1 0 out:127.0.0.0/8=ep-out2",    # then compiled
        f"connect 2 127.0.0.1 {port} 1 0 out:127.0.0.0/8=nope",
        f"connect 2 127.0.0.01 {port} 1 0",                           # malformed
        f"pool 2 127.0.0.1 {port} 1 0 3",                             # pool: 3 sockets, not connected
        f"pool 10 ::ffff:127.0.0.1 {port} 1 0 {MAX_POOL}",
        f"pool 2 10.9.9.9 {port} 1 0 2",                              # local
        f"pool 2 127.0.0.3 {port} 1 0 2",                             # fail (not audited, as Python)
        f"pool 2 127.0.0.4 {port} 2 0 1",                             # ask: a unix endpoint
        f"pool 2 127.0.0.1 {port} 1 0 2 out:127.0.0.0/8=ep-out2",     # caller rules compiled for connect
        f"pool 2 127.0.0.1 {port} 1 0 2 out:127.0.0.0/8=ep-out2",
        f"pool 2 127.0.0.1 {port} 1 0 {MAX_POOL + 1}",                 # malformed: more than MAX_POOL
        f"pool 2 127.0.0.5 {port} 1 0 1",                             # a fixed-port endpoint: never pooled
        "bind 2 127.0.0.1 7001 1 0 -",                                # bind by a pair: endpoint 127.0.0.1:0
        "bind 2 127.0.0.1 7001 2 0 reuseaddr,reuseport",
        "bind 10 ::ffff:127.0.0.1 7001 1 0 -",                        # v4-mapped onto the IPv4 endpoint
        "bind 10 :: 7001 1 0 reuseaddr",                              # dual-stack [::] matched by the IPv4 pair
        "bind 10 :: 7001 1 0 v6only",                                 # V6ONLY: the IPv4 pair does not match
        "bind 2 127.0.0.1 7002 1 0 -",                                # local: no pair matches
        "bind 2 127.0.0.1 7003 1 0 -",                                # fail: the endpoint's address is not here
        "bind 2 127.0.0.1 7004 1 0 -",                                # ask: a unix endpoint
        "bind 2 127.0.0.1 7001 3 0 -",                                # ask: raw socket
        "bind 2 127.0.0.1 7005 1 0 - in:127.0.0.1:7005=ep-out2",      # caller pairs: handed back, then
        "bind 2 127.0.0.1 7005 1 0 - in:127.0.0.1:7005=ep-out2",      # compiled
        "bind 2 127.0.0.1 7001 1 0 reuseaddr,",                       # malformed flags
        "bind 2 127.0.0.1 7001 1 0 - out:127.0.0.0/8=ep-out2",        # a connect's rules on a bind: malformed
        "named ep-out 0 1 0 -",                                       # named (graft API): the endpoint's family
        "named ep-out 10 1 0 v6only",                                 # an IPv6 socket: v4-mapped, V6ONLY not set
        "named ep-out 2 2 17 reuseaddr,reuseport",                    # datagram
        "named ep-fixed 2 1 6 reuseaddr",                             # a fixed port
        "named ep-gone 0 1 0 -",                                      # fail: the endpoint's address is not here
        "named nope 0 1 0 -",                                         # ask: no such endpoint (Python denies)
        "named ep-unix 2 1 0 -",                                      # ask: a unix endpoint (Python denies)
        "named ep-out 0 3 0 -",                                       # ask: raw socket
        "named ep-out 1 1 0 -",                                       # ask: AF_UNIX socket on an ipv4 endpoint
        f"named ep-out 0 1 0 - 127.0.0.1 {port}",                     # with a destination: Python connects
        "named ep-out 0 1 0 reuse",                                   # malformed flags
        "named ep-out 0 1 0",                                         # malformed: an argument short
        "named ep-out 0 1 0 - in:127.0.0.1:1=ep-out",                 # malformed: no rules on named
        "bindpool 2 127.0.0.1 7001 1 0 - 3",                          # unbound, the endpoint's address to bind
        "bindpool 10 :: 7001 1 0 - 2",                                # dual-stack [::]: v4-mapped, V6ONLY off
        "bindpool 2 127.0.0.1 7001 2 0 reuseaddr 4",                  # datagram, flags (the caller sets them)
        "bindpool 2 127.0.0.1 7002 1 0 - 2",                          # local
        "bindpool 2 127.0.0.1 7003 1 0 - 1",                          # granted: nothing is bound here
        "bindpool 2 127.0.0.1 7004 1 0 - 1",                          # ask: a unix endpoint
        "bindpool 2 127.0.0.1 7005 1 0 - 2 in:127.0.0.1:7005=ep-out2",  # caller pairs (compiled: the binds
        "bindpool 2 127.0.0.1 7005 1 0 - 2 in:127.0.0.1:7005=ep-out2",  # with them taught them)
        "bindpool 2 127.0.0.1 7006 1 0 - 1 in:127.0.0.1:7006=ep-out2",  # new caller pairs: handed back,
        "bindpool 2 127.0.0.1 7006 1 0 - 1 in:127.0.0.1:7006=ep-out2",  # then compiled
        f"bindpool 2 127.0.0.1 7001 1 0 - {MAX_POOL + 1}",              # malformed: more than MAX_POOL
        "namedpool ep-out 0 1 0 4",                                   # the endpoint's family
        "namedpool ep-out 10 1 0 2",                                  # an IPv6 socket: v4-mapped
        "namedpool ep-fixed 2 1 6 1",                                 # a fixed port
        "namedpool nope 0 1 0 1",                                     # ask: no such endpoint
        "namedpool ep-unix 2 1 0 1",                                  # ask: a unix endpoint
        "namedpool ep-out 0 1 0 0",                                   # malformed count
        "namedpool ep-out 0 1 0 - 2",                                 # malformed: named's flags
        f"sendto 2 127.0.0.1 {closed} 2 0",                           # another verb
        "show",
        "x" * 5000,                                                   # too long
    ]


def serve_and_ask(state: str, key: str, path: str, ns: str, reqs: list[str]) -> tuple[list[dict], list[dict], dict | None]:
    audit = Audit(state)
    svc = FdService(state, audit=audit, mode="preload")
    svc.listen(key, path)
    t = svc.start_thread()
    try:
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, path, json.dumps(reqs)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        stats = dict(svc.fast.stats, back_to_back=svc.fast.back_to_back) if svc.fast else None
    finally:
        svc.stop()
        t.join(10)
        svc.close()
    with open(audit.path) as f:
        records = [json.loads(line) for line in f]
    os.unlink(audit.path)
    return [json.loads(line) for line in p.stdout.splitlines()], records, stats


def normalized(replies: list[dict]) -> list[dict]:
    out = []
    for r in replies:
        words = r["reply"].split(" ")
        if words[0] == "ok" and len(words) == 4:
            words[3] = "PORT"  # the source port is chosen at connect time
        out.append({**r, "reply": " ".join(words)})
    return out


def audit_view(records: list[dict]) -> list[tuple]:
    keep = ("event", "container", "mode", "op", "endpoint", "errno", "reason", "addr", "port")
    return sorted(tuple(json.dumps(r.get(k)) for k in keep) + (json.dumps(r["host"][0] if "host" in r else None),)
                  for r in records if r.get("op") != "accept")


def test_fast_and_python_answer_alike(tmp_path, ns, listener, monkeypatch):
    state = str(tmp_path / "state")
    ino = netns.named_ino(ns)
    with Store(state) as store:
        store.register(ns, ino, "preload")
        for spec in ("ep-out type ipv4 addr 127.0.0.1 port dynamic", "ep-out2 type ipv4 addr 127.0.0.2 port dynamic",
                     "ep-gone type ipv4 addr 192.0.2.77 port dynamic", "ep-unix type unix path /run/nothing.sock",
                     "ep-fixed type ipv4 addr 127.0.0.1 port 1"):
            store.add(ns, parse_endpoint(spec), ino)
        store.set_rules(ns, [parse_ingress("0.0.0.0:7001=ep-out"), parse_ingress("127.0.0.1:7003=ep-gone"),
                             parse_ingress("127.0.0.1:7004=ep-unix")], [parse_egress("127.0.0.1/32=ep-out"), parse_egress("127.0.0.3/32=ep-gone"),
                                 parse_egress("127.0.0.4/32=ep-unix"), parse_egress("127.0.0.5/32=ep-fixed")], ino)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, never listening: refused
        reqs = requests(listener, closed)
        path = str(tmp_path / "svc.sock")
        monkeypatch.delenv("GRAFT_FDSERVICE_FAST", raising=False)
        fast_replies, fast_audit, stats = serve_and_ask(state, ns, path, ns, reqs)
        monkeypatch.setenv("GRAFT_FDSERVICE_FAST", "0")
        py_replies, py_audit, py_stats = serve_and_ask(state, ns, path, ns, reqs)
    assert py_stats is None  # GRAFT_FDSERVICE_FAST=0: no fast path at all
    assert normalized(fast_replies) == normalized(py_replies)
    assert audit_view(fast_audit) == audit_view(py_audit)
    # what the outcomes are (the same in both): grants connected to the destination, from the endpoint
    by_req = dict(zip(reqs, fast_replies))
    g = by_req[reqs[0]]
    assert g["reply"].startswith("ok 2 127.0.0.1 ") and g["sock"]["peer"] == ["127.0.0.1", listener]
    assert by_req[reqs[2]]["reply"].startswith("ok 10 ::ffff:127.0.0.1 ")
    assert by_req[reqs[4]]["sock"]["err"] == 111  # ECONNREFUSED, as a native non-blocking connect says it
    assert by_req[reqs[5]]["reply"] == "local"
    assert by_req[reqs[6]]["reply"] == "err 99 ep-gone: Cannot assign requested address"
    assert by_req[reqs[7]]["reply"].startswith("err 97 ")
    assert by_req[reqs[10]]["sock"]["addr"] == "127.0.0.2"
    pools = [r for r in reqs if r.startswith("pool ")]
    p = by_req[pools[0]]  # pools are on (root: the bind guard and the kernel's egress table are there)
    assert p["reply"] == "ok 2 127.0.0.1 0" and p["sock"]["n"] == 3 and p["sock"]["peer"] is None
    assert p["sock"]["mark"] != 0 and by_req[pools[1]]["sock"]["n"] == MAX_POOL
    assert by_req[pools[2]]["reply"] == "local" and by_req[pools[3]]["reply"].startswith("err 99 ep-gone: ")
    assert by_req[pools[6]]["sock"]["addr"] == "127.0.0.2" and by_req[pools[7]]["reply"].startswith("err 22 ")
    assert by_req[pools[8]]["reply"].startswith("err 95 ")  # EOPNOTSUPP: a fixed port is not pooled
    binds = [r for r in reqs if r.startswith("bind ")]
    assert by_req[binds[0]]["reply"].startswith("ok 2 127.0.0.1 ") and by_req[binds[0]]["sock"]["mark"] != 0
    assert by_req[binds[2]]["reply"].startswith("ok 10 ::ffff:127.0.0.1 ")
    assert by_req[binds[3]]["reply"].startswith("ok 10 ::ffff:127.0.0.1 ") and by_req[binds[4]]["reply"] == "local"
    assert by_req[binds[5]]["reply"] == "local" and by_req[binds[6]]["reply"].startswith("err 99 ep-gone: ")
    assert by_req[binds[10]]["sock"]["addr"] == "127.0.0.2" and by_req[binds[11]]["reply"].startswith("err 22 ")
    assert by_req[binds[12]]["reply"].startswith("err 22 ")
    named = [r for r in reqs if r.startswith("named ")]
    assert by_req[named[0]]["reply"].startswith("ok 2 127.0.0.1 ") and by_req[named[0]]["sock"]["mark"] != 0
    assert by_req[named[1]]["reply"].startswith("ok 10 ::ffff:127.0.0.1 ") and by_req[named[2]]["sock"]["type"] == 2
    assert by_req[named[3]]["reply"] == "ok 2 127.0.0.1 1" and by_req[named[4]]["reply"].startswith("err 99 ep-gone: ")
    assert [by_req[r]["reply"].split(" ")[:2] for r in named[5:9]] == [["err", "99"], ["err", "97"], ["err", "13"],
                                                                     ["err", "97"]]
    assert by_req[named[9]]["sock"]["peer"] == ["127.0.0.1", listener]
    assert {by_req[r]["reply"].split(" ")[1] for r in named[10:]} == {"22"}
    unbound = 0x5CA1_0000  # core.tables.UNBOUND_TAG: the bind guard lets them bind only to the container's endpoints
    bp = [r for r in reqs if r.startswith("bindpool ")]
    assert by_req[bp[0]]["reply"] == "ok 2 127.0.0.1 0" and by_req[bp[0]]["sock"]["n"] == 3
    assert by_req[bp[0]]["sock"]["mark"] & 0xFFFF0000 == unbound and by_req[bp[0]]["sock"]["addr"] == "0.0.0.0"
    assert by_req[bp[1]]["reply"] == "ok 10 ::ffff:127.0.0.1 0" and by_req[bp[1]]["sock"]["v6only"] == 0
    assert by_req[bp[2]]["sock"]["type"] == 2 and by_req[bp[3]]["reply"] == "local"
    assert by_req[bp[4]]["reply"] == "ok 2 192.0.2.77 0" and by_req[bp[5]]["reply"].startswith("err 97 ")
    assert by_req[bp[7]]["reply"] == by_req[bp[9]]["reply"] == "ok 2 127.0.0.2 0"
    assert by_req[bp[10]]["reply"].startswith("err 22 ")
    np_ = [r for r in reqs if r.startswith("namedpool ")]
    assert by_req[np_[0]]["reply"] == "ok 2 127.0.0.1 0" and by_req[np_[0]]["sock"]["n"] == 4
    assert by_req[np_[0]]["sock"]["mark"] & 0xFFFF0000 == unbound
    assert by_req[np_[1]]["reply"] == "ok 10 ::ffff:127.0.0.1 0" and by_req[np_[2]]["reply"] == "ok 2 127.0.0.1 1"
    assert [by_req[r]["reply"].split(" ")[:2] for r in np_[3:]] == [["err", "99"], ["err", "97"], ["err", "22"], ["err", "22"]]
    # the fast path answered what its tables decide: 4 container-rule grants + the refused one, the
    # second request with caller rules, the local one and the failure; for pool, 2 container-rule
    # grants + both with the caller rules the connect taught it, the local one and the failure;
    # for bind, 4 grants + the second with caller pairs, 2 local ones and the failure; for named, 4
    # grants and the failure; for bindpool, 7 grants (both with the caller pairs the binds taught
    # it, the second with pairs the first taught it) and the local one; for namedpool, 3 grants;
    # Python the rest
    stats.pop("back_to_back")
    assert stats == {"grant": 29, "pool": 4, "bind": 5, "named": 4, "bindpool": 7, "namedpool": 3, "local": 5, "fail": 4,
                     "handback": 31}


def test_back_to_back_requests_answered_alike(tmp_path, ns, listener, monkeypatch):
    """A caller asking again right after each answer is served back to back in C (fs_serve_batch:
    the service waits awake for its next request): the same replies and audit records as one
    request at a time (GRAFT_FDSERVICE_SPIN=0) and as Python alone."""
    state = str(tmp_path / "state")
    ino = netns.named_ino(ns)
    with Store(state) as store:
        store.register(ns, ino, "preload")
        store.add(ns, parse_endpoint("ep-in type ipv4 addr 127.0.0.1 port dynamic"), ino)
        store.set_rules(ns, [parse_ingress("0.0.0.0:7001=ep-in")], [parse_egress("127.0.0.1/32=ep-in")], ino)
    reqs = [r for _ in range(20) for r in ("bind 2 127.0.0.1 7001 1 0 -", "bind 2 127.0.0.1 7002 1 0 -",
                                           f"connect 2 127.0.0.1 {listener} 1 0", "show")]
    path = str(tmp_path / "svc.sock")
    monkeypatch.delenv("GRAFT_FDSERVICE_FAST", raising=False)
    monkeypatch.setenv("GRAFT_FDSERVICE_SPIN", "3000")  # generous: a loaded test machine still catches some
    spun, spun_audit, stats = serve_and_ask(state, ns, path, ns, reqs)
    monkeypatch.setenv("GRAFT_FDSERVICE_SPIN", "0")
    one, one_audit, one_stats = serve_and_ask(state, ns, path, ns, reqs)
    monkeypatch.setenv("GRAFT_FDSERVICE_FAST", "0")
    py, py_audit, _ = serve_and_ask(state, ns, path, ns, reqs)
    assert stats["back_to_back"] > 0 and one_stats["back_to_back"] == 0
    assert normalized(spun) == normalized(one) == normalized(py)
    assert audit_view(spun_audit) == audit_view(one_audit) == audit_view(py_audit)
    assert stats["bind"] == 20 and stats["local"] == 20 and stats["handback"] == 20


def test_caller_outside_is_handed_back(tmp_path, ns, make_netns, listener, monkeypatch):
    """A caller in another netns never gets a fast grant: Python denies it, as before."""
    monkeypatch.delenv("GRAFT_FDSERVICE_FAST", raising=False)
    other = make_netns()
    state = str(tmp_path / "state")
    ino = netns.named_ino(ns)
    with Store(state) as store:
        store.register(ns, ino, "preload")
        store.add(ns, parse_endpoint("ep-out type ipv4 addr 127.0.0.1 port dynamic"), ino)
        store.set_rules(ns, [], [parse_egress("127.0.0.1/32=ep-out")], ino)
    replies, records, stats = serve_and_ask(state, ns, str(tmp_path / "svc.sock"), other,
                                            [f"connect 2 127.0.0.1 {listener} 1 0"])
    assert replies[0]["reply"].startswith("err 1 ") and replies[0]["sock"] is None
    assert stats == {"grant": 0, "pool": 0, "bind": 0, "named": 0, "bindpool": 0, "namedpool": 0, "local": 0, "fail": 0,
                     "handback": 1, "back_to_back": 0}
    assert any(r["event"] == "deny" and r.get("caller_netns") for r in records)


def test_missing_library_is_said_once(tmp_path, monkeypatch, capfd):
    from sockgraft.modes.api import fast

    monkeypatch.delenv("GRAFT_FDSERVICE_FAST", raising=False)
    monkeypatch.setenv("GRAFT_PREFIX", str(tmp_path / "nowhere"))
    monkeypatch.setattr(fast, "_said", False)
    services = [FdService(str(tmp_path / "state"), mode="preload") for _ in range(2)]
    try:
        assert [s.fast for s in services] == [None, None]
    finally:
        for s in services:
            s.close()
    err = capfd.readouterr().err
    assert err.count("fd service fast path unavailable") == 1 and "libgraft-fdfast.so" in err
