"""The seccomp supervisor's wait-and-serve loop in C (`gs_loop_*` of libgraft-seccomp.so, see
csrc/seccomp_fast.h): its context, the thread `gs_loop_run` runs in (ctypes releases the GIL for
the call) and its mutex, under which the tables and pools the C uses are changed (fast.py).

Public API: `loop_enabled()`, `Loop(lib, shm_path, out_type)` with `start`, `stop`, `take`,
`counts`, `version`, `free`, `lock`, `fd`; `LoopLock`, `NoLock`.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

LOOP_ENV = "GRAFT_SECCOMP_LOOP"  # 0: no C loop thread (the Python loop calls gs_serve_batch)
RING = 1024  # csrc/seccomp_fast.h GS_RING: records taken at most per gs_loop_take


def loop_enabled() -> bool:
    return os.environ.get(LOOP_ENV, "1").strip() not in ("0", "no", "off", "false")


class NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class LoopLock:
    """The C loop's mutex (gs_loop_lock): held while the pools or the table of an installed table
    change (the C takes pool sockets and reads the table under it)."""

    def __init__(self, lib, ctx):
        self.lib, self.ctx = lib, ctx

    def __enter__(self):
        self.lib.gs_loop_lock(self.ctx)
        return self

    def __exit__(self, *exc) -> None:
        self.lib.gs_loop_unlock(self.ctx)


class Loop:
    """The C wait-and-serve loop (gs_loop_*): its context, and the thread it runs in (ctypes
    releases the GIL for the call)."""

    def __init__(self, lib, shm_path: str, out_type):
        self.lib = lib
        ctx = lib.gs_loop_new(shm_path.encode())
        if not ctx:
            e = ctypes.get_errno()
            raise OSError(e, f"native loop: {shm_path}: {os.strerror(e)}")
        self.ctx = ctx
        self.fd = lib.gs_loop_fd(ctx)
        self.lock = LoopLock(lib, ctx)
        self.out_type = out_type
        self.outs = (out_type * RING)()
        self.thread: threading.Thread | None = None
        self.result = 0

    def start(self) -> None:
        def run() -> None:
            self.result = self.lib.gs_loop_run(self.ctx)
            if self.result < 0:
                print(f"graft: seccomp supervisor: native loop: {os.strerror(-self.result)}", file=sys.stderr)

        self.thread = threading.Thread(target=run, name="graft-seccomp-native", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Ends gs_loop_run (no notification is received after this returns)."""
        self.lib.gs_loop_stop(self.ctx)
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def take(self) -> list:
        count = self.lib.gs_loop_take(self.ctx, self.outs, RING)
        out = []
        for i in range(count):
            rec = self.out_type()
            ctypes.pointer(rec)[0] = self.outs[i]
            out.append(rec)
        return out

    def counts(self) -> tuple[int, ...]:
        c = (ctypes.c_uint64 * 4)()
        self.lib.gs_loop_counts(self.ctx, c)
        return tuple(c)

    def version(self) -> int:
        return self.lib.gs_version(self.ctx)

    def free(self) -> None:
        if self.ctx:
            self.stop()
            self.lib.gs_loop_free(self.ctx)
            self.ctx = None
