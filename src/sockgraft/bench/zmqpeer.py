"""ZeroMQ perf peers for `graft bench` (pyzmq): PUSH/PULL throughput and REQ/REP latency.

    python3 -m sockgraft.bench.zmqpeer pull --bind tcp://127.0.0.1:5555
    python3 -m sockgraft.bench.zmqpeer push --connect tcp://127.0.0.1:5555 --size 1024 --seconds 2
    python3 -m sockgraft.bench.zmqpeer rep  --bind tcp://127.0.0.1:5556
    python3 -m sockgraft.bench.zmqpeer req  --connect tcp://127.0.0.1:5556 --size 64 --seconds 2

The sender sends for SECONDS, then an empty message that ends the run. `pull` measures from its first
message to the end marker and prints one JSON object; `req` prints round-trip statistics.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import zmq


def pull(args) -> dict:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVTIMEO, int(args.timeout * 1000))
    s.bind(args.bind)
    first = s.recv()
    t0 = time.perf_counter()
    count, nbytes = 1, len(first)
    s.setsockopt(zmq.RCVTIMEO, 30000)
    while True:
        m = s.recv(copy=False)
        n = len(m)
        if n == 0:
            break
        count += 1
        nbytes += n
    dt = time.perf_counter() - t0
    s.close(linger=0)
    ctx.term()
    return {"messages": count, "bytes": nbytes, "seconds": dt, "msgs_per_s": count / dt,
            "gbit_s": nbytes * 8 / dt / 1e9}


def push(args) -> dict:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.connect(args.connect)
    buf = b"x" * args.size
    big = args.size >= 65536
    s.send(buf)  # blocks until a peer is connected
    count = 1
    t_end = time.perf_counter() + args.seconds
    while True:
        for _ in range(64):
            s.send(buf, copy=not big)
        count += 64
        if time.perf_counter() >= t_end:
            break
    s.send(b"")
    s.close(linger=30000)
    ctx.term()
    return {"sent": count}


def rep(args) -> dict:
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.setsockopt(zmq.RCVTIMEO, int(args.timeout * 1000))
    s.bind(args.bind)
    n = 0
    while True:
        m = s.recv(copy=False)
        s.send(m, copy=False)
        if len(m) == 0:
            break
        n += 1
    s.close(linger=1000)
    ctx.term()
    return {"replies": n}


def req(args) -> dict:
    ctx = zmq.Context()
    s = ctx.socket(zmq.REQ)
    s.connect(args.connect)
    buf = b"x" * args.size
    clock = time.perf_counter_ns
    s.send(buf)
    s.recv()  # first exchange waits for the connection: not timed
    rtts = []
    t_end = time.perf_counter() + args.seconds
    while time.perf_counter() < t_end:
        t0 = clock()
        s.send(buf)
        s.recv(copy=False)
        rtts.append(clock() - t0)
    s.send(b"")
    s.recv()
    s.close(linger=0)
    ctx.term()
    rtts.sort()
    return {"count": len(rtts), "median_us": statistics.median(rtts) / 1000, "mean_us": statistics.fmean(rtts) / 1000,
            "p99_us": rtts[int(len(rtts) * 0.99)] / 1000}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m sockgraft.bench.zmqpeer", description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=["pull", "push", "rep", "req"])
    ap.add_argument("--bind")
    ap.add_argument("--connect")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the first message")
    args = ap.parse_args(argv)
    if (args.role in ("pull", "rep")) != bool(args.bind) or (args.role in ("push", "req")) != bool(args.connect):
        ap.error("pull/rep take --bind, push/req take --connect")
    try:
        result = {"pull": pull, "push": push, "rep": rep, "req": req}[args.role](args)
    except zmq.Again:
        print(f"zmqpeer {args.role}: timed out", file=sys.stderr)
        return 1
    except zmq.ZMQError as e:
        print(f"zmqpeer {args.role}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
