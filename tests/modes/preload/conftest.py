"""Fixtures of the preload tests: the library built and installed from this checkout, C programs
compiled against the installed graft.h, and `graft run --mode preload` as a user starts it."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import graft_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CSRC = os.path.join(ROOT, "csrc")
C_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c")


@pytest.fixture(scope="session")
def preload_lib() -> str:
    """The library as `scripts/setup` installs it (make install is idempotent and quick)."""
    subprocess.run(["make", "-s", "-C", CSRC, "install"], check=True)
    from sockgraft.modes.preload.attach import preload_lib as where

    return where()


@pytest.fixture(scope="session")
def cc(preload_lib, tmp_path_factory):
    """Compile tests/modes/preload/c/NAME.c against `graft config include-dir`; returns the binary."""
    out = tmp_path_factory.mktemp("cbin")
    inc = subprocess.run([*graft_cmd(), "config", "include-dir"], check=True, capture_output=True, text=True).stdout.strip()

    def build(name: str) -> str:
        exe = str(out / name)
        subprocess.run(["gcc", "-O1", "-Wall", "-Wno-stringop-truncation", "-pthread", "-I", inc, "-o", exe,
                        os.path.join(C_TESTS, f"{name}.c")], check=True)
        return exe

    return build


@pytest.fixture
def run_preload(ns, procs, preload_lib, state_dir):
    """Start `graft run -n NS --mode preload ARGS... -- CMD` in the background (stopped at teardown)."""

    def start(args: list[str], cmd: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        p = subprocess.Popen([*graft_cmd(), "run", "-n", ns, "--mode", "preload", *args, "--", *cmd],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, **(env or {})), **kw)
        procs.append(p)
        return p

    return start


def ep(name: str, port: int | None, addr: str = "127.0.0.1") -> list[str]:
    kind = "ipv6" if ":" in addr else "ipv4"
    return ["--endpoint", f"{name} type {kind} addr {addr} port {port if port else 'dynamic'}"]
