"""The cost of one grafted connect in seccomp mode: `python3 -m sockgraft.modes.seccomp.cost`.

1. latency: N blocking connect() from a Python client to a host listener on 127.0.0.1, natively
   and from a container through `graft run --mode seccomp` (a dynamic egress endpoint), with the
   native fast path (fast.py), with it but without its C loop (GRAFT_SECCOMP_LOOP=0: the Python
   loop calls gs_serve_batch) and without it (GRAFT_SECCOMP_FAST=0), side by side; p50/p99 of
   each connect. And the floor of any supervisor on this machine (floor.py): the same client
   under seccomp mode's filter, answered CONTINUE (the trap alone), and with the fewest calls a
   socket swap needs (pidfd_getfd, ADDFD of a host socket made ahead, CONTINUE, close).
   `--pythonpath DIR` runs graft from another tree (e.g. a `git worktree` of an older commit) for
   a before/after comparison.
2. steps: the same client under a supervisor in this process whose kernel calls and handler steps
   are timed (recv, pidfd_getfd, memory copy, decision, audit, socket+bind, connect, addfd, send);
   median µs per grafted connect; for the fast path, the C step (gs_serve) and the whole
   notification. This measures the code of this tree only.
Loopback and a netns it creates and removes only; needs root. docs/SECCOMP.md cites its output.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

from sockgraft.host.children import python

CLIENT = r"""
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
out = []
t0 = time.perf_counter()
for _ in range(n):
    s = socket.socket()
    t = time.perf_counter(); s.connect(("127.0.0.1", port)); out.append(time.perf_counter() - t)
    s.close()
rate = n / (time.perf_counter() - t0)
if len(sys.argv) < 4:
    print(f"{rate:.0f}", " ".join(f"{x * 1e6:.1f}" for x in out))
"""
ENDPOINT = "out type ipv4 addr 127.0.0.1 port dynamic"
EGRESS = "127.0.0.1/32=out"


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)

    def accept() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.close()

    threading.Thread(target=accept, daemon=True).start()
    return srv


def _pcts(printed: str) -> dict:
    """The client's output (its rate of socket+connect+close per second, then each connect's µs)."""
    rate, *us = (float(x) for x in printed.split())
    us.sort()
    return {"p50": round(us[len(us) // 2], 1), "p99": round(us[int(len(us) * 0.99)], 1), "n": len(us),
            "rate": round(rate)}


def latency(n: int, ns: str, pythonpath: str | None) -> dict:
    """p50/p99 natively, under the floor, through seccomp with the fast path, and through seccomp in Python."""
    from sockgraft.modes.seccomp import floor

    srv = _listener()
    out = {}
    try:
        port = str(srv.getsockname()[1])
        native = subprocess.run(python("-c", CLIENT, port, str(n)), capture_output=True, text=True,
                                check=True, timeout=300).stdout
        out["native"] = _pcts(native)
        with tempfile.TemporaryDirectory(prefix="sgfloor-") as tmp:
            program = floor.write_filter(os.path.join(tmp, "filter"))
            for how in floor.HOW:
                got = subprocess.run(floor.argv(how, "127.0.0.1", program, python("-c", CLIENT, port, str(n))),
                                     capture_output=True, text=True, check=True, timeout=300).stdout
                out[f"floor: {how}"] = _pcts(got)
        for name, fast, loop in (("seccomp fast", "1", "1"), ("fast, no C loop", "1", "0"),
                                 ("seccomp python", "0", "1")):
            env = dict(os.environ, GRAFT_STATE_DIR=tempfile.mkdtemp(prefix="sgcost-"), GRAFT_SECCOMP_FAST=fast,
                       GRAFT_SECCOMP_LOOP=loop)
            if pythonpath:
                env["PYTHONPATH"] = pythonpath
            try:
                grafted = subprocess.run([*python("-m", "sockgraft"), "run", "-n", ns, "--mode", "seccomp",
                                          "--endpoint", ENDPOINT, "--egress", EGRESS, "--",
                                          *python("-c", CLIENT, port, str(n))],
                                         capture_output=True, text=True, check=True, timeout=300, env=env).stdout
            finally:
                shutil.rmtree(env["GRAFT_STATE_DIR"], ignore_errors=True)
            out[name] = _pcts(grafted)
    finally:
        srv.close()
    return out


def _c_steps(out, times) -> None:
    """The steps gs_serve stamped in a record of a grant it served (pooled or not)."""
    from sockgraft.modes.seccomp import fastlib as FL

    ns = out.ns
    if out.kind != FL.DONE or out.what != FL.DONE_GRANT:
        return
    prev = 0
    for i, name in enumerate(FL.STEPS):
        if ns[i]:
            times["  C " + name].append((ns[i] - prev) / 1e3)
            prev = ns[i]


class _TimedLib:
    """The fast path's library with gs_serve timed, and the steps it timed itself recorded."""

    def __init__(self, lib, timed, times):
        self.lib = lib
        serve = timed("gs_serve_batch (C)", lib.gs_serve_batch)

        def gs_serve_batch(fd, table, outs, most):
            count = serve(fd, table, outs, most)
            times["notifications per C call (count)"].append(max(count, 0))
            for out in outs[:max(count, 0)]:
                _c_steps(out, times)
            return count

        self.gs_serve_batch = gs_serve_batch

    def __getattr__(self, name):  # the C loop's functions: as they are
        return getattr(self.lib, name)


