#!/usr/bin/env python3
"""The cost of one connect under preload (docs/PRELOAD.md "Cost of one grafted connect"), measured
by commands, never asserted by a test:

    python3 csrc/connect_cost.py [--n 3000] [--old-src DIR --old-prefix DIR]

1. One blocking connect() to a host listener on loopback (client closes first), p50/p99/mean in
   µs: native; grafted by an egress rule with the fd service's native fast path off
   (GRAFT_FDSERVICE_FAST=0: Python answers) and on, the service connecting (GRAFT_POOLS=0), and
   the default: pooled host sockets, the program's own connect. With --old-src/--old-prefix
   (a checkout of the previous tree and its installed library) also the previous design.
2. Operations no rule matches: connect to a listener in the container's own netns, bind to
   127.0.0.1:0 — native, under preload (prefilter: no round trip), and with GRAFT_PREFILTER=0.
3. The fd service's own part of a grant, in-process (FdService.handle of a `connect` request),
   and its pieces (Policy.decide, hostsock.open_connecting).
Loopback and netns this script creates only."""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graft_run(netns: str, args: list[str], cmd: list[str], env: dict | None = None, old: tuple | None = None) -> str:
    e = dict(os.environ, **(env or {}))
    graft = [sys.executable, "-m", "sockgraft"]
    if old:
        e["PYTHONPATH"], e["GRAFT_PREFIX"] = old
    p = subprocess.run([*graft, "run", "-n", netns, "--mode", "preload", *args, "--", *cmd],
                       capture_output=True, text=True, env=e, timeout=600)
    if p.returncode:
        raise SystemExit(f"connect_cost: {' '.join(cmd)}: {p.stderr.strip()}")
    return p.stdout.strip()


def row(label: str, out: str) -> None:
    p50, p99, mean, errors = out.split()
    print(f"  {label:44s} {float(p50):8.1f} {float(p99):8.1f} {float(mean):8.1f}   errors {errors}")


def service_part(n: int, port: int) -> None:
    from sockgraft.core.endpoint import parse_endpoint
    from sockgraft.core.engine import Op
    from sockgraft.core.rules import parse_egress
    from sockgraft.host import hostsock
    from sockgraft.host.store import Store
    from sockgraft.modes.api.fdservice import FdService

    key, ino = "netns:4242424243", 4242424243
    with tempfile.TemporaryDirectory() as state:
        with Store(state) as store:
            store.register(key, ino, "preload")
            store.add(key, parse_endpoint("ep-out type ipv4 addr 127.0.0.1 port dynamic"), ino)
            store.set_rules(key, [], [parse_egress("127.0.0.1/32=ep-out")])
        svc = FdService(state, mode="preload")
        req = f"connect 2 127.0.0.1 {port} 1 0".encode()
        policy = svc.store.cached_policy(key)
        op = Op("connect", socket.AF_INET, "127.0.0.1", port)

        def timed(fn) -> float:
            t = []
            for _ in range(n):
                a = time.perf_counter()
                fn()
                t.append((time.perf_counter() - a) * 1e6)
            return statistics.median(t)

        def handle():
            _reply, sock = svc.handle(key, ino, req)
            sock.close()

        d = policy.decide(op)
        print(f"  FdService.handle(connect) in-process, p50   {timed(handle):8.1f}")
        print(f"    Policy.decide                              {timed(lambda: policy.decide(op)):8.1f}")
        print(f"    hostsock.open_connecting + close           "
              f"{timed(lambda: hostsock.open_connecting(d, socket.SOCK_STREAM, 0, ('127.0.0.1', port))[0].close()):8.1f}")
        svc.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--old-src", help="src/ of the previous tree (PYTHONPATH for its `graft run`)")
    ap.add_argument("--old-prefix", help="where the previous library is installed (its GRAFT_PREFIX)")
    opts = ap.parse_args()
    subprocess.run(["make", "-s", "-C", HERE, "install"], check=True)
    netns = f"graft-connect-cost-{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "bench_connect")
        subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, os.path.join(HERE, "bench_connect.c")], check=True)
        port = free_port()
        acc = subprocess.Popen([exe, "accept", str(port)])
        try:
            n = str(opts.n)
            out_ep = ["--endpoint", "ep-out type ipv4 addr 127.0.0.1 port dynamic"]
            egress = [*out_ep, "--egress", "127.0.0.1/32=ep-out"]
            other = [*out_ep, "--egress", "10.0.0.0/8=ep-out", "--ingress", "0.0.0.0:80=ep-out"]
            old = (opts.old_src, opts.old_prefix) if opts.old_src and opts.old_prefix else None
            time.sleep(0.2)  # the acceptor listens (a measurement script, not a test)
            print(f"blocking connect() to a host listener, {n} x, client closes first (µs):   p50      p99     mean")
            row("native", subprocess.run([exe, "connect", "127.0.0.1", str(port), n], capture_output=True,
                                         text=True, check=True).stdout)
            if old:
                row("preload, previous design (bind, then connect)", graft_run(netns, egress, [exe, "connect", "127.0.0.1", str(port), n], old=old))
            row("preload, grafted, GRAFT_FDSERVICE_FAST=0", graft_run(netns, egress, [exe, "connect", "127.0.0.1", str(port), n],
                                                                 {"GRAFT_FDSERVICE_FAST": "0"}))
            row("preload, grafted, service connects (GRAFT_POOLS=0)",
                graft_run(netns, egress, [exe, "connect", "127.0.0.1", str(port), n], {"GRAFT_POOLS": "0"}))
            row("preload, grafted, pooled sockets (default)", graft_run(netns, egress, [exe, "connect", "127.0.0.1", str(port), n]))
            print("operations no rule matches (µs):")
            native_local = subprocess.run(["unshare", "-n", "sh", "-c", f'ip link set lo up && exec "$0" local {n}', exe],
                                          capture_output=True, text=True, check=True).stdout
            row("connect, native (own netns)", native_local)
            if old:
                row("connect, preload previous design", graft_run(netns, other, [exe, "local", n], old=old))
            row("connect, preload GRAFT_PREFILTER=0", graft_run(netns, other, [exe, "local", n], {"GRAFT_PREFILTER": "0"}))
            row("connect, preload (prefilter)", graft_run(netns, other, [exe, "local", n]))
            native_bind = subprocess.run(["unshare", "-n", exe, "bind", n], capture_output=True, text=True, check=True).stdout
            row("bind 127.0.0.1:0, native", native_bind)
            if old:
                row("bind, preload previous design", graft_run(netns, other, [exe, "bind", n], old=old))
            row("bind, preload GRAFT_PREFILTER=0", graft_run(netns, other, [exe, "bind", n], {"GRAFT_PREFILTER": "0"}))
            row("bind, preload (prefilter)", graft_run(netns, other, [exe, "bind", n]))
            print("the fd service's part of one grant (µs):")
            service_part(min(opts.n, 2000), port)
        finally:
            acc.kill()
            acc.wait()
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
