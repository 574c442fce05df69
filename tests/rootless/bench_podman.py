"""Rootless Podman side by side: grafted (graft-runtime, --network none, the user's graftd) vs rootless
Podman's own default network (slirp4netns, `allow_host_loopback` to reach the host's 127.0.0.1 as
10.0.2.2) vs the host itself (native), container -> host: iperf3 (1 TCP stream) and wrk against
nginx (1 KiB, c=1, keep-alive and `Connection: close`). Rounds interleave the topologies; the
figure is the median (min-max). Run as root (it makes and removes a user like the tests):

    python3 -m tests.rootless.bench_podman [--rounds 3] [--seconds 5]

Not a pytest test (minutes); docs/ROOTLESS.md has its numbers."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

from tests.helpers import free_port, wait_port
from sockgraft.bench.users import User, create_user, remove_user
from tests.rootless.conftest import PREFIX, sweep_users
from tests.rootless.podman import HOST_USR, IMAGE, LIMITS, RootlessPodman

NGINX_CONF = """worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port} reuseport; root {d}/www; }} }}
"""


def make_user() -> User:
    sweep_users()
    return create_user(f"{PREFIX}{os.getpid()}", subids=True)


def run_in(podman: RootlessPodman, topo: str, argv: list[str], timeout: float) -> str:
    if topo == "native":
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, p.stderr
        return p.stdout
    if topo == "graft":
        net = podman.graft_args("ep-out type ipv4 addr 127.0.0.1 port dynamic", egress="127.0.0.1/32=ep-out")
    else:
        net = ["--network", "slirp4netns:allow_host_loopback=true"]
    return podman("run", "--rm", *LIMITS, *HOST_USR, *net, IMAGE, *argv, timeout=timeout).stdout


def host_addr(topo: str) -> str:
    return "10.0.2.2" if topo == "slirp4netns" else "127.0.0.1"


def iperf3(podman, topo: str, port: int, seconds: int) -> float:
    out = run_in(podman, topo, ["iperf3", "-c", host_addr(topo), "-p", str(port), "-t", str(seconds), "-J"], seconds + 60)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def wrk(podman, topo: str, port: int, seconds: int, close: bool) -> float:
    argv = ["wrk", "-t1", "-c1", f"-d{seconds}s", f"http://{host_addr(topo)}:{port}/1k"]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = run_in(podman, topo, argv, seconds + 60)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert m, out
    return float(m[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    user = make_user()
    d = tempfile.mkdtemp(prefix="sgr-bench-")
    os.chmod(d, 0o755)
    procs: list[subprocess.Popen] = []
    podman = None
    # slirp4netns opens /dev/net/tun (Debian's udev makes it 0666; this VM has 0600): opened for the
    # run, put back after. graft needs no device.
    tun_mode = os.stat("/dev/net/tun").st_mode & 0o777
    os.chmod("/dev/net/tun", 0o666)
    try:
        os.makedirs(os.path.join(d, "www"))
        with open(os.path.join(d, "www", "1k"), "w") as f:
            f.write("x" * 1024)
        nport, iport = free_port(), free_port()
        with open(os.path.join(d, "nginx.conf"), "w") as f:
            f.write(NGINX_CONF.format(d=d, port=nport))
        procs.append(subprocess.Popen(["nginx", "-c", os.path.join(d, "nginx.conf"), "-g", "daemon off;"]))
        procs.append(subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iport)], stdout=subprocess.DEVNULL))
        wait_port("127.0.0.1", nport)
        wait_port("127.0.0.1", iport)
        podman = RootlessPodman(user)
        podman.start_graftd()
        cells = {"iperf3 Gbit/s": lambda t: iperf3(podman, t, iport, args.seconds),
                 "wrk keep-alive req/s": lambda t: wrk(podman, t, nport, args.seconds, False),
                 "wrk Connection: close req/s": lambda t: wrk(podman, t, nport, args.seconds, True)}
        topos = ["native", "slirp4netns", "graft"]
        results: dict[tuple[str, str], list[float]] = {}
        for rnd in range(args.rounds + 1):  # round 0 warms up and is dropped
            for cell, fn in cells.items():
                for topo in (topos if rnd % 2 else topos[::-1]):
                    v = fn(topo)
                    if rnd:
                        results.setdefault((cell, topo), []).append(v)
                    print(f"round {rnd} {cell} {topo}: {v:.2f}", file=sys.stderr, flush=True)
        print(f"| container -> host ({args.rounds} rounds, median, min-max) | native | slirp4netns | graft | graft/slirp4netns | graft/native |")
        print("|---|---|---|---|---|---|")
        for cell in cells:
            med = {t: statistics.median(results[(cell, t)]) for t in topos}
            fmt = lambda t: f"{med[t]:,.1f} ({min(results[(cell, t)]):,.1f}-{max(results[(cell, t)]):,.1f})"  # noqa: E731
            print(f"| {cell} | {fmt('native')} | {fmt('slirp4netns')} | {fmt('graft')} | "
                  f"{med['graft'] / med['slirp4netns']:.2f}x | {med['graft'] / med['native']:.2f}x |")
    finally:
        if podman is not None:
            podman.close()
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(d, ignore_errors=True)
        remove_user(user.name)
        os.chmod("/dev/net/tun", tun_mode)


if __name__ == "__main__":
    main()
