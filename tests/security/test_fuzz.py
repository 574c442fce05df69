"""A bounded atheris run over the decoders (the long run: tests/fuzz/fuzz_decoders.py by hand)."""
import os
import re
import subprocess
import sys

import pytest

from sockgraft.core.protocol import ProtocolError, parse_reply

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


@pytest.mark.parametrize("data", [
    b"ok 2", b"ok 1", b"ok 1 ", b"ok x 127.0.0.1 80", b"ok 2 127.0.0.1 http", b"ok 2 127.0.0.1 70000",
    b"ok 2 ::1 80", b"ok 10 1.2.3.4 80", b"ok 2 127.0.0.1 80 9", b"ok 3 x 1", b"ok " + b"9" * 5000,
    b"ok -2 127.0.0.1 80", b"ok 2 127.0.0.1 +80", b"oops", b"",
])
def test_parse_reply_raises_only_protocol_error(data):
    """What the fuzzer found in parse_reply (IndexError, ValueError): garbage is a ProtocolError."""
    with pytest.raises(ProtocolError):
        parse_reply(data)


def test_err_reply_with_a_bad_errno_is_eio():
    assert parse_reply(b"err " + b"9" * 5000 + b" boom").errno == 5
    assert parse_reply(b"err x boom").errno == 5
