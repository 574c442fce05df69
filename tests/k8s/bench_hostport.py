"""The number a cluster operator asks first: the same pod served on its hostPort through graft
(runtime handler `graft` + the graft CNI plugin: the listener is grafted onto the node's port) vs
through the standard `portmap` plugin (runtime handler runc, bridge + DNAT + masquerade), on the
same private containerd with the same image (Debian's nginx, one worker, 64-byte answers), wrk on
the node's 127.0.0.1:hostPort, keep-alive and `Connection: close`, the topologies taking turns
round after round. The pod IP straight over the bridge (no NAT) is given as a reference.

    python3 -m tests.k8s.bench_hostport [--rounds 3] [--seconds 5] [--connections 16]

Prints a Markdown table (median and min-max req/s per topology and mode) and, with --json FILE,
the raw runs. Everything it starts is removed afterwards (the test node's cleanup)."""
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
import time
import urllib.request

from tests.helpers import free_port
from tests.k8s import images
from tests.k8s.cri import M
from tests.k8s.node import Node
from tests.runtime.common import Graftd

MODES = {"keep-alive": [], "close": ["-H", "Connection: close"]}


def wrk(url: str, seconds: int, connections: int, extra: list[str]) -> float:
    p = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", *extra, url],
                       capture_output=True, text=True, timeout=seconds + 60)
    if p.returncode != 0:
        raise RuntimeError(f"wrk {url}: {p.stderr.strip()}")
    m = re.search(r"Requests/sec:\s+([\d.]+)", p.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", p.stdout)
    if not m:
        raise RuntimeError(f"wrk printed no rate: {p.stdout}")
    if errors:
        raise RuntimeError(f"wrk saw errors on {url}: {errors.group(0)}")
    return float(m.group(1))


def accepted(url_base: str) -> int:
    """nginx's own count of accepted connections (stub_status)."""
    with urllib.request.urlopen(url_base + "/status", timeout=5) as r:
        return int(r.read().decode().splitlines()[2].split()[0])


def pod(node: Node, name: str, handler: str, host_port: int) -> tuple[str, str]:
    cfg = M["PodSandboxConfig"](
        metadata=M["PodSandboxMetadata"](name=name, namespace="bench", uid=f"uid-{name}-{os.getpid()}"),
        hostname=name, port_mappings=[M["PortMapping"](container_port=8080, host_port=host_port)],
        log_directory=os.path.join(node.base, "logs", name))
    sid = node.cri.RunPodSandbox(config=cfg, runtime_handler=handler).pod_sandbox_id
    node.remember(sandbox=sid)
    cc = M["ContainerConfig"](metadata=M["ContainerMetadata"](name="nginx"), image=M["ImageSpec"](image=images.NGINX_IMAGE),
                              log_path="nginx.log")
    cid = node.cri.CreateContainer(pod_sandbox_id=sid, config=cc, sandbox_config=cfg).container_id
    node.remember(container=cid)
    node.cri.StartContainer(container_id=cid)
    ip = node.cri.PodSandboxStatus(pod_sandbox_id=sid).status.network.ip
    return sid, ip


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if not shutil.which("wrk"):
        sys.exit("bench_hostport: wrk is not installed")
    base = tempfile.mkdtemp(prefix="sgk-bench-")
    g = Graftd(os.path.join(base, "graftd"))
    node = None
    try:
        node = Node(g)
        node.ctr("images", "import", images.nginx_archive(node.base))
        hp_graft, hp_std = free_port(), free_port()
        pod(node, "nginx-graft", "graft", hp_graft)
        _sid, ip = pod(node, "nginx-portmap", "runc", hp_std)
        topologies = {"graft (hostPort)": f"http://127.0.0.1:{hp_graft}",
                      "portmap (hostPort, DNAT)": f"http://127.0.0.1:{hp_std}",
                      "pod IP over the bridge (reference)": f"http://{ip}:8080"}
        for url in topologies.values():
            wait_http(url + "/")
        # one warm-up each, then the rounds: every topology and mode in turn
        for url in topologies.values():
            wrk(url + "/", 1, args.connections, [])
        runs: list[dict] = []
        for r in range(args.rounds):
            for topo, url in topologies.items():
                for mode, extra in MODES.items():
                    before = accepted(url)
                    rate = wrk(url + "/", args.seconds, args.connections, extra)
                    conns = accepted(url) - before - 1  # the /status request itself
                    if mode == "close" and conns < rate * args.seconds * 0.5:
                        raise RuntimeError(f"{topo}: Connection: close kept connections alive ({conns} accepted)")
                    runs.append({"round": r, "topology": topo, "mode": mode, "rps": rate, "accepted": conns})
                    print(f"round {r + 1} {topo:36} {mode:10} {rate:10.0f} req/s ({conns} connections)", file=sys.stderr)
        print(f"\nwrk -t1 -c{args.connections} -d{args.seconds}s, nginx 1 worker, 64 B; median (min-max) of "
              f"{args.rounds} interleaved rounds, req/s\n")
        print("| path | keep-alive | `Connection: close` |")
        print("|---|---|---|")
        for topo in topologies:
            cells = []
            for mode in MODES:
                v = [x["rps"] for x in runs if x["topology"] == topo and x["mode"] == mode]
                cells.append(f"{statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f})")
            print(f"| {topo} | {' | '.join(cells)} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(runs, f, indent=1)
    finally:
        if node is not None:
            node.close()
        g.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
