"""Unmodified programs under `graft run --mode seccomp` in a fresh netns with only `lo`."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest

from tests.helpers import free_port, stop, wait_port
from tests.modes.seccomp.util import client_egress, refused, run, start, wait_for

BUSYBOX = shutil.which("busybox")


def http_get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return r.read().decode(errors="replace")


def audit_lines(state_dir: str) -> list[dict]:
    with open(os.path.join(state_dir, "audit.log")) as f:
        return [json.loads(line) for line in f]


def test_python_http_server_grafted(state_dir, ns, procs, tmp_path):
    (tmp_path / "hello.txt").write_text("hello seccomp\n")
    port = free_port()
    p = start(procs, ns, [sys.executable, "-u", "-m", "http.server", "-d", str(tmp_path), "8000"],
              endpoints=[f"web type ipv4 addr 127.0.0.1 port {port}"], ingress=["0.0.0.0:8000=web"])
    wait_port("127.0.0.1", port)
    assert "hello.txt" in http_get(port)
    stop(p)
    out = p.stdout.read()
    # getsockname shows the app the address it bound, not the host endpoint
    assert "Serving HTTP on 0.0.0.0 port 8000" in out, out
    grants = [a for a in audit_lines(state_dir) if a["event"] == "grant" and a["op"] == "bind"]
    assert grants and grants[0]["mode"] == "seccomp" and grants[0]["endpoint"] == "web"


def test_curl_client_through_egress(state_dir, ns, procs):
    port = free_port()
    srv = subprocess.Popen(["timeout", "300", sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(srv)
    wait_port("127.0.0.1", port)
    r = run(ns, ["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code} %{local_ip}", f"http://127.0.0.1:{port}/"],
            **client_egress())
    assert r.stdout.split() == ["200", "127.0.0.1"]
    # without an egress rule the host service is out of reach (curl: couldn't connect)
    r = run(ns, ["curl", "-sS", "-m", "5", f"http://127.0.0.1:{port}/"], check=False)
    assert r.returncode == 7, r.stderr


@pytest.mark.skipif(BUSYBOX is None, reason="busybox-static not installed")
def test_busybox_httpd_nc_wget(state_dir, make_netns, procs, tmp_path):
    srv_ns, cli_ns = make_netns(), make_netns()
    (tmp_path / "index.html").write_text("busybox grafted\n")
    port = free_port()
    start(procs, srv_ns, [BUSYBOX, "httpd", "-f", "-p", "8080", "-h", str(tmp_path)],
          endpoints=[f"web type ipv4 addr 127.0.0.1 port {port}"], ingress=["[::]:8080=web"])  # busybox binds [::]
    wait_port("127.0.0.1", port)
    assert http_get(port) == "busybox grafted\n"
    # static busybox clients in a second container
    r = subprocess.run([*__import__("tests.helpers", fromlist=["graft_cmd"]).graft_cmd(), "run", "-n", cli_ns,
                        "--mode", "seccomp", "--endpoint", "out type ipv4 addr 127.0.0.1 port dynamic",
                        "--egress", "127.0.0.0/8=out", "--", BUSYBOX, "nc", "127.0.0.1", str(port)],
                       input="GET /index.html HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "busybox grafted" in r.stdout, r
    r = run(cli_ns, [BUSYBOX, "wget", "-q", "-O", "-", f"http://127.0.0.1:{port}/"], **client_egress())
    assert r.stdout == "busybox grafted\n"


def test_go_server_and_client(state_dir, make_netns, procs, gonet):
    srv_ns, cli_ns = make_netns(), make_netns()
    port = free_port()
    p = start(procs, srv_ns, [gonet, "serve", ":8000"], endpoints=[f"web type ipv4 addr 127.0.0.1 port {port}"],
              ingress=["0.0.0.0:8000=web", "[::]:8000=web"])
    wait_port("127.0.0.1", port)
    r = run(cli_ns, [gonet, "dial", f"127.0.0.1:{port}", "200"], **client_egress())
    # 200 connections; the Go server saw its own port (getsockname after accept), not the host's
    assert r.stdout.strip() == "ok 200 go 127.0.0.1:8000", r.stdout
    stop(p)
    assert "listening [::]:8000" in p.stdout.read()


def test_go_udp_echo_and_connected_client(state_dir, make_netns, procs, gonet):
    srv_ns, cli_ns = make_netns(), make_netns()
    port = free_port(sotype=socket.SOCK_DGRAM)
    # a grafted UDP server answers only destinations an egress rule names: its clients' loopback
    p = start(procs, srv_ns, [gonet, "udpecho", ":9000"], endpoints=[f"u type ipv4 addr 127.0.0.1 port {port}"],
              ingress=["0.0.0.0:9000=u", "[::]:9000=u"], egress=["127.0.0.0/8=u"])
    wait_for(lambda: p.stdout.readline().startswith("listening"), what="udp server")
    r = run(cli_ns, [gonet, "udpdial", f"127.0.0.1:{port}"], **client_egress())  # connected UDP
    assert r.stdout.strip() == "echo ping-go"
    # unconnected sendto (trapped on its destination) from Python
    code = ("import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(5)\n"
            f"for i in range(3): s.sendto(b'dg%d'%i,('127.0.0.1',{port})); print(s.recvfrom(64)[0].decode())\n")
    r = run(cli_ns, [sys.executable, "-c", code], **client_egress())
    assert r.stdout.split() == ["dg0", "dg1", "dg2"]


def test_nginx(state_dir, ns, procs, tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (scripts/setup installs nginx-light)")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("nginx grafted\n")
    t = str(tmp_path)
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off; user root root; worker_processes 2; pid {t}/nginx.pid; error_log stderr warn;
events {{ worker_connections 64; }}
http {{
  access_log off; client_body_temp_path {t}/cb; proxy_temp_path {t}/px; fastcgi_temp_path {t}/fc;
  uwsgi_temp_path {t}/uw; scgi_temp_path {t}/sc;
  server {{ listen 8080 reuseport; listen [::]:8080 ipv6only=on; root {t}/www; }}
}}
""")
    port, port6 = free_port(), free_port("::1")
    start(procs, ns, [nginx, "-c", str(conf), "-p", t],
          endpoints=[f"web type ipv4 addr 127.0.0.1 port {port}", f"web6 type ipv6 addr ::1 port {port6}"],
          ingress=["0.0.0.0:8080=web", "[::]:8080=web6"])
    wait_port("127.0.0.1", port)
    wait_port("::1", port6)
    for _ in range(20):  # several requests: both workers serve the grafted listener
        assert http_get(port) == "nginx grafted\n"
    with urllib.request.urlopen(f"http://[::1]:{port6}/", timeout=5) as r:
        assert r.read() == b"nginx grafted\n"


