"""The audit log stays bounded: grants and locals aggregated per interval, the file rotated."""
import json
import os

from sockgraft.host.audit import Audit


def lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_grants_are_aggregated_denials_are_not(tmp_path):
    a = Audit(str(tmp_path), deferred=True, interval=3600)
    for port in range(1000):
        a.record("grant", container="c", mode="seccomp", op="connect", endpoint="out", addr="127.0.0.1", port=port)
    a.record("grant", container="c", mode="seccomp", op="bind", endpoint="web", port=80)
    for _ in range(3):
        a.record("deny", container="c", mode="seccomp", op="connect", errno=1, reason="no")
    a.flush()  # the first of each kind at once, every denial; the repeats wait for the interval's end
    got = lines(a.path)
    assert [(r["event"], r["op"], r.get("count")) for r in got] == \
        [("grant", "connect", 1), ("grant", "bind", 1)] + [("deny", "connect", None)] * 3
    assert got[0]["port"] == 0
    a.close()  # closing writes the repeats
    rest = lines(a.path)[5:]
    assert len(rest) == 1 and rest[0]["count"] == 999 and rest[0]["repeats"] and rest[0]["port"] == 0
    assert sum(r.get("count", 0) for r in lines(a.path) if r["event"] == "grant") == 1001


def test_interval_over_writes_the_repeats(tmp_path):
    a = Audit(str(tmp_path), deferred=True, interval=0)
    for _ in range(3):
        a.record("local", container="c", mode="api", op="bind", endpoint=None)
    a.flush()
    assert [r["count"] for r in lines(a.path)] == [1, 2]
    a.record("local", container="c", mode="api", op="bind", endpoint=None)  # a new interval: at once
    a.flush()
    assert [r["count"] for r in lines(a.path)] == [1, 2, 1]
    a.close()


def test_a_count_of_alike_events_is_one_call(tmp_path):
    """A caller that counted N alike decisions (the seccomp C loop's quiet locals) records them at
    once: an aggregated kind counts N, another kind writes one line that says N."""
    a = Audit(str(tmp_path), deferred=True, interval=3600)
    a.record("local", 500, container="c", mode="seccomp", op="bind", endpoint=None)
    a.record("local", 2, container="c", mode="seccomp", op="bind", endpoint=None)
    a.record("deny", 3, container="c", mode="seccomp", op="connect", errno=1, reason="no")
    a.close()
    got = lines(a.path)
    assert sum(r["count"] for r in got if r["event"] == "local") == 502
    assert [r["count"] for r in got if r["event"] == "deny"] == [3]


def test_rotation_bounds_the_files(tmp_path):
    a = Audit(str(tmp_path), max_bytes=4096, keep=2)
    for i in range(2000):
        a.record("deny", container="c", mode="api", op="connect", errno=1, reason="x" * 40, n=i)
    a.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.lock"]
    for name in names[:-1]:
        assert os.path.getsize(tmp_path / name) <= 4096 + 200  # one line past the bound at most
    last = lines(tmp_path / "audit.log")[-1]
    assert last["n"] == 1999  # the newest lines are kept


def test_two_writers_rotate_once(tmp_path):
    a, b = Audit(str(tmp_path), max_bytes=2048, keep=3), Audit(str(tmp_path), max_bytes=2048, keep=3)
    for i in range(300):
        (a if i % 2 else b).record("deny", container="c", op="x", reason="y" * 30, n=i)
    a.close()
    b.close()
    seen = []
    for name in ("audit.log.3", "audit.log.2", "audit.log.1", "audit.log"):
        if os.path.exists(tmp_path / name):
            seen += [r["n"] for r in lines(tmp_path / name)]
    assert seen == sorted(seen) and seen[-1] == 299  # nothing reordered, nothing after the newest lost
