"""The kernel's egress table (host/egress.py): the ruleset builder (pure: store content -> nft
script), and the table following the store: built at a write, changed with the rules, removed with
the last container, rebuilt by graftd, swept when its state dir is gone."""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import tempfile

import pytest

from sockgraft.core.endpoint import parse_endpoint
from sockgraft.core.engine import Op, Policy
from sockgraft.core.rules import parse_egress, parse_ingress
from sockgraft.core.tables import MARK_TAG, UNBOUND_TAG
from sockgraft.host import egress
from sockgraft.host.store import Store, StoreError

EP = {e.name: e for e in map(parse_endpoint, [
    "ep-out type ipv4 addr 127.0.0.1 port dynamic",
    "ep6 type ipv6 addr ::1 port dynamic",
    "web type ipv4 addr 127.0.0.1 port 8080",
    "any type ipv4 addr 0.0.0.0 port 9000",
    "sock type unix path /tmp/x.sock",
])}


def policy(*egress_rules: str, endpoints=EP, mark: int = MARK_TAG | 7) -> Policy:
    return Policy(dict(endpoints), [], [parse_egress(r) for r in egress_rules], mark)


def nft(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["nft", *args], capture_output=True, text=True, check=check)


def table_text(state_dir: str) -> str | None:
    p = nft("list", "table", "inet", egress.table_name(state_dir), check=False)
    return p.stdout if p.returncode == 0 else None


# -- the builder -------------------------------------------------------------------------------
def test_container_rules_mirror_the_engine_on_grafted_sockets():
    """Longest prefix first; a longer rule naming a missing endpoint refuses what a shorter one
    allows (Policy._on_grafted: a rule whose endpoint exists names its prefix)."""
    p = policy("10.0.0.0/8=ep-out", "10.1.0.0/16=gone", "10.1.2.0/24=ep-out", "127.0.0.2/32=ep-out",
               "::/0=ep6", "192.168.0.0/16=ep6", "172.16.0.0/12=sock")
    c = egress.container_egress("netns:1", p)
    assert [(ok, [str(n) for n in nets]) for ok, nets in c.groups] == [
        (True, ["127.0.0.2/32", "10.1.2.0/24"]), (False, ["10.1.0.0/16"]),
        (True, ["192.168.0.0/16", "172.16.0.0/12", "10.0.0.0/8", "::/0"])]
    # the same verdicts as the engine's for a grafted socket, on sample destinations
    for addr in ["10.1.2.3", "10.1.9.9", "10.9.9.9", "127.0.0.2", "127.0.0.3", "192.168.1.1", "172.16.0.1",
                 "::1", "2001:db8::1", "11.0.0.1", "10.2.0.1"]:
        engine = p.decide(Op("sendto", 10 if ":" in addr else 2, addr, 53, 2, 0, grafted=True)).granted
        ip = ipaddress.ip_address(addr)
        kernel = next((ok for ok, nets in c.groups if any(ip.version == n.version and ip in n for n in nets)), False)
        assert kernel == engine, addr
    # fixed-port IP endpoints are reachable (dial); a wildcard one at the loopback
    assert [(str(a), port) for a, port in c.dials] == [("127.0.0.1", 8080), ("127.0.0.1", 9000)]
    # the bind guard's map: every IP endpoint as it is (a dynamic one's port 0), a unix one not
    assert c.binds == tuple(sorted((ep.addr, 0 if ep.dynamic else ep.port) for ep in EP.values() if ep.type != "unix"))


