"""Unmodified Debian programs in a fresh netns (only lo) under `graft run --mode preload`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from tests.helpers import free_port, graft, stop, wait_for, wait_port
from tests.modes.preload.conftest import ep

PY = sys.executable


def fetch(port: int, path: str = "/") -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read()


def finish(p: subprocess.Popen, timeout: float = 30) -> tuple[str, str]:
    out, err = p.communicate(timeout=timeout)
    return out, err


@pytest.mark.parametrize("host, bind, pair", [("127.0.0.1", "0.0.0.0", "0.0.0.0:8000"), ("::1", "::", "[::]:8000")])
def test_http_server_through_ingress(run_preload, tmp_path, host, bind, pair):
    port = free_port(host)
    (tmp_path / "hello.txt").write_text("grafted hello\n")
    p = run_preload([*ep("ep-http", port, host), "--ingress", f"{pair}=ep-http"],
                    [PY, "-m", "http.server", "-b", bind, "-d", str(tmp_path), "8000"])
    wait_port(host, port)
    url_host = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{url_host}:{port}/hello.txt", timeout=5) as r:
        assert r.read() == b"grafted hello\n"
    stop(p)
    out, _ = finish(p)
    # getsockname reports what the application bound, not the host endpoint
    assert f"Serving HTTP on {bind} port 8000" in out


@pytest.mark.parametrize("pair", ["[::]:8000=ep-http", ":::8000=ep-http", "[::]:7990-8010=ep-http"])
def test_http_server_through_conv_pairs_env(run_preload, tmp_path, pair):
    """GRAFT_CONV_PAIRS set by hand (no --ingress: nothing stored); http.server binds [::]
    dual-stack, grafted onto an IPv4 endpoint through its v4-mapped address."""
    port = free_port()
    (tmp_path / "x").write_text("v6 pair\n")
    p = run_preload(ep("ep-http", port), [PY, "-m", "http.server", "-b", "::", "-d", str(tmp_path), "8000"],
                    env={"GRAFT_CONV_PAIRS": pair})
    wait_port("127.0.0.1", port)
    assert fetch(port, "/x") == b"v6 pair\n"


@pytest.fixture
def host_http(procs, tmp_path):
    port = free_port()
    (tmp_path / "host.txt").write_text("from the host\n")
    procs.append(subprocess.Popen([PY, "-m", "http.server", "-b", "127.0.0.1", "-d", str(tmp_path), str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_port("127.0.0.1", port)
    return port


CURL = ["curl", "-sS", "-m", "5", "-w", "\n%{http_code}"]


@pytest.mark.parametrize("how", ["egress", "bbconn"])
def test_curl_reaches_host_through_egress(run_preload, host_http, how):
    args, env = ep("ep-out", None), {}
    if how == "egress":
        args += ["--egress", "127.0.0.1/32=ep-out"]
    else:  # the kernel lets a grafted socket reach only what the stored rules name: the env rule stays within
        args, env["GRAFT_BBCONN"] = [*args, "--egress", "127.0.0.1/32=ep-out"], "ep-out"
    p = run_preload(args, [*CURL, f"http://127.0.0.1:{host_http}/host.txt"], env=env)
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out.split("\n") == ["from the host", "", "200"]


def test_curl_without_a_rule_stays_inside(run_preload, host_http):
    """No egress rule: 127.0.0.1 is the container's own loopback, where nothing listens."""
    p = run_preload([*ep("ep-out", None), "--egress", "10.0.0.0/8=ep-out"],
                    [*CURL, f"http://127.0.0.1:{host_http}/host.txt"])
    out, err = finish(p)
    assert p.returncode == 7 and "Failed to connect" in err, (out, err)