def steps(n: int, ns: str, fast: bool = False) -> dict:
    """Median µs per step of a grafted connect, from a supervisor in this process (`fast`: with
    the native fast path, whose C step is timed as one)."""
    from sockgraft.core.endpoint import parse_endpoint
    from sockgraft.core.rules import parse_egress
    from sockgraft.host import hostsock, netns
    from sockgraft.host.store import Store
    from sockgraft.modes.base import RunContext, RunSpec
    from sockgraft.modes.seccomp import handlers as H
    from sockgraft.modes.seccomp.attach import SeccompAttach

    times: dict[str, list[float]] = defaultdict(list)

    def timed(name, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                times[name].append((time.perf_counter() - t) * 1e6)
        return run

    state = tempfile.mkdtemp(prefix="sgcost-")
    spec = RunSpec(cmd=[], netns=ns, mode="seccomp", endpoints=[parse_endpoint(ENDPOINT)],
                   egress=[parse_egress(EGRESS)], state_dir=state)
    container = netns.by_name(ns)
    store = Store(state)
    store.install(container.key, container.ino, "seccomp", spec.endpoints, [], spec.egress, fresh=True)
    srv = _listener()
    spec.cmd = python("-c", CLIENT, str(srv.getsockname()[1]), str(n), "quiet")
    attach = SeccompAttach(RunContext(spec, container, "", state, dict(os.environ)))
    saved = (hostsock.open_connecting, H.K.raw_call)
    env_saved = os.environ.get("GRAFT_SECCOMP_FAST")
    os.environ["GRAFT_SECCOMP_FAST"] = "1" if fast else "0"
    try:
        attach.prepare()
        sup = attach.supervisor
        if sup.fast is not None:
            sup.fast.lib = _TimedLib(sup.fast.lib, timed, times)
            record = sup.fast.record

            def recorded(t, out, park):  # the C loop's records: the steps it stamped
                _c_steps(out, times)
                return record(t, out, park)

            sup.fast.record = recorded
        k = sup.kernel
        for method, name in (("recv", "recv"), ("getfd", "pidfd_getfd"), ("read", "memory copy"),
                             ("id_valid", "id_valid"), ("cloexec", "cloexec (/proc fdinfo)"),
                             ("addfd", "addfd"), ("send", "send")):
            setattr(k, method, timed(name, getattr(k, method)))
        sup.handlers.decide = timed("decision", sup.handlers.decide)
        sup.handlers.audit_decision = timed("audit", sup.handlers.audit_decision)
        hostsock.open_connecting = timed("socket+bind+connect", saved[0])
        H.K.raw_call = lambda name, fd, raw: (timed(name, saved[1]) if name == "connect" else saved[1])(name, fd, raw)
        sup.on_notification = lambda seconds: times["whole notification"].append(seconds * 1e6)

        def preexec() -> None:
            netns.enter(container.path)
            attach.preexec()

        proc = attach.spawn(preexec)
        proc.wait(300)
    finally:
        if env_saved is None:
            os.environ.pop("GRAFT_SECCOMP_FAST", None)
        else:
            os.environ["GRAFT_SECCOMP_FAST"] = env_saved
        hostsock.open_connecting, H.K.raw_call = saved
        attach.cleanup()
        srv.close()
        store.forget(container.key)
        store.close()
        shutil.rmtree(state, ignore_errors=True)
    out = {name: round(statistics.median(v), 1) for name, v in times.items()}
    if fast and out.get("notifications per C call (count)"):
        # the loop's time covers a whole batch: per notification
        per = out.pop("notifications per C call (count)")
        out["whole notification"] = f"{out.pop('whole notification')} per {per} notifications"
        out["gs_serve_batch (C)"] = f"{out['gs_serve_batch (C)']} per {per} notifications"
    if "socket+bind+connect" in out and "connect" in out:
        out["socket+bind (+option copy)"] = round(out.pop("socket+bind+connect") - out["connect"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m sockgraft.modes.seccomp.cost", description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--connects", type=int, default=2000)
    ap.add_argument("--pythonpath", help="run graft (latency part only) from this source dir")
    ap.add_argument("--latency-only", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("cost: needs root (it creates a network namespace)", file=sys.stderr)
        return 1
    from sockgraft.host import netns

    name = f"sgcost{os.getpid()}"
    netns.create(name)
    try:
        lat = latency(args.connects, name, args.pythonpath)
        print(f"blocking connect µs (n={args.connects})")
        for which, p in lat.items():
            print(f"  {which:<16} p50 {p['p50']:>7}  p99 {p['p99']:>7}  ops/s {p['rate']:>6}")
        if not args.latency_only:
            for fast in (True, False):
                print("steps, fast path" if fast else "steps, Python path (GRAFT_SECCOMP_FAST=0)")
                for step, us in steps(args.connects, name, fast).items():
                    print(f"  {step:<28} {us:>8} µs (median)")
    finally:
        netns.remove(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
