"""graftd: the fd service for every container in the tables, across restarts; its metrics."""
import json
import os
import subprocess
import sys
import urllib.request

from tests.helpers import free_port, graft, graftd, stop, wait_for

ASK = ("import socket, sys, sockgraft; s = sockgraft.socket(); s.bind(sys.argv[1]); "
       "print(*s.getsockname()[:2], flush=True)")


def ask_inside(ns: str, sock: str, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ASK, name],
                          capture_output=True, text=True, timeout=20, env=dict(os.environ, GRAFT_SOCKET=sock))


def granted(ns: str, sock: str, name: str):
    """The grant's address words once `name` is granted (None while it is not)."""
    p = ask_inside(ns, sock, name)
    return p.returncode == 0 and p.stdout.split()


def test_serves_tables_survives_restart_and_sees_changes(tmp_path, state_dir, ns, procs):
    runtime = str(tmp_path / "run")
    port = free_port()
    graft("-n", ns, "add", "ep-http", "type", "ipv4", "addr", "127.0.0.1", "port", str(port))
    d = graftd(state_dir, runtime)
    procs.append(d)
    sock = os.path.join(runtime, "fd", f"{ns}.sock")
    assert os.path.exists(sock)  # served from the first sync on
    p = ask_inside(ns, sock, "ep-http")
    assert p.stdout.split() == ["127.0.0.1", str(port)], p.stderr
    # a table change is picked up without a restart
    port2 = free_port()
    graft("-n", ns, "add", "ep-two", "type", "ipv4", "addr", "127.0.0.1", "port", str(port2))
    assert wait_for(lambda: granted(ns, sock, "ep-two"), what="ep-two granted") == ["127.0.0.1", str(port2)]
    # kill -9, restart: the table is still there and served
    d.kill()
    d.wait()
    d2 = graftd(state_dir, runtime)
    procs.append(d2)
    assert wait_for(lambda: granted(ns, sock, "ep-http"), what="ep-http granted") == ["127.0.0.1", str(port)]
    assert graft("-n", ns, "show").stdout.count("\n") == 2
    # a removed endpoint is no longer granted (once graftd has seen the change)
    graft("-n", ns, "del", "ep-two")
    p = wait_for(lambda: (q := ask_inside(ns, sock, "ep-two")).returncode != 0 and q, what="ep-two refused")
    assert "[Errno 99] no endpoint 'ep-two'" in p.stderr
    stop(d2)
    log = [json.loads(line) for line in d2.stderr.read().splitlines() if line.startswith("{")]
    assert {r["event"] for r in log} >= {"start", "grant", "deny", "stop"}


def test_second_graftd_is_refused(tmp_path, state_dir, procs):
    d = graftd(state_dir, str(tmp_path / "run"))  # serving: it holds the lock
    procs.append(d)
    d2 = graftd(state_dir, str(tmp_path / "run"), ready=False)
    _, err = d2.communicate(timeout=20)
    assert d2.returncode == 1 and err.strip() == f"graftd: another graftd already serves {state_dir}"
    assert d.poll() is None


def test_fd_service_requests_are_timed_in_the_metrics(tmp_path, state_dir, ns, procs):
    """Every fd-service request is observed in the api latency histogram (FdService.on_request)."""
    port, mport = free_port(), free_port()
    graft("-n", ns, "add", "ep-http", "type", "ipv4", "addr", "127.0.0.1", "port", str(port))
    runtime = str(tmp_path / "run")
    d = graftd(state_dir, runtime, "--no-agent", "--metrics", f"127.0.0.1:{mport}")
    procs.append(d)

    def api_count() -> float:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('sockgraft_notification_latency_seconds_count{mode="api"}'):
                    return float(line.split()[-1])
        return 0.0

    before = api_count()
    sock = os.path.join(runtime, "fd", f"{ns}.sock")
    for _ in range(3):
        assert ask_inside(ns, sock, "ep-http").stdout.split() == ["127.0.0.1", str(port)]
    assert ask_inside(ns, sock, "nonesuch").returncode != 0  # a denial is a request too
    assert api_count() - before == 4
