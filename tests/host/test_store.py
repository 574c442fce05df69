import multiprocessing
import sqlite3

import pytest

from sockgraft.core.endpoint import SpecError, parse_endpoint
from sockgraft.host.store import SCHEMA_VERSION, Store, StoreError
from sockgraft.core.rules import parse_ingress, parse_egress

EP = parse_endpoint("ep-http type ipv4 addr 127.0.0.1 port 8080")


def test_add_show_del_and_survives_reopen(tmp_path):
    with Store(str(tmp_path)) as s:
        s.add("c1", EP)
        s.add("c1", parse_endpoint("out type ipv4 addr 127.0.0.1 port dynamic"))
    with Store(str(tmp_path)) as s:
        assert [e.name for e in s.endpoints("c1")] == ["ep-http", "out"]
        s.delete("c1", "out")
        assert s.endpoints("c1") == [EP]
        with pytest.raises(SpecError, match="no endpoint"):
            s.delete("c1", "out")


def test_wal_and_schema_version(tmp_path):
    Store(str(tmp_path)).close()
    db = sqlite3.connect(tmp_path / "tables.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)


def test_newer_schema_refused(tmp_path):
    Store(str(tmp_path)).close()
    db = sqlite3.connect(tmp_path / "tables.db")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    with pytest.raises(StoreError, match="newer"):
        Store(str(tmp_path))


def test_duplicate_and_cross_container_conflict(tmp_path):
    with Store(str(tmp_path)) as s:
        s.add("c1", EP)
        with pytest.raises(SpecError, match="already exists"):
            s.add("c1", EP)
        s.add("c2", EP.__class__("ep-http", "ipv4", "127.0.0.2", 8080))  # same name, other host endpoint
        with pytest.raises(SpecError, match="already granted to c1"):
            s.add("c3", EP.__class__("x", "ipv4", "0.0.0.0", 8080))


def test_rules_and_policy(tmp_path):
    with Store(str(tmp_path)) as s:
        s.add("c1", EP)
        s.set_rules("c1", [parse_ingress("0.0.0.0:80=ep-http")], [parse_egress("127.0.0.0/8=ep-http")])
        p = s.policy("c1")
        assert list(p.endpoints) == ["ep-http"] and str(p.ingress[0]) == "0.0.0.0:80=ep-http"
        assert str(p.egress[0]) == "127.0.0.0/8=ep-http"
        s.forget("c1")
        assert s.policy("c1").endpoints == {} and s.container("c1") is None


def test_unwritable_state_dir_is_one_line_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(StoreError, match="state database"):
        Store(str(target / "sub"))


def _writer(path, key, n):
    with Store(path) as s:
        for i in range(n):
            s.add(key, parse_endpoint(f"e{i} type ipv4 addr 127.0.0.1 port dynamic"))


def test_concurrent_writers_lose_nothing(tmp_path):
    Store(str(tmp_path)).close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), f"c{k}", 40)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Store(str(tmp_path)) as s:
        assert all(len(s.endpoints(f"c{k}")) == 40 for k in range(4))


def test_every_container_has_its_own_mark_carried_by_its_grants(tmp_path):
    from sockgraft.core.engine import Op
    from sockgraft.core.tables import MARK_MASK, MARK_TAG

    with Store(str(tmp_path)) as s:
        s.install("c1", None, "api", [EP], [parse_ingress("0.0.0.0:80=ep-http")], [], fresh=True)
        s.register("c2", None)
        marks = s.marks()
        assert set(marks) == {"c1", "c2"} and marks["c1"] != marks["c2"]
        assert all(m & MARK_MASK == MARK_TAG for m in marks.values())
        pol = s.policy("c1")
        assert pol.mark == marks["c1"]
        d = pol.decide(Op("bind", 2, "0.0.0.0", 80, 1))
        assert d.granted and d.mark == marks["c1"]
        s.forget("c1")
        s.register("c3", None)  # a removed container's number is not given again at once
        assert s.marks()["c3"] not in (marks["c1"], marks["c2"])
    with Store(str(tmp_path)) as s:  # stable across a restart
        assert s.marks()["c2"] == marks["c2"]


def test_a_version_1_database_is_brought_up_to_date(tmp_path):
    db = sqlite3.connect(tmp_path / "tables.db")
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE containers (key TEXT PRIMARY KEY, netns_ino INTEGER, mode TEXT, created REAL NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        INSERT INTO containers VALUES ('old', NULL, 'api', 0);
    """)
    db.close()
    with Store(str(tmp_path)) as s:
        assert "old" in s.marks() and s.policy("old").mark == s.marks()["old"]
