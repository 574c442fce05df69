"""The floor (modes/seccomp/floor.py: csrc/seccomp_floor.c, installed by scripts/setup), which cost.py
and graft bench compare seccomp mode with, does what it claims: under seccomp mode's filter, with
`continue` the program's calls run on its own socket, with `swap` its connect runs on a host
socket put in its place (another inode at the same fd number); the program's exit status comes
back; bad input is one line and exit 2."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from sockgraft.modes.seccomp import floor as F

PROG = r"""
import os, socket, sys
s = socket.socket()
before = os.fstat(s.fileno()).st_ino
s.connect(("127.0.0.1", int(sys.argv[1])))
print("swapped" if os.fstat(s.fileno()).st_ino != before else "same", s.getsockname()[0])
sys.exit(3)
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    assert os.access(F.FLOOR, os.X_OK), f"{F.FLOOR} is not installed (scripts/setup)"
    return F.write_filter(str(tmp_path_factory.mktemp("floor") / "filter"))


@pytest.mark.parametrize("how,seen", [("continue", "same"), ("swap", "swapped")])
def test_floor_continues_or_swaps_the_socket(program, how, seen):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        cmd = [sys.executable, "-c", PROG, str(srv.getsockname()[1])]
        r = subprocess.run(F.argv(how, "127.0.0.1", program, cmd), capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout.split()) == (3, [seen, "127.0.0.1"]), r.stderr


@pytest.mark.parametrize("bad", [dict(source="nowhere"), dict(filter_path="/nonexistent"), dict(flags="x")])
def test_floor_refuses_bad_input(program, bad):
    argv = F.argv("swap", bad.get("source", "127.0.0.1"), bad.get("filter_path", program), ["true"])
    if "flags" in bad:
        argv[4] = bad["flags"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
