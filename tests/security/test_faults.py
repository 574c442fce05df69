"""Fault injection: a daemon killed under load, a full disk, a read-only state dir."""
import http.client
import os
import subprocess
import sys
import time

import pytest

from tests.e2e.test_graftd import graftd, wait_for
from tests.helpers import free_port, graft, stop, wait_port

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
    wait_for(sock)
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
