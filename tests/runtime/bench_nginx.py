"""HTTP throughput of the same nginx container: `docker run --runtime graft` (grafted endpoint on
host loopback) vs Docker's default bridge with `-p 127.0.0.1:P:8080`, side by side (wrk, loopback).

    python3 -m tests.runtime.bench_nginx [--seconds 5] [--rounds 3] [--connections 16]

Not a test: a measurement for the report. It starts its own graftd and dockerd (everything under a
temp dir, docker0 on 10.201.0.1/24 without iptables or sysctl changes) and removes them at the end.
The nginx image is the host's nginx binary with the libraries ldd lists, in a busybox rootfs.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile

from tests.helpers import free_port
from tests.runtime.common import Graftd, build_rootfs, http_get
from tests.runtime.engines import Dockerd

BIP = "10.201.0.1/24"
NGINX_CONF = """daemon off;
master_process on;
worker_processes 1;
user root;
error_log stderr warn;
pid /tmp/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    server { listen 8080; root /www; }
}
"""


def nginx_rootfs(path: str) -> str:
    build_rootfs(path)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    os.makedirs(os.path.join(path, "usr/sbin"), exist_ok=True)
    shutil.copy2(nginx, os.path.join(path, "usr/sbin/nginx"))
    out = subprocess.run(["ldd", nginx], capture_output=True, text=True, check=True).stdout
    for lib in re.findall(r"(/\S+\.so[.\d]*)", out):
        dest = os.path.join(path, lib.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.realpath(lib), dest)
    for d in ("etc/nginx", "var/lib/nginx/body", "var/lib/nginx/proxy", "var/lib/nginx/fastcgi",
              "var/lib/nginx/uwsgi", "var/lib/nginx/scgi", "var/log/nginx", "run"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    with open(os.path.join(path, "etc/nginx/nginx.conf"), "w") as f:
        f.write(NGINX_CONF)
    with open(os.path.join(path, "etc/group"), "w") as f:
        f.write("root:x:0:\n")
    with open(os.path.join(path, "www/index.html"), "w") as f:
        f.write("<html><body>" + "sockgraft " * 60 + "</body></html>\n")  # ~620 bytes, like nginx's page
    return path


def wrk(url: str, seconds: int, connections: int) -> float:
    host = url.split("/")[2].rsplit(":", 1)[0]
    assert host.startswith("127.") or host.startswith("10.201.0."), url
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", url],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert m and "Non-2xx" not in out and "Socket errors" not in out, out
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    a = ap.parse_args()
    base = tempfile.mkdtemp(prefix="sgt-bench-")
    graftd = docker = None
    try:
        rootfs = nginx_rootfs(os.path.join(base, "rootfs"))
        graftd = Graftd(os.path.join(base, "graftd"))
        os.makedirs(os.path.join(base, "docker"))
        docker = Dockerd(os.path.join(base, "docker"), graftd, rootfs, bip=BIP)
        img, cmd = "busybox:local", ["nginx", "-c", "/etc/nginx/nginx.conf"]
        gport, bport = free_port(), free_port()
        table = [f"SOCKGRAFT_ENDPOINTS=http type ipv4 addr 127.0.0.1 port {gport}",
                 "SOCKGRAFT_INGRESS=0.0.0.0:8080=http [::]:8080=http"]
        docker("run", "-d", "--name", "nginx-graft", "--runtime", "graft", "--network", "none",
               *[x for e in table for x in ("-e", e)], img, *cmd)
        docker("run", "-d", "--name", "nginx-bridge", "-p", f"127.0.0.1:{bport}:8080", img, *cmd)
        ip = docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", "nginx-bridge").stdout.strip()
        route = subprocess.run(["ip", "route", "get", ip], capture_output=True, text=True).stdout
        direct = ip.startswith("10.201.0.") and " dev docker0 " in route
        urls = {"graft (--runtime graft, host 127.0.0.1)": f"http://127.0.0.1:{gport}/",
                "docker bridge -p (docker-proxy, 127.0.0.1)": f"http://127.0.0.1:{bport}/"}
        if direct:
            urls["docker bridge, container IP (no proxy)"] = f"http://{ip}:8080/"
        for url in urls.values():
            if url.startswith("http://127."):
                http_get(int(url.rsplit(":", 1)[1].strip("/")))
        results: dict[str, list[float]] = {k: [] for k in urls}
        for _ in range(a.rounds):  # interleaved, so drift hits every configuration alike
            for name, url in urls.items():
                results[name].append(wrk(url, a.seconds, a.connections))
        print(f"wrk -t1 -c{a.connections} -d{a.seconds}s, {a.rounds} interleaved rounds, nginx 1 worker, 2 vCPU")
        print(f"{'configuration':45s} {'median req/s':>12s}  runs")
        ref = statistics.median(results[next(iter(urls))])
        for name, runs in results.items():
            med = statistics.median(runs)
            print(f"{name:45s} {med:12.0f}  {' '.join(f'{r:.0f}' for r in runs)}  ({med / ref:.2f}x graft)")
    finally:
        if docker:
            docker.close()
        if graftd:
            graftd.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
