"""host/paths.write_json: the one atomic JSON writer (records, status, config.json)."""
import json
import os
import threading

import pytest

from sockgraft.host.paths import write_json


def test_write_json_replaces_whole_file_with_mode(tmp_path):
    p = tmp_path / "rec.json"
    p.write_text("old")
    write_json(str(p), {"a": 1}, 0o640)
    assert json.loads(p.read_text()) == {"a": 1}
    assert os.stat(p).st_mode & 0o7777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["rec.json"]  # no temporary file left


def test_write_json_failure_leaves_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "rec.json"
    write_json(str(p), [1])
    with pytest.raises(TypeError):
        write_json(str(p), {"x": object()})  # not JSON
    assert json.loads(p.read_text()) == [1]
    assert sorted(os.listdir(tmp_path)) == ["rec.json"]


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    p = str(tmp_path / "status.json")
    errors = []

    def writer(n):
        try:
            for i in range(200):
                write_json(p, {"writer": n, "i": i, "pad": "x" * 5000})
        except Exception as e:  # pragma: no cover - the failure we test for
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for _ in range(200):
        with open(p) if os.path.exists(p) else open(os.devnull) as f:
            text = f.read()
        if text:
            assert json.loads(text)["pad"] == "x" * 5000
    for t in threads:
        t.join()
    assert not errors
    assert sorted(os.listdir(tmp_path)) == ["status.json"]
