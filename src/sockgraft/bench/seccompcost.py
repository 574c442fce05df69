"""Measure seccomp mode side by side with native: `python3 -m sockgraft.bench.seccompcost`.

1. per-notification supervisor cost: a loop of trapped getsockname() on a native socket (the
   supervisor answers CONTINUE: one full round trip) and of local bind() (a full decision:
   pidfd_getfd, memory copy, policy, audit, bind performed by the supervisor), minus the same loop
   without the filter; app and supervisor pinned to one CPU (taskset) and unpinned;
2. short connections per second, client in the container (connect + request + close) against a host
   server, grafted vs the same client natively on the host;
3. iperf3 throughput, grafted client (container -> host server) and grafted server vs native.

A measurement of the bench, apart from `graft bench` because it is about the seccomp supervisor
itself (per-call cost, CPU pinning), not about a topology; docs/SECCOMP.md cites its results.
Everything runs on loopback and in a netns it creates and removes; like every bench object, the
netns and the state dir carry the name prefix of sockgraft.bench.debris, so what a killed run
left is swept by the next `graft bench`. Needs root.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from sockgraft.bench.debris import tag
from sockgraft.bench.ports import free_port
from sockgraft.bench.topologies.graft import graft_cmd
from sockgraft.host.children import python

LOOP = r"""
import socket, sys, time
n, what = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t = time.perf_counter()
if what == "getsockname":
    for _ in range(n):
        s.getsockname()
else:
    for _ in range(n):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0)); u.close()
print((time.perf_counter() - t) / n * 1e6)
"""

CLIENT = r"""
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
n, end = 0, time.monotonic() + seconds
t = time.monotonic()
while time.monotonic() < end:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    while s.recv(4096):
        pass
    s.close()
    n += 1
print(n / (time.monotonic() - t))
"""

SERVER = r"""
import selectors, socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0)); l.listen(1024); l.setblocking(False)
print(l.getsockname()[1], flush=True)
sel = selectors.DefaultSelector(); sel.register(l, selectors.EVENT_READ)
reply = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
while True:
    for key, _ in sel.select():
        if key.fileobj is l:
            try:
                c, _ = l.accept()
            except BlockingIOError:
                continue
            c.setblocking(False); sel.register(c, selectors.EVENT_READ)
        else:
            c = key.fileobj
            try:
                data = c.recv(4096)
            except OSError:
                data = b""
            if data:
                try:
                    c.send(reply)
                except OSError:
                    pass
            sel.unregister(c); c.close()
