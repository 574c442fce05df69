"""Fault injection: a daemon killed under load, a full disk, a read-only state dir."""
import http.client
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import children, free_port, graft, graft_cmd, graftd, wait_for, wait_port

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "api_http_server.py")


def get(conn: http.client.HTTPConnection) -> bytes:
    conn.request("GET", "/")
    return conn.getresponse().read()


def test_kill_graftd_under_http_load(tmp_path, state_dir, ns, procs):
    port = free_port()
    graft("-n", ns, "add", "ep-http", "type", "ipv4", "addr", "127.0.0.1", "port", str(port))
    graft("-n", ns, "add", "ep-out", "type", "ipv4", "addr", "127.0.0.1", "port", "dynamic")
    runtime = str(tmp_path / "run")
    d = graftd(state_dir, runtime)
    procs.append(d)
    sock = os.path.join(runtime, "fd", f"{ns}.sock")
    assert os.path.exists(sock)
    (tmp_path / "index.html").write_text("grafted\n")
    env = dict(os.environ, GRAFT_SOCKET=sock)
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, EXAMPLE, "ep-http", str(tmp_path)],
                              env=env, stdout=subprocess.DEVNULL)
    procs.append(server)
    wait_port("127.0.0.1", port)
    keepalive = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    assert get(keepalive) == b"grafted\n"
    d.kill()
    d.wait()
    # the data path does not go through graftd: the established connection and new ones keep working
    for _ in range(50):
        assert get(keepalive) == b"grafted\n"
        assert get(http.client.HTTPConnection("127.0.0.1", port, timeout=5)) == b"grafted\n"
    # a new grafted socket fails at once with a clear error instead of hanging
    ask = "import sockgraft\ntry:\n  sockgraft.socket().bind('ep-out'); print('granted')\nexcept OSError as e: print('error', e.errno)"
    t = time.monotonic()
    p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ask], env=env, capture_output=True, text=True, timeout=30)
    assert p.stdout.split()[0] == "error" and time.monotonic() - t < 10, p.stdout + p.stderr
    # restart: tables restored, service back
    d2 = graftd(state_dir, runtime)
    procs.append(d2)
    wait_for(lambda: subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ask], env=env, capture_output=True,
                                    text=True, timeout=30).stdout.strip() == "granted", what="a grant after the restart")
    assert get(keepalive) == b"grafted\n"
    keepalive.close()


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_and_read_only_state_dir(small_fs, ns, monkeypatch):
    state = os.path.join(small_fs, "state")
    monkeypatch.setenv("GRAFT_STATE_DIR", state)
    for i in range(5):
        graft("-n", ns, "add", f"ep{i}", "type", "ipv4", "addr", "127.0.0.1", "port", str(20000 + i))
    with open(os.path.join(small_fs, "filler"), "wb") as f:  # fill the disk
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    for i in range(5, 100):  # rows fit in free page space for a while; then the disk is full
        p = graft("-n", ns, "add", f"ep{i}", "type", "ipv4", "addr", "127.0.0.1", "port", str(20000 + i), check=False)
        if p.returncode != 0:
            assert p.stderr.startswith("graft: state database") and p.stderr.count("\n") == 1, p.stderr
            break
    else:
        pytest.fail("the full disk never refused a write")
    shown = graft("-n", ns, "show").stdout.splitlines()
    assert shown[:5] == [f"ep{i} type ipv4 addr 127.0.0.1 port {20000 + i}" for i in range(5)]
    os.unlink(os.path.join(small_fs, "filler"))
    subprocess.run(["mount", "-o", "remount,ro", small_fs], check=True)
    p = graft("-n", ns, "add", "late", "type", "ipv4", "addr", "127.0.0.1", "port", "30000", check=False)
    assert p.returncode == 1 and p.stderr.startswith("graft: state database") and p.stderr.count("\n") == 1, p.stderr
    p = graft("-n", ns, "show", check=False)
    assert p.returncode == 0 and p.stdout.splitlines()[:5] == shown[:5], p.stderr


def _listening(port: int) -> bool:
    """Whether a TCP socket of the host netns listens on `port` (grafted sockets are host sockets:
    they show here, not in the container's netns)."""
    out = subprocess.run(["ss", "-Htn", "state", "listening", f"( sport = :{port} )"], capture_output=True, text=True,
                         check=True).stdout
    return bool(out.strip())


def _bytes_received(port: int) -> int:
    out = subprocess.run(["ss", "-Htni", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True).stdout
    return sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))


IPERF_SECONDS = 5


def test_kill_seccomp_supervisor_under_iperf3_and_http_load(tmp_path, state_dir, make_netns, procs):
    """kill -9 of `graft run --mode seccomp` (the supervisor) while iperf3 and HTTP flow: the flows
    go on (the data path does not cross the supervisor); the orphaned programs are ours to stop."""
    pytest.importorskip("sockgraft.modes.seccomp.attach")
    import json

    iperf_port, http_port = free_port(), free_port()
    (tmp_path / "index.html").write_text("grafted\n")
    runs = []
    for ns, ep, pair, cmd in (  # iperf3 listens on [::] (dual-stack): an IPv6 socket on an IPv4 endpoint
        (make_netns(), f"ep type ipv4 addr 127.0.0.1 port {iperf_port}", "[::]:5201=ep", ["iperf3", "-s", "-p", "5201"]),
        (make_netns(), f"ep type ipv4 addr 127.0.0.1 port {http_port}", "0.0.0.0:8000=ep",
         [sys.executable, "-m", "http.server", "-d", str(tmp_path), "8000"]),
    ):
        run = subprocess.Popen([*graft_cmd(), "run", "-n", ns, "--mode", "seccomp", "--endpoint", ep, "--ingress", pair,
                                "--", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(run)
        runs.append(run)
    wait_port("127.0.0.1", http_port)
    # iperf3 counts a probe connection as a failed test: watch for its grafted listening socket instead
    wait_for(lambda: _listening(iperf_port), 20, f"iperf3 listening on host 127.0.0.1:{iperf_port}")
    apps = [c for r in runs for c in children(r.pid)]  # both listen: both are running
    try:
        client = subprocess.Popen(["iperf3", "-J", "-c", "127.0.0.1", "-p", str(iperf_port), "-t", str(IPERF_SECONDS),
                                   "-i", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(client)
        keepalive = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
        assert get(keepalive) == b"grafted\n"
        # mid-transfer: the data stream is established and has carried bytes
        wait_for(lambda: client.poll() is not None or _bytes_received(iperf_port) > 1 << 20, 20, "iperf3 data flowing")
        assert client.poll() is None, client.communicate()
        for r in runs:  # the supervisors die mid-transfer
            r.kill()
            r.wait()
        out, err = client.communicate(timeout=IPERF_SECONDS + 30)  # all of it, to the end of the test
        report = json.loads(out)
        assert client.returncode == 0 and "error" not in report, (report.get("error"), err)
        intervals = [i["sum"]["bytes"] for i in report["intervals"]]
        assert len(intervals) >= IPERF_SECONDS - 1 and all(b > 0 for b in intervals), intervals  # no gap after the kill
        for _ in range(20):  # the established connection and new ones to the grafted listener
            assert get(keepalive) == b"grafted\n"
            assert get(http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)) == b"grafted\n"
        keepalive.close()
    finally:
        for pid in apps:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