def test_ruleset_text():
    a = egress.container_egress("netns:1", policy("127.0.0.2/32=ep-out", "::/0=ep6", endpoints={
        k: EP[k] for k in ("ep-out", "ep6", "web")}, mark=MARK_TAG | 0x12))
    b = egress.container_egress('weird"key\n', policy(mark=MARK_TAG | 0x3))
    text = egress.ruleset("/nonexistent/state", [a, b], ("mark-5ca00099", "mark-5ca00003", "output"))
    table = egress.table_name("/nonexistent/state")
    assert re.fullmatch(r"sockgraft-[0-9a-f]{12}", table)
    assert text == f"""table inet {table} {{
\tcomment "/nonexistent/state"
\tset peers4 {{ type ipv4_addr . inet_service . mark; flags dynamic, timeout; size 65536; }}
\tset peers6 {{ type ipv6_addr . inet_service . mark; flags dynamic, timeout; size 65536; }}
\tchain output {{
\t\ttype filter hook output priority filter; policy accept;
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t}}
\tchain refuse {{
\t}}
}}
flush table inet {table}
delete chain inet {table} mark-5ca00003
delete chain inet {table} mark-5ca00099
table inet {table} {{
\tchain output {{
\t\tmeta mark & 0xffff0000 == 0x5ca10000 goto refuse
\t\tmeta mark & 0xffff0000 != 0x5ca00000 return
\t\tmeta mark vmap {{ 0x5ca00003 : jump mark-5ca00003, 0x5ca00012 : jump mark-5ca00012 }}
\t}}
\tchain refuse {{
\t\ttcp flags & (syn | ack) == syn reject with tcp reset
\t\tdrop
\t}}
\tchain input {{
\t\ttcp flags & (syn | ack) == syn socket mark & 0xffff0000 == 0x5ca10000 goto refuse
\t\tmeta l4proto != udp return
\t\tsocket mark & 0xffff0000 == 0x5ca10000 drop
\t\tsocket mark & 0xffff0000 != 0x5ca00000 return
\t\tmeta nfproto ipv4 update @peers4 {{ ip saddr . udp sport . socket mark timeout 30s }}
\t\tmeta nfproto ipv6 update @peers6 {{ ip6 saddr . udp sport . socket mark timeout 30s }}
\t}}
\tchain mark-5ca00003 {{
\t\tcomment "{b.digest()} weird?key?"
\t\ttcp flags & (syn | ack) != syn accept
\t\tip daddr . udp dport . meta mark @peers4 accept
\t\tip6 daddr . udp dport . meta mark @peers6 accept
\t\tip daddr . meta l4proto . th dport {{ 127.0.0.1 . tcp . 8080, 127.0.0.1 . udp . 8080, 127.0.0.1 . tcp . 9000, 127.0.0.1 . udp . 9000 }} accept
\t\tgoto refuse
\t}}
\tchain mark-5ca00012 {{
\t\tcomment "{a.digest()} netns:1"
\t\ttcp flags & (syn | ack) != syn accept
\t\tip daddr . udp dport . meta mark @peers4 accept
\t\tip6 daddr . udp dport . meta mark @peers6 accept
\t\tip daddr . meta l4proto . th dport {{ 127.0.0.1 . tcp . 8080, 127.0.0.1 . udp . 8080 }} accept
\t\tip daddr {{ 127.0.0.2/32 }} accept
\t\tmeta nfproto ipv6 accept
\t\tgoto refuse
\t}}
}}
"""
    # no container: the table is only removed; replaced: deleted first; pure: the same input, the same text
    assert egress.ruleset("/nonexistent/state", []) == f"add table inet {table}\ndelete table inet {table}\n"
    assert egress.ruleset("/nonexistent/state", [b, a], ("mark-5ca00003", "output", "mark-5ca00099")) == text
    replaced = egress.ruleset("/nonexistent/state", [a, b], replace=True)
    assert replaced == f"add table inet {table}\ndelete table inet {table}\n" + text.replace(
        f"delete chain inet {table} mark-5ca00003\ndelete chain inet {table} mark-5ca00099\n", "")


def test_tables_of_two_state_dirs_differ(tmp_path):
    assert egress.table_name(str(tmp_path / "a")) != egress.table_name(str(tmp_path / "b"))
    os.symlink(tmp_path, tmp_path.parent / (tmp_path.name + "-link"))
    try:  # one state dir, however it is spelled
        assert egress.table_name(str(tmp_path)) == egress.table_name(str(tmp_path.parent / (tmp_path.name + "-link")))
    finally:
        os.unlink(tmp_path.parent / (tmp_path.name + "-link"))