"""


def graft_run_args(ns: str, cmd: list[str], endpoints=(), ingress=(), egress=()) -> list[str]:
    """`graft run --mode seccomp` arguments (after the program name)."""
    args = ["run", "-n", ns, "--mode", "seccomp"]
    for opt, values in (("--endpoint", endpoints), ("--ingress", ingress), ("--egress", egress)):
        for v in values:
            args += [opt, v]
    return [*args, "--", *cmd]


class Bench:
    def __init__(self, netns_name: str, state_dir: str):
        self.ns = netns_name
        self.env = dict(os.environ, GRAFT_STATE_DIR=state_dir)
        self.graft_cmd = graft_cmd()

    def grafted(self, cmd: list[str], pin: str | None = None, endpoints=(), ingress=(), egress=(),
                background: bool = False):
        args = [*self.graft_cmd, *graft_run_args(self.ns, cmd, endpoints, ingress, egress)]
        if pin is not None:
            args = ["taskset", "-c", pin, *args]
        if background:
            return subprocess.Popen(args, env=self.env, stdout=subprocess.PIPE, text=True)
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=True, timeout=300).stdout

    @staticmethod
    def native(cmd: list[str], pin: str | None = None) -> str:
        if pin is not None:
            cmd = ["taskset", "-c", pin, *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout

    EGRESS = {"endpoints": ["out type ipv4 addr 127.0.0.1 port dynamic"], "egress": ["127.0.0.1/32=out"]}

    def notification_cost(self, n: int) -> dict:
        out = {}
        for what in ("getsockname", "bind"):
            for pin_name, pin in (("same_cpu", "0"), ("unpinned", None)):
                native = float(self.native(python("-c", LOOP, str(n), what), pin))
                grafted = float(self.grafted(python("-c", LOOP, str(n), what), pin))
                out[f"{what}_{pin_name}"] = {"native_us": round(native, 2), "seccomp_us": round(grafted, 2),
                                             "cost_us": round(grafted - native, 2)}
        return out

    def connection_rate(self, seconds: float) -> dict:
        srv = subprocess.Popen(python("-c", SERVER), stdout=subprocess.PIPE, text=True)
        try:
            port = srv.stdout.readline().strip()
            native = float(self.native(python("-c", CLIENT, port, str(seconds))))
            grafted = float(self.grafted(python("-c", CLIENT, port, str(seconds)), **self.EGRESS))
        finally:
            srv.kill()
            srv.wait()
        return {"native_per_s": round(native), "seccomp_per_s": round(grafted), "ratio": round(grafted / native, 3)}

    def iperf3(self, seconds: int) -> dict:
        def gbps(text: str) -> float:
            return round(json.loads(text)["end"]["sum_received"]["bits_per_second"] / 1e9, 2)

        out = {}
        hport = free_port()
        srv = subprocess.Popen(["iperf3", "-s", "--forceflush", "-B", "127.0.0.1", "-p", str(hport)],
                               stdout=subprocess.PIPE, text=True)
        try:
            _wait_listening(srv)
            client = ["iperf3", "-c", "127.0.0.1", "-p", str(hport), "-t", str(seconds), "-J"]
            out["client_native_gbps"] = gbps(self.native(client))
            out["client_seccomp_gbps"] = gbps(self.grafted(client, **self.EGRESS))
        finally:
            srv.kill()
            srv.wait()
        gport = free_port()
        srv = self.grafted(["iperf3", "-s", "--forceflush", "-B", "0.0.0.0", "-p", "5201"], background=True,
                           endpoints=[f"perf type ipv4 addr 127.0.0.1 port {gport}"], ingress=["0.0.0.0:5201=perf"])
        try:
            _wait_listening(srv)
            out["server_seccomp_gbps"] = gbps(self.native(["iperf3", "-c", "127.0.0.1", "-p", str(gport),
                                                             "-t", str(seconds), "-J"]))
        finally:
            srv.terminate()
            srv.wait(10)
        return out


def _wait_listening(server: subprocess.Popen) -> None:
    """Until an `iperf3 -s --forceflush` says it listens (a probe connection would count as a test)."""
    for line in server.stdout:
        if "Server listening" in line:
            return
    raise RuntimeError(f"the iperf3 server exited ({server.wait()}) before listening")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m sockgraft.bench.seccompcost", description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--calls", type=int, default=20000, help="trapped calls per cost loop")
    ap.add_argument("-t", "--seconds", type=int, default=3, help="seconds per rate/iperf3 run")
    ap.add_argument("-j", "--json", action="store_true")
    args = ap.parse_args(argv)
    from sockgraft.host import netns

    if os.geteuid() != 0:
        print("seccompcost: needs root (it creates a network namespace)", file=sys.stderr)
        return 1
    name = f"{tag()}-cost"
    state = tempfile.mkdtemp(prefix=f"{tag()}-cost-")
    netns.create(name)
    try:
        b = Bench(name, state)
        result = {"notification": b.notification_cost(args.calls), "short_connections": b.connection_rate(args.seconds),
                  "iperf3": b.iperf3(args.seconds)}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError, ValueError) as e:
        detail = getattr(e, "stderr", None) or ""
        print(f"seccompcost: {e}" + (f": {detail.strip().splitlines()[-1]}" if detail.strip() else ""), file=sys.stderr)
        return 1
    finally:
        netns.remove(name)
        shutil.rmtree(state, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("per-call cost (µs)            native  seccomp  supervisor cost")
    for k, v in result["notification"].items():
        print(f"  {k:<26} {v['native_us']:>7} {v['seccomp_us']:>8} {v['cost_us']:>8}")
    c = result["short_connections"]
    print(f"short connections/s (connect+request+close): native {c['native_per_s']}  seccomp {c['seccomp_per_s']}"
          f"  ratio {c['ratio']}")
    i = result["iperf3"]
    print(f"iperf3 Gbit/s: client native {i['client_native_gbps']}  client seccomp {i['client_seccomp_gbps']}"
          f"  server seccomp {i['server_seccomp_gbps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
