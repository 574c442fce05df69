"""Preload mode: unmodified dynamically linked programs, their socket calls converted by
`libgraft-hijack.so` (csrc/), which asks the fd service for every decision.

`graft run --mode preload` sets LD_PRELOAD and exports the run's rules in the variables the library
reads (GRAFT_CONV_PAIRS for --ingress, GRAFT_EGRESS for --egress). `graft config include-dir` and
`graft config preload-lib` print where `make -C csrc install` (run by scripts/setup) put graft.h
and the library. `python3 csrc/preload_overhead.py` prints the numbers of docs/PRELOAD.md.
"""
from __future__ import annotations

import os

from sockgraft.core.endpoint import SpecError
from sockgraft.modes.base import Attach

LIB_NAME = "libgraft-hijack.so"
PREFIX = os.environ.get("GRAFT_PREFIX", "/usr/local")  # the Makefile's PREFIX
LIB_DIR = os.path.join(PREFIX, "lib", "sockgraft")
INCLUDE_DIR = os.path.join(PREFIX, "include", "sockgraft")
ENV_INGRESS, ENV_EGRESS, ENV_BBCONN = "GRAFT_CONV_PAIRS", "GRAFT_EGRESS", "GRAFT_BBCONN"


def preload_lib() -> str:
    path = os.path.join(LIB_DIR, LIB_NAME)
    if not os.path.exists(path):
        raise SpecError(f"{path} is not installed: run scripts/setup (or make -C csrc install)")
    return path


def include_dir() -> str:
    if not os.path.exists(os.path.join(INCLUDE_DIR, "graft.h")):
        raise SpecError(f"{INCLUDE_DIR}/graft.h is not installed: run scripts/setup (or make -C csrc install)")
    return INCLUDE_DIR


def preload_env(env: dict[str, str], ingress, egress) -> dict[str, str]:
    """`env` with the library preloaded (first) and the rules in the library's variables."""
    lib = preload_lib()
    others = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p != lib]
    env = dict(env, LD_PRELOAD=" ".join([lib, *others]))
    if ingress:
        env[ENV_INGRESS] = " ".join(str(p) for p in ingress)
    if egress:
        env[ENV_EGRESS] = " ".join(str(r) for r in egress)
    return env


class PreloadAttach(Attach):
    name = "preload"

    def prepare(self) -> None:
        env = preload_env(self.ctx.env, self.ctx.spec.ingress, self.ctx.spec.egress)
        self.ctx.env.clear()
        self.ctx.env.update(env)
