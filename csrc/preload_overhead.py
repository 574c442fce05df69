#!/usr/bin/env python3
"""Preload mode's numbers (docs/PRELOAD.md), measured by commands, never asserted by a test.

    python3 csrc/preload_overhead.py [--seconds 5] [--rounds 3] [--binds 2000]

1. iperf3 single stream, native loopback vs grafted (iperf3 -s under `graft run --mode preload`,
   client on the host), alternated in one run; the median of each and their ratio.
2. The cost of socket()+bind()+close(): native, preloaded but local (no pair matches), and
   grafted (a pair matches: one fd-service round trip and a dup3).
Everything runs on loopback and in a netns this script creates (removed at the end).
"""
from __future__ import annotations

import argparse
import json
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


def wait_listening(p: subprocess.Popen) -> None:
    for line in p.stdout:
        if "Server listening" in line:
            return
    raise SystemExit(f"preload_overhead: iperf3 server did not start: {p.stderr.read().strip()}")


def iperf3(port: int, seconds: float, pin: list[str]) -> float:
    out = subprocess.run(["iperf3", "-J", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), *pin],
                         capture_output=True, text=True, timeout=seconds + 30)
    data = json.loads(out.stdout)
    if "error" in data:
        raise SystemExit(f"preload_overhead: iperf3: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def graft_run(netns: str, args: list[str], cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(["graft", "run", "-n", netns, "--mode", "preload", *args, "--", *cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--binds", type=int, default=2000)
    ap.add_argument("--pin", metavar="C,S", help="iperf3 -A: client on CPU C, server on CPU S (less noise)")
    opts = ap.parse_args()
    subprocess.run(["make", "-s", "-C", HERE, "install"], check=True)
    netns = f"graft-preload-overhead-{os.getpid()}"
    procs: list[subprocess.Popen] = []
    try:
        native_port, graft_port = free_port(), free_port()
        native = subprocess.Popen(["iperf3", "-s", "--forceflush", "-B", "127.0.0.1", "-p", str(native_port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(native)
        wait_listening(native)
        grafted = graft_run(netns, ["--endpoint", f"ep-iperf type ipv4 addr 127.0.0.1 port {graft_port}",
                                    "--ingress", "0.0.0.0:5201=ep-iperf", "--ingress", "[::]:5201=ep-iperf"],
                            ["iperf3", "-s", "--forceflush", "-p", "5201"])
        procs.append(grafted)
        wait_listening(grafted)
        results: dict[str, list[float]] = {"native": [], "grafted": []}
        for _ in range(opts.rounds):
            pin = ["-A", opts.pin] if opts.pin else []
            results["native"].append(iperf3(native_port, opts.seconds, pin))
            results["grafted"].append(iperf3(graft_port, opts.seconds, pin))
        n, g = statistics.median(results["native"]), statistics.median(results["grafted"])
        print(f"iperf3 single stream, {opts.rounds} x {opts.seconds:g}s alternated{', pinned ' + opts.pin if opts.pin else ''} (Gbit/s):")
        print(f"  native loopback  {n:7.2f}   rounds: {' '.join(f'{x:.2f}' for x in results['native'])}")
        print(f"  grafted preload  {g:7.2f}   rounds: {' '.join(f'{x:.2f}' for x in results['grafted'])}")
        print(f"  ratio grafted/native = {g / n:.3f}")
        for p in procs:
            stop(p)
        procs.clear()

        with tempfile.TemporaryDirectory() as tmp:
            exe = os.path.join(tmp, "bench_bind")
            subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "bench_bind.c")], check=True)
            rows = []
            native_cmd = subprocess.run(["unshare", "-n", exe, str(opts.binds), "127.0.0.1", "0"],
                                        capture_output=True, text=True, check=True)
            rows.append(("native (no preload)", float(native_cmd.stdout)))
            for label, addr, port in (("preload, local (no pair matches)", "127.0.0.1", "0"),
                                      ("preload, grafted (pair matches)", "0.0.0.0", "8000")):
                p = graft_run(netns, ["--endpoint", "ep-dyn type ipv4 addr 127.0.0.1 port dynamic",
                                      "--ingress", "0.0.0.0:8000=ep-dyn"], [exe, str(opts.binds), addr, port])
                out, err = p.communicate(timeout=600)
                if p.returncode:
                    raise SystemExit(f"preload_overhead: bench_bind: {err.strip()}")
                rows.append((label, float(out)))
            print(f"socket()+bind()+close(), mean of {opts.binds} (µs per socket):")
            for label, us in rows:
                print(f"  {label:34s} {us:8.1f}")
        return 0
    finally:
        for p in procs:
            stop(p)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
