"""The Python interpreters sockgraft starts import nothing from the directory they start in.

`python -m MODULE` and `python -c CODE` put that directory first on sys.path. A json.py there
would then run inside graftd's listener keeper as root; a numbers.py made every bench peer fail.
Each test plants such a module, with a marker it would write, and runs the product's own command
from that directory."""
import subprocess

import pytest

from sockgraft.bench.base import py
from sockgraft.host.children import python
from sockgraft.runtime import keeper


def plant(directory, module: str):
    """`module`.py in `directory` that would leave a marker and exit 7 if imported: the marker's path."""
    marker = directory / f"{module}-was-imported"
    (directory / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(7)\n")
    return marker


def test_the_listener_keeper_does_not_import_from_graftds_directory(tmp_path, monkeypatch):
    here = tmp_path / "cwd"
    here.mkdir()
    marker = plant(here, "json")  # the keeper speaks JSON
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    monkeypatch.chdir(here)
    client = keeper.Client.spawn(str(runtime), timeout=20)
    try:
        assert client.proc.poll() is None
    finally:
        client.sock.close()
        client.proc.kill()
        client.proc.wait(10)
    assert not marker.exists()


@pytest.mark.parametrize("module", ["numbers", "json"])
def test_the_bench_peers_do_not_import_from_the_benchs_directory(tmp_path, module):
    marker = plant(tmp_path, module)
    r = subprocess.run(py("pypeer", "--help"), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()


def test_code_run_with_dash_c_does_not_import_from_its_directory(tmp_path):
    marker = plant(tmp_path, "json")
    r = subprocess.run(python("-c", "import json; print(json.dumps(1))"), cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "1\n"), r.stderr
    assert not marker.exists()