def iperf3_json(*args: str) -> dict:
    p = subprocess.run(["iperf3", "-J", *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    return json.loads(p.stdout)


def wait_line(p: subprocess.Popen, text: str) -> None:
    """iperf3 counts a mere connect as a (failed) test: wait for its word instead of probing."""
    for line in p.stdout:
        if text in line:
            return
    raise AssertionError(f"no {text!r}: {p.stderr.read()}")


def test_iperf3_server_inside_client_on_host_both_directions(run_preload):
    port = free_port()
    p = run_preload([*ep("ep-iperf", port), "--ingress", "[::]:5201=ep-iperf", "--ingress", "0.0.0.0:5201=ep-iperf"],
                    ["iperf3", "-s", "--forceflush", "-p", "5201"])
    for extra in ([], ["-R"]):
        wait_line(p, "Server listening")  # iperf3 listens anew after each test: wait for it each time
        result = iperf3_json("-c", "127.0.0.1", "-p", str(port), "-t", "1", *extra)
        assert result["end"]["sum_received"]["bytes"] > 1_000_000


def test_iperf3_client_inside_server_on_host(run_preload, procs):
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "--forceflush", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(server)
    wait_line(server, "Server listening")
    p = run_preload([*ep("ep-out", None), "--egress", "127.0.0.1/32=ep-out"],
                    ["iperf3", "-J", "-c", "127.0.0.1", "-p", str(port), "-t", "1"])
    out, err = finish(p)
    assert p.returncode == 0, out[-2000:] + err
    assert json.loads(out)["end"]["sum_received"]["bytes"] > 1_000_000


NGINX_CONF = """\
daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/t; proxy_temp_path {d}/t; fastcgi_temp_path {d}/t; uwsgi_temp_path {d}/t; scgi_temp_path {d}/t;
  server {{ listen 8080; root {d}/www; }}
}}
"""


def test_nginx_serves_wrk_on_the_host(run_preload, tmp_path):
    port = free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "f.bin").write_bytes(os.urandom(10000))
    (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(d=tmp_path))
    run_preload([*ep("ep-web", port), "--ingress", "0.0.0.0:8080=ep-web"],
                ["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")])
    wait_port("127.0.0.1", port)
    assert fetch(port, "/f.bin") == (tmp_path / "www" / "f.bin").read_bytes()
    w = subprocess.run(["wrk", "-t1", "-c4", "-d1", f"http://127.0.0.1:{port}/f.bin"],
                       capture_output=True, text=True, timeout=30)
    assert w.returncode == 0, w.stderr
    requests = int(w.stdout.split(" requests in ")[0].split()[-1])
    assert requests > 100 and "Non-2xx" not in w.stdout and "Socket errors" not in w.stdout, w.stdout


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_sockperf_server_inside_client_on_host(run_preload, proto):
    port = free_port("127.0.0.1", 2 if proto == "udp" else 1)
    tcp = ["--tcp"] if proto == "tcp" else []
    run_preload([*ep("ep-sp", port), "--ingress", "0.0.0.0:11111=ep-sp"],
                ["sockperf", "server", "-i", "0.0.0.0", "-p", "11111", *tcp])
    if proto == "tcp":
        wait_port("127.0.0.1", port)
    for _ in range(50):  # the UDP server is up when it answers
        p = subprocess.run(["sockperf", "ping-pong", "-i", "127.0.0.1", "-p", str(port), "-t", "1", *tcp],
                           capture_output=True, text=True, timeout=30)
        if "Summary: Latency is" in p.stdout:
            break
    assert "Summary: Latency is" in p.stdout, p.stdout[-2000:] + p.stderr


LOCAL_PROG = textwrap.dedent("""
    import socket, sys
    port = int(sys.argv[1])
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))   # matches no pair: stays on the container's loopback
    srv.listen()
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    a, _ = srv.accept()
    c.sendall(b"ping")
    print(a.recv(4).decode(), srv.getsockname(), flush=True)
    sys.stdin.read()                # hold the sockets until the test is done looking
""")


def test_unmatched_bind_stays_local(run_preload):
    port, graft_port = free_port(), free_port()
    p = run_preload([*ep("ep-http", graft_port), "--ingress", "0.0.0.0:8000=ep-http"],
                    [PY, "-c", LOCAL_PROG, str(port)], stdin=subprocess.PIPE)
    line = p.stdout.readline()
    assert line.strip() == f"ping ('127.0.0.1', {port})", line + p.stderr.read() if p.poll() is not None else line
    with pytest.raises(ConnectionRefusedError):  # nothing of it on the host
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=2)
    p.stdin.close()
    assert p.wait(10) == 0


NAME_PROG = textwrap.dedent("""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 5353))
    print(*s.getsockname())
""")


@pytest.mark.parametrize("transparent", [False, True])
def test_getsockname_application_view_or_host_view(run_preload, transparent):
    port = free_port("127.0.0.1", 2)
    env = {"GRAFT_NAME_TRANSPARENT": "1"} if transparent else {}
    p = run_preload([*ep("ep-dns", port), "--ingress", "0.0.0.0:5353=ep-dns"], [PY, "-c", NAME_PROG], env=env)
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out.split() == (["127.0.0.1", str(port)] if transparent else ["0.0.0.0", "5353"])