def _iperf_ready(p: subprocess.Popen) -> None:
    # not wait_port: a probe connection would occupy the iperf3 server ("server is busy")
    wait_for(lambda: "Server listening" in p.stdout.readline(), what="iperf3 server")


def _iperf_bytes(out: str) -> int:
    result = json.loads(out)
    assert "error" not in result, result["error"]
    return result["end"]["sum_received"]["bytes"]


def test_iperf3_both_directions(state_dir, make_netns, procs):
    srv_ns, cli_ns = make_netns(), make_netns()
    port = free_port()
    # server in a container, client on the host, both directions
    srv = start(procs, srv_ns, ["iperf3", "-s", "--forceflush", "-B", "0.0.0.0", "-p", "5201"],
                endpoints=[f"perf type ipv4 addr 127.0.0.1 port {port}"], ingress=["0.0.0.0:5201=perf"])
    for extra in ([], ["-R"]):
        _iperf_ready(srv)  # iperf3 closes its listener after each test and opens it again
        r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "1", "-J", *extra],
                           capture_output=True, text=True, timeout=30)
        assert _iperf_bytes(r.stdout) > 0
    # client in a container, server on the host, both directions
    hport = free_port()
    host_srv = subprocess.Popen(["timeout", "300", "iperf3", "-s", "--forceflush", "-B", "127.0.0.1", "-p", str(hport)], stdout=subprocess.PIPE, text=True)
    procs.append(host_srv)
    for extra in ([], ["-R"]):
        _iperf_ready(host_srv)
        r = run(cli_ns, ["iperf3", "-c", "127.0.0.1", "-p", str(hport), "-t", "1", "-J", *extra], **client_egress())
        assert _iperf_bytes(r.stdout) > 0


