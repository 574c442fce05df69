"""graftd: the fd service for every container in the tables, across restarts."""
import json
import os
import shutil
import subprocess
import sys
import time


from tests.helpers import free_port, graft, stop, wait_for

ASK = ("import socket, sys, sockgraft; s = sockgraft.socket(); s.bind(sys.argv[1]); "
       "print(*s.getsockname()[:2], flush=True)")


def graftd(state_dir: str, runtime_dir: str) -> subprocess.Popen:
    exe = shutil.which("graftd")
    cmd = [exe] if exe else [sys.executable, "-c", "from sockgraft.cmd.graftd import main; main()"]
    return subprocess.Popen([*cmd, "--state-dir", state_dir, "--runtime-dir", runtime_dir],
                            stderr=subprocess.PIPE, text=True)


def ask_inside(ns: str, sock: str, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ASK, name],
                          capture_output=True, text=True, timeout=20, env=dict(os.environ, GRAFT_SOCKET=sock))


def test_serves_tables_survives_restart_and_sees_changes(tmp_path, state_dir, ns, procs):
    runtime = str(tmp_path / "run")
    port = free_port()
    graft("-n", ns, "add", "ep-http", "type", "ipv4", "addr", "127.0.0.1", "port", str(port))
    d = graftd(state_dir, runtime)
    procs.append(d)
    sock = os.path.join(runtime, "fd", f"{ns}.sock")
    wait_for(lambda: os.path.exists(sock), what=sock)
    p = ask_inside(ns, sock, "ep-http")
    assert p.stdout.split() == ["127.0.0.1", str(port)], p.stderr
    # a table change is picked up without a restart
    port2 = free_port()
    graft("-n", ns, "add", "ep-two", "type", "ipv4", "addr", "127.0.0.1", "port", str(port2))
    deadline = time.monotonic() + 10
    while (p := ask_inside(ns, sock, "ep-two")).returncode != 0 or not p.stdout:
        assert time.monotonic() < deadline, p.stderr
        time.sleep(0.2)
    assert p.stdout.split() == ["127.0.0.1", str(port2)]
    # kill -9, restart: the table is still there and served
    d.kill()
    d.wait()
    d2 = graftd(state_dir, runtime)
    procs.append(d2)
    time.sleep(0.3)
    deadline = time.monotonic() + 10
    while (p := ask_inside(ns, sock, "ep-http")).returncode != 0 or not p.stdout:
        assert time.monotonic() < deadline, p.stderr
        time.sleep(0.2)
    assert p.stdout.split() == ["127.0.0.1", str(port)]
    assert graft("-n", ns, "show").stdout.count("\n") == 2
    # a removed endpoint is no longer granted
    graft("-n", ns, "del", "ep-two")
    time.sleep(1)
    assert "[Errno 99] no endpoint 'ep-two'" in ask_inside(ns, sock, "ep-two").stderr
    stop(d2)
    log = [json.loads(line) for line in d2.stderr.read().splitlines() if line.startswith("{")]
    assert {r["event"] for r in log} >= {"start", "grant", "deny", "stop"}


def test_second_graftd_is_refused(tmp_path, state_dir, procs):
    d = graftd(state_dir, str(tmp_path / "run"))
    procs.append(d)
    wait_for(lambda: os.path.exists(os.path.join(state_dir, "graftd.lock")), what="graftd.lock")
    time.sleep(0.5)
    d2 = graftd(state_dir, str(tmp_path / "run"))
    _, err = d2.communicate(timeout=20)
    assert d2.returncode == 1 and err.strip() == f"graftd: another graftd already serves {state_dir}"
    assert d.poll() is None