BAD_ENV_PROG = textwrap.dedent("""
    import errno, socket
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", 8000))
        print("bind: ok")
    except OSError as e:
        print("bind:", errno.errorcode[e.errno])
    t = socket.socket()
    t.bind(("127.0.0.1", 0))        # the program goes on working
    print("alive")
""")


@pytest.mark.parametrize("pairs, result, message", [
    # malformed: said once on one line, the rules are ignored, the bind stays in the container
    ("0.0.0.0:8000", "ok", "graft: GRAFT_CONV_PAIRS ignored: bad ingress pair '0.0.0.0:8000'"),
    ("0.0.0.0:8000=ep-http 1.2.3:80=ep-http", "ok", "graft: GRAFT_CONV_PAIRS ignored: bad address '1.2.3'"),
    # well formed, but the endpoint is not in the container's table: the engine denies
    ("0.0.0.0:8000=ep-nothere", "EADDRNOTAVAIL", None),
])
def test_bad_conv_pairs_give_a_clear_error_and_no_crash(run_preload, pairs, result, message):
    p = run_preload(ep("ep-http", free_port()), [PY, "-c", BAD_ENV_PROG], env={"GRAFT_CONV_PAIRS": pairs})
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out.split("\n")[:2] == [f"bind: {result}", "alive"]
    lines = [line for line in err.splitlines() if line.startswith("graft:")]
    if message:
        assert len(lines) == 1 and lines[0].startswith(message), err
    else:
        assert lines == [], err


def test_graft_disable_leaves_the_program_alone(run_preload):
    port = free_port("127.0.0.1", 2)
    p = run_preload([*ep("ep-dns", port), "--ingress", "0.0.0.0:5353=ep-dns"], [PY, "-c", NAME_PROG],
                    env={"GRAFT": "disable", "GRAFT_NAME_TRANSPARENT": "1"})
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out.split() == ["0.0.0.0", "5353"]  # bound inside the container, not on the host


def test_run_exports_preload_and_rules(ns, state_dir, preload_lib):
    p = graft("run", "-n", ns, "--mode", "preload", *ep("a", None), "--ingress", "0.0.0.0:80=a",
              "--ingress", "[::]:81-82=a", "--egress", "10.0.0.0/8=a", "--",
              "sh", "-c", 'echo "$LD_PRELOAD|$GRAFT_CONV_PAIRS|$GRAFT_EGRESS"')
    assert p.stdout.strip() == f"{preload_lib}|0.0.0.0:80=a [::]:81-82=a|10.0.0.0/8=a"


def test_config_prints_installed_paths(preload_lib):
    assert graft("config", "preload-lib").stdout.strip() == preload_lib
    inc = graft("config", "include-dir").stdout.strip()
    assert os.path.exists(os.path.join(inc, "graft.h"))
    text = open(os.path.join(inc, "graft.h")).read()
    from sockgraft.modes.api.graftsocket import AF_GRAFT, AF_GRAFT_EPNAME_MAX

    assert f"#define AF_GRAFT {AF_GRAFT:#x}" in text and f"#define AF_GRAFT_EPNAME_MAX {AF_GRAFT_EPNAME_MAX}" in text


def test_by_hand_under_graftd(tmp_path, state_dir, ns, procs, preload_lib):
    """No `graft run`: graftd serves the table, the program is started with LD_PRELOAD and
    GRAFT_CONV_PAIRS by hand; the pairs travel on the requests (nothing is stored)."""
    from tests.cmd.test_graftd import graftd

    port = free_port()
    graft("-n", ns, "add", "ep-http", "type", "ipv4", "addr", "127.0.0.1", "port", str(port))
    runtime = str(tmp_path / "run")
    procs.append(graftd(state_dir, runtime))
    sock = os.path.join(runtime, "fd", f"{ns}.sock")
    wait_for(lambda: os.path.exists(sock), what=sock)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "by-hand").write_text("by hand\n")
    procs.append(subprocess.Popen(
        ["ip", "netns", "exec", ns, PY, "-m", "http.server", "-b", "0.0.0.0", "-d", str(tmp_path / "www"), "8000"],
        env=dict(os.environ, LD_PRELOAD=preload_lib, GRAFT_SOCKET=sock, GRAFT_CONV_PAIRS="0.0.0.0:8000=ep-http"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_port("127.0.0.1", port)
    assert fetch(port, "/by-hand") == b"by hand\n"