def test_every_built_ruleset_is_accepted_by_nft(tmp_path):
    """nft -c (check only) accepts what the builder makes, for assorted tables."""
    cases = [policy(), policy("0.0.0.0/0=ep-out"), policy("::/0=ep6", "::1/128=ep-out"),
             policy("10.0.0.0/8=gone"), policy(*[f"10.{i}.0.0/16=ep-out" for i in range(200)])]
    cs = [egress.container_egress(f"netns:{i}", Policy(p.endpoints, [], p.egress, MARK_TAG | (i + 1)))
          for i, p in enumerate(cases)]
    script = egress.ruleset(str(tmp_path / "state"), cs)
    p = subprocess.run(["nft", "-c", "-f", "-"], input=script, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


# -- the table follows the store ---------------------------------------------------------------
def test_table_follows_the_store(state_dir, monkeypatch):
    monkeypatch.delenv(egress.ENV, raising=False)
    ep = parse_endpoint("ep-out type ipv4 addr 127.0.0.1 port dynamic")
    with Store(state_dir) as store:
        assert table_text(state_dir) is None
        undo = store.install("netns:101", 101, "api", [ep], [], [parse_egress("127.0.0.2/32=ep-out")], fresh=True)
        mark = store.marks()["netns:101"]
        text = table_text(state_dir)
        assert text and f"comment \"{os.path.realpath(state_dir)}\"" in text
        assert f"0x{mark:08x} : jump mark-{mark:08x}" in text and "ip daddr 127.0.0.2 accept" in text
        assert egress.pools_off(store, "netns:101") == ""
        # a rule change: at once
        store.set_rules("netns:101", [], [parse_egress("127.0.0.5/32=ep-out")])
        text = table_text(state_dir)
        assert "127.0.0.5" in text and "127.0.0.2" not in text
        # a second container, then the endpoint its rule names goes: the rule names nothing
        store.install("netns:102", 102, "seccomp", [parse_endpoint("e2 type ipv4 addr 127.0.0.1 port dynamic")], [],
                      [parse_egress("127.0.0.9/32=e2")], fresh=True)
        assert "127.0.0.9" in table_text(state_dir)
        store.delete("netns:102", "e2")
        text = table_text(state_dir)
        assert "127.0.0.9" not in text and f"mark-{store.marks()['netns:102']:08x}" in text
        store.forget("netns:102")
        undo()  # the last container goes: so does the table
        assert table_text(state_dir) is None


def test_graftd_start_rebuilds_the_table(state_dir, tmp_path):
    from tests.helpers import graftd, stop

    with Store(state_dir) as store:
        store.install("netns:103", 103, "api", [parse_endpoint("ep type ipv4 addr 127.0.0.1 port dynamic")], [],
                      [parse_egress("127.0.0.7/32=ep")], fresh=True)
        want = table_text(state_dir)
        egress.remove(state_dir)  # as after a reboot: the tables are there, the kernel's table is not
        assert table_text(state_dir) is None
        d = graftd(state_dir, str(tmp_path / "run"), "--no-agent")
        try:
            assert table_text(state_dir) == want
        finally:
            stop(d)
        store.forget("netns:103")
    assert table_text(state_dir) is None


def test_enforce_settings(state_dir, monkeypatch, capsys):
    ep = parse_endpoint("ep type ipv4 addr 127.0.0.1 port dynamic")
    with Store(state_dir) as store:
        monkeypatch.setenv(egress.ENV, "0")  # off: no table, and pools are told so
        store.install("netns:104", 104, "api", [ep], [], [], fresh=True)
        assert table_text(state_dir) is None
        assert "off" in egress.pools_off(store, "netns:104")
        monkeypatch.setenv(egress.ENV, "1")
        store.register("netns:104", 104)
        assert table_text(state_dir) is not None
        # nftables unusable: required -> the write fails (rolled back); default -> said once, carried on
        monkeypatch.setattr(egress, "_nft", lambda script: (_ for _ in ()).throw(egress.EgressError("no nftables here")))
        with pytest.raises(StoreError, match="egress cannot be enforced by the kernel.*no nftables here"):
            store.install("netns:105", 105, "api", [], [], [], fresh=True)
        assert store.container("netns:105") is None
        monkeypatch.delenv(egress.ENV)
        monkeypatch.setattr(egress, "_warned", False)
        store.install("netns:105", 105, "api", [], [], [], fresh=True)
        store.forget("netns:105")
        assert capsys.readouterr().err.count("egress is not enforced by the kernel (nftables: no nftables here)") == 1
        monkeypatch.undo()
        monkeypatch.setenv("GRAFT_STATE_DIR", state_dir)
        store.forget("netns:104")
    assert table_text(state_dir) is None


def test_sweep_removes_tables_of_state_dirs_that_are_gone(tmp_path):
    gone, alive = str(tmp_path / "gone"), str(tmp_path / "alive")
    with Store(gone) as s1, Store(alive) as s2:
        for s in (s1, s2):
            s.register("netns:106", 106)
    try:
        os.unlink(os.path.join(gone, "tables.db"))
        assert egress.table_name(gone) in egress.tables()
        assert egress.table_name(gone) in egress.sweep()
        assert table_text(gone) is None and table_text(alive) is not None
    finally:
        egress.remove(gone)
        egress.remove(alive)


def test_unprivileged_writer_says_it_once_and_carries_on():
    """Rootless: no CAP_NET_ADMIN, no table; one line on stderr for any number of writes (none
    from libnftables itself), and GRAFT_EGRESS_ENFORCE=1 refuses the write with one line."""
    import sockgraft

    src = os.path.dirname(os.path.dirname(sockgraft.__file__))
    prog = ("import sys; from sockgraft.host.store import Store, StoreError\n"
            "try:\n    s = Store(sys.argv[1]); [s.register(f'netns:{i}', i) for i in range(3)]; print('carried on')\n"
            "except StoreError as e:\n    print('refused:', e)\n")
    with tempfile.TemporaryDirectory(prefix="sgt-rootless-") as d:  # pytest's tmp dirs are root's only
        os.chown(d, 65534, 65534)  # nobody
        for setting, want in (("", "carried on"), ("1", "refused: egress cannot be enforced by the kernel")):
            _as_nobody(prog, src, os.path.join(d, f"state{setting}"), setting, want)


def _as_nobody(prog: str, src: str, state: str, setting: str, want: str) -> None:
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", prog,
                        state], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": src, "GRAFT_EGRESS_ENFORCE": setting, "PATH": os.environ["PATH"]})
    assert p.stdout.startswith(want), p.stdout + p.stderr
    assert p.stderr.splitlines() == ([] if setting else [
        "graft: egress is not enforced by the kernel (nftables: Operation not permitted: nftables needs "
        "CAP_NET_ADMIN (root)); set GRAFT_EGRESS_ENFORCE=0 to silence this"]), p.stderr