def test_unmatched_bind_stays_in_container(state_dir, ns, procs):
    """A bind no pair matches stays local: it works over the container's own loopback and never
    appears on the host."""
    port = free_port()
    code = ("import socket\n"
            "l=socket.socket();l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"l.bind(('127.0.0.1',{port}));l.listen()\n"
            "print('ready',flush=True)\n"
            f"c=socket.create_connection(('127.0.0.1',{port}),timeout=5);a,_=l.accept()\n"
            "c.sendall(b'local');print(a.recv(10).decode(),l.getsockname(),flush=True)\n"
            "import sys;sys.stdin.readline()\n")
    p = subprocess.Popen([*__import__("tests.helpers", fromlist=["graft_cmd"]).graft_cmd(), "run", "-n", ns,
                          "--mode", "seccomp", "--endpoint", "web type ipv4 addr 127.0.0.1 port dynamic",
                          "--ingress", "0.0.0.0:1-1000=web", "--", sys.executable, "-c", code],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout.readline().strip() == "ready"
    line = p.stdout.readline()
    assert line.startswith("local ('127.0.0.1', %d)" % port), line
    assert refused(port)  # the host does not have it
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(10) == 0
    locals_ = [a for a in audit_lines(state_dir) if a["op"] == "bind" and a["event"] == "local"]
    assert locals_ and locals_[0]["port"] == port


CONNECT_SEMANTICS = r"""
import errno, fcntl, os, select, socket, struct, sys, time
port, full_port = int(sys.argv[1]), int(sys.argv[2])
# 1. blocking connect: the app's socket stays blocking, the connection works
s = socket.socket(); s.connect(("127.0.0.1", port))
print("blocking", bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK), s.recv(10).decode())
# 2. non-blocking connect: EINPROGRESS, then it completes natively
s = socket.socket(); s.setblocking(False)
print("nonblocking", errno.errorcode.get(s.connect_ex(("127.0.0.1", port))), end=" ")
select.select([], [s], [], 5)
print(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK))
# 3. blocking connect with SO_SNDTIMEO to a host whose accept queue is full: EINPROGRESS on time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("qq", 0, 500000))
t = time.monotonic()
try:
    s.connect(("127.0.0.1", full_port)); print("sndtimeo connected")
except OSError as e:
    print("sndtimeo", errno.errorcode[e.errno], round(time.monotonic() - t, 1))
"""


def test_connect_semantics(state_dir, ns):
    with socket.socket() as srv, socket.socket() as full:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fillers = [socket.socket() for _ in range(3)]
        for f in fillers:
            f.setblocking(False)
            f.connect_ex(full.getsockname())
        port, full_port = srv.getsockname()[1], full.getsockname()[1]

        def answer():
            for _ in range(2):
                c, _ = srv.accept()
                c.sendall(b"hi")
                c.close()

        import threading

        threading.Thread(target=answer, daemon=True).start()
        args = [sys.executable, "-c", CONNECT_SEMANTICS, str(port), str(full_port)]
        r = run(ns, args, **client_egress())
        lines = r.stdout.splitlines()
        assert lines[:2] == ["blocking False hi", "nonblocking EINPROGRESS 0 True"], lines
        assert lines[2].split()[:2] == ["sndtimeo", "EINPROGRESS"] and 0.4 <= float(lines[2].split()[2]) <= 1.6
        for f in fillers:
            f.close()
