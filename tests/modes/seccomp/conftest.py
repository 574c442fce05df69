"""Fixtures for seccomp mode tests: test programs built at test time in tmp dirs."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

PROGS = os.path.join(os.path.dirname(__file__), "progs")


@pytest.fixture(scope="session")
def gonet(tmp_path_factory) -> str:
    """The Go test program (stdlib only), built with a private GOCACHE/GOPATH, no network."""
    if shutil.which("go") is None:
        pytest.fail("golang-go is not installed (scripts/setup installs it)")
    d = tmp_path_factory.mktemp("go")
    env = dict(os.environ, GOCACHE=str(d / "cache"), GOPATH=str(d / "gopath"), GO111MODULE="off",
               CGO_ENABLED="0", GOPROXY="off", GOFLAGS="")
    out = str(d / "gonet")
    subprocess.run(["go", "build", "-o", out, os.path.join(PROGS, "gonet.go")], env=env, check=True,
                   capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def cprog(tmp_path_factory):
    """Compile one of progs/*.c (with -pthread) into a tmp dir; returns the binary's path."""
    d = tmp_path_factory.mktemp("c")
    built: dict[str, str] = {}

    def build(name: str) -> str:
        if name not in built:
            out = str(d / name)
            subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", out, os.path.join(PROGS, f"{name}.c")],
                           check=True, capture_output=True, timeout=120)
            built[name] = out
        return built[name]

    return build