def test_udp_peers_survive_other_containers_table_changes(state_dir, monkeypatch):
    """A grafted UDP server's client (noted in the peers4 set when its datagram arrived) is still
    answered after any other write to the store rebuilds the table (another container installed,
    its rules changed, it removed): the rebuild keeps the peer sets. 127.0.0.5, the client, is named
    by no rule, so only the peer set lets the answer out."""
    monkeypatch.delenv(egress.ENV, raising=False)
    ep = parse_endpoint("ep-out type ipv4 addr 127.0.0.1 port dynamic")
    with Store(state_dir) as store:
        undo = store.install("netns:110", 110, "api", [ep], [], [parse_egress("127.0.0.2/32=ep-out")], fresh=True)
        mark = store.marks()["netns:110"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            server.bind(("127.0.0.1", 0))  # (the bind guard refuses binds of marked sockets)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)  # as the fd service marks it
            client.bind(("127.0.0.5", 0))
            client.settimeout(2)
            # no datagram from the client yet: the answer is refused (the table works)
            with pytest.raises(PermissionError):
                server.sendto(b"unasked", client.getsockname())
            client.sendto(b"ping", server.getsockname())
            data, peer = server.recvfrom(100)
            assert peer == client.getsockname()
            elements = f"127.0.0.5 . {peer[1]} . 0x{mark:08x}"
            assert elements in nft("list", "set", "inet", egress.table_name(state_dir), "peers4").stdout
            writes = [
                lambda: store.install("netns:111", 111, "api", [parse_endpoint("e2 type ipv4 addr 127.0.0.1 port dynamic")],
                                      [], [parse_egress("127.0.0.9/32=e2")], fresh=True),
                lambda: store.set_rules("netns:111", [], [parse_egress("127.0.0.8/32=e2")]),
                lambda: store.forget("netns:111"),
                lambda: egress.sync(store),
            ]
            for i, write in enumerate(writes):
                write()
                assert elements in nft("list", "set", "inet", egress.table_name(state_dir), "peers4").stdout, i
                server.sendto(b"pong %d" % i, peer)
                assert client.recv(100) == b"pong %d" % i
            text = table_text(state_dir)
            assert "mark-" in text and text.count("chain mark-") == 1  # netns:111's chain went with it
        undo()
    assert table_text(state_dir) is None


def test_graftd_refuses_to_start_unenforced_with_one_line(state_dir, tmp_path):
    """GRAFT_EGRESS_ENFORCE=1 and nftables unusable (graftd started without CAP_NET_ADMIN): graftd
    says so in one line (no traceback) and exits non-zero."""
    from tests.helpers import graftd_cmd

    with Store(state_dir) as store:
        store.register("netns:112", 112)
    drop = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    env = dict(os.environ, GRAFT_EGRESS_ENFORCE="1")
    p = subprocess.run([*drop, *graftd_cmd(), "--state-dir", state_dir, "--runtime-dir", str(tmp_path / "run"),
                        "--no-agent"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode != 0
    assert p.stderr.splitlines()[-1:] == [
        "graftd: egress cannot be enforced by the kernel (GRAFT_EGRESS_ENFORCE=1): nftables: Operation not "
        "permitted: nftables needs CAP_NET_ADMIN (root)"], p.stderr
    assert "Traceback" not in p.stderr and "egress" not in "".join(p.stderr.splitlines()[:-1]), p.stderr
    with Store(state_dir) as store:
        store.forget("netns:112")
    assert table_text(state_dir) is None


def test_a_table_that_cannot_be_updated_in_place_is_replaced(state_dir, monkeypatch):
    """A table an older version made (here: peer sets of another size) cannot take the in-place
    rebuild (nft refuses to redefine a set): it is replaced whole."""
    monkeypatch.delenv(egress.ENV, raising=False)
    table = egress.table_name(state_dir)
    with Store(state_dir) as store:
        store.register("netns:113", 113)
        old = egress.ruleset(state_dir, egress.plan(store), replace=True).replace("size 65536", "size 1024")
        egress._nft(old)
        assert "size 1024" in nft("list", "set", "inet", table, "peers4").stdout
        store.add("netns:113", parse_endpoint("ep type ipv4 addr 127.0.0.1 port 5000"))  # a new plan: applied
        assert "size 65536" in nft("list", "set", "inet", table, "peers4").stdout
        store.forget("netns:113")
    assert table_text(state_dir) is None


def test_a_write_applies_only_a_changed_plan_in_one_transaction(state_dir, monkeypatch):
    """The store notes what it applied: a write that leaves the kernel's view as it is (a unix
    endpoint, the container's inode) runs no nft; one that changes it runs one transaction (its
    chains known, not listed); another boot or netns (a reboot) applies again, as does a table
    deleted behind the store's back once the plan changes, and graftd's start (force)."""
    monkeypatch.delenv(egress.ENV, raising=False)
    scripts: list[str] = []
    real = egress._nft
    monkeypatch.setattr(egress, "_nft", lambda script: scripts.append(script) or real(script))
    with Store(state_dir) as store:
        store.install("netns:114", 114, "api", [EP["ep-out"]], [], [parse_egress("127.0.0.3/32=ep-out")], fresh=True)
        want = table_text(state_dir)
        assert "127.0.0.3" in want
        scripts.clear()
        store.add("netns:114", EP["sock"])
        store.register("netns:114", 1114)
        assert scripts == [] and table_text(state_dir) == want
        store.add("netns:114", EP["web"])  # a fixed-port IP endpoint: a new dial
        assert len(scripts) == 1 and "delete chain" in scripts[0] and "list" not in scripts[0]
        want = table_text(state_dir)
        assert "127.0.0.1 . tcp . 8080" in want
        scripts.clear()
        monkeypatch.setattr(egress, "_where", lambda: "another boot")
        store.register("netns:114", 114)
        assert len(scripts) == 1 and table_text(state_dir) == want
        egress.remove(state_dir)  # behind the store's back
        store.register("netns:114", 1114)
        assert table_text(state_dir) is None  # (pools_off reads the kernel: pools go off meanwhile)
        assert egress.pools_off(store, "netns:114")
        store.delete("netns:114", "web")  # a change: its chains are not there, so they are listed
        assert "127.0.0.3" in table_text(state_dir) and "8080" not in table_text(state_dir)
        egress.remove(state_dir)
        store.sync_egress()  # graftd's start
        assert "127.0.0.3" in table_text(state_dir)
        store.forget("netns:114")
    assert table_text(state_dir) is None


# -- sockets handed over unbound (bindpool) ------------------------------------------------------
def test_the_bind_guards_map_follows_the_store(state_dir, monkeypatch):
    """Each container's IP endpoints are in the bind guard's map under the store's owner bytes from
    the write that grants them; an endpoint deleted, a container forgotten: gone in the same write;
    a map that lost them (a guard attached anew) is refilled by the pools check."""
    from sockgraft.host import bindguard

    monkeypatch.delenv(egress.ENV, raising=False)
    bindguard.ensure()
    eps = [parse_endpoint("web type ipv4 addr 127.0.0.1 port 18080"),
           parse_endpoint("out type ipv4 addr 127.0.0.1 port dynamic"),
           parse_endpoint("six type ipv6 addr ::1 port 18081"), parse_endpoint("u type unix path /tmp/u.sock")]
    owner = egress.owner(egress.table_name(state_dir))
    with Store(state_dir) as store:
        undo = store.install("netns:120", 120, "api", eps, [], [], fresh=True)
        mark = store.marks()["netns:120"]
        keys = {bindguard.key(mark, "127.0.0.1", 18080), bindguard.key(mark, "127.0.0.1", 0),
                bindguard.key(mark, "::1", 18081)}
        assert bindguard.holds(owner, keys)
        assert egress.pools_off(store, "netns:120", unbound=True) == ""
        store.delete("netns:120", "web")
        assert not bindguard.holds(owner, {bindguard.key(mark, "127.0.0.1", 18080)})
        assert bindguard.holds(owner, keys - {bindguard.key(mark, "127.0.0.1", 18080)})
        bindguard.sync(owner, set())  # lost behind the store's back
        egress._checked.clear()
        assert egress.pools_off(store, "netns:120", unbound=True) == ""  # put back
        assert bindguard.holds(owner, keys - {bindguard.key(mark, "127.0.0.1", 18080)})
        undo()
        assert not any(bindguard.holds(owner, {k}) for k in keys)


def test_an_unbound_socket_can_neither_send_nor_serve_before_its_bind(state_dir, monkeypatch):
    """The attack: a socket handed over unbound (UNBOUND_TAG) used without a bind - a connect, a
    sendto (both would pick a host port themselves), a listen (the kernel gives it a host port on
    every address) - reaches nothing and serves nothing: the table refuses what it sends (a reset,
    EPERM) and what is sent to it (a reset; a datagram dropped). Loopback only."""
    monkeypatch.delenv(egress.ENV, raising=False)
    ep = parse_endpoint("ep-out type ipv4 addr 127.0.0.1 port dynamic")
    with Store(state_dir) as store:
        undo = store.install("netns:121", 121, "api", [ep], [], [parse_egress("127.0.0.0/8=ep-out")], fresh=True)
        tag = UNBOUND_TAG | (store.marks()["netns:121"] & 0xFFFF)
        try:
            with socket.socket() as srv:
                srv.bind(("127.0.0.1", 0))
                srv.listen()
                with socket.socket() as s:  # a connect its rules would allow for a marked socket
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, tag)
                    s.settimeout(5)
                    with pytest.raises(ConnectionRefusedError):
                        s.connect(srv.getsockname())
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                rx.bind(("127.0.0.1", 0))
                rx.settimeout(0.3)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, tag)
                with pytest.raises(PermissionError):
                    s.sendto(b"out", rx.getsockname())
                with pytest.raises(socket.timeout):
                    rx.recv(10)
                port = s.getsockname()[1]  # the send gave it a port: nothing sent there arrives
                s.settimeout(0.3)
                rx.sendto(b"in", ("127.0.0.1", port))
                with pytest.raises(socket.timeout):
                    s.recv(10)
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, tag)
                s.listen()
                port = s.getsockname()[1]
                with socket.socket() as c:
                    c.settimeout(5)
                    with pytest.raises(ConnectionRefusedError):
                        c.connect(("127.0.0.1", port))
        finally:
            undo()
