"""Fault injection: a daemon killed under load, a full disk, a read-only state dir."""
import http.client
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cmd.test_graftd import graftd
from tests.helpers import children, free_port, graft, graft_cmd, wait_for, wait_port

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
    wait_for(lambda: os.path.exists(sock), what=sock)
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
    deadline = time.monotonic() + 10
    while (p := subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ask], env=env,
                               capture_output=True, text=True, timeout=30)).stdout.strip() != "granted":
        assert time.monotonic() < deadline, p.stdout + p.stderr
        time.sleep(0.2)
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
    time.sleep(0.5)  # iperf3 counts a probe as a failed test: give it time to listen instead
    apps = [c for r in runs for c in children(r.pid)]
    try:
        client = subprocess.Popen(["iperf3", "-J", "-c", "127.0.0.1", "-p", str(iperf_port), "-t", "4", "-i", "1"],
                                  stdout=subprocess.PIPE, text=True)
        keepalive = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
        assert get(keepalive) == b"grafted\n"
        time.sleep(1.5)
        for r in runs:  # the supervisors die mid-transfer
            r.kill()
            r.wait()
        out, _ = client.communicate(timeout=30)
        intervals = [i["sum"]["bytes"] for i in json.loads(out)["intervals"]]
        assert len(intervals) >= 4 and all(b > 0 for b in intervals), intervals  # no gap after the kill
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
