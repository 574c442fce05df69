"""A bounded atheris run over the decoders (the long run: tests/fuzz/fuzz_decoders.py by hand)."""
import os
import re
import subprocess
import sys

import pytest

HARNESS = os.path.join(os.path.dirname(__file__), "..", "fuzz", "fuzz_decoders.py")
SECONDS = int(os.environ.get("GRAFT_FUZZ_SECONDS", "20"))


def test_atheris_finds_no_crash(tmp_path):
    pytest.importorskip("atheris", reason="atheris is installed by scripts/setup")
    p = subprocess.run([sys.executable, HARNESS, f"-max_total_time={SECONDS}", "-rss_limit_mb=1024",
                        f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=SECONDS + 120)
    runs = re.findall(r"Done (\d+) runs", p.stderr)
    assert p.returncode == 0, p.stderr[-3000:]
    assert runs and int(runs[-1]) > 1000, p.stderr[-2000:]
    print(f"atheris: {runs[-1]} inputs in {SECONDS}s, no crash")
