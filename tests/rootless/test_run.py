"""Rootless `graft run`, as a real unprivileged user made by the test (conftest), in each mode; the
lifecycle of a daemonizing program; root's `--userns`."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import threading

import pytest

from tests.helpers import free_port, wait_for, wait_port
from tests.rootless.conftest import VENV_PYTHON

pytestmark = pytest.mark.e2e

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer.py")
NOT_ENFORCED = "graft: egress is not enforced by the kernel"


class HostServer:
    """A loopback server on the host that answers each connection with b'ok:' + what it got."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                c.sendall(b"ok:" + c.recv(100))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def host_server():
    s = HostServer()
    yield s
    s.close()


def graft_run(user, mode: str, in_port: int, *cmd: str, **kw) -> subprocess.Popen:
    return user.popen("graft", "run", "--mode", mode,
                      "--endpoint", f"ep-in type ipv4 addr 127.0.0.1 port {in_port}",
                      "--endpoint", "ep-out type ipv4 addr 127.0.0.1 port dynamic",
                      "--ingress", "0.0.0.0:8080=ep-in", "--egress", "127.0.0.1/32=ep-out", "--", *cmd,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.parametrize("mode", ["api", "preload", "seccomp"])
def test_rootless_run_serves_and_leaves_by_egress(user, host_server, mode):
    """The command is root in its own user namespace (mapped to the user) and netns; the fd service
    or supervisor runs as the user: a server grafted onto ep-in answers the host, a client leaves
    by ep-out, what no rule names stays in the container. No mark (rootless cannot set one), said
    once on stderr."""
    port = free_port()
    python = VENV_PYTHON if mode == "api" else "/usr/bin/python3"  # preload needs a dynamic program
    p = graft_run(user, mode, port, python, PEER, mode, str(host_server.port))
    try:
        assert p.stdout.readline().split()[:3] == ["ids", "0", "0"]
        assert p.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"ping")
            assert c.recv(100) == b"pong:ping"
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert "egress ok:hello mark 0" in out
    assert f"unlisted refused {errno.ECONNREFUSED}" in out
    assert [line for line in err.splitlines() if line.startswith(NOT_ENFORCED)] == [err.splitlines()[0]], err
    sockets = os.path.join(user.runtime_dir, "sockgraft")
    assert not [e for e in os.listdir(sockets) if e.startswith("run-")]  # the run's socket dir is gone


def test_rootless_refusals_are_one_line(user):
    low = user.run("graft", "run", "--endpoint", "ep type ipv4 addr 127.0.0.1 port 80", "--", "true")
    assert low.returncode == 1
    assert low.stderr.splitlines() == ["graft: endpoint ep: host port 80 is below net.ipv4.ip_unprivileged_port_start "
                                       "(1024): a rootless run can use ports >= 1024 only"]
    named = user.run("graft", "run", "-n", "sgr-named", "--", "true")
    assert named.returncode == 1 and len(named.stderr.splitlines()) == 1 and "-n sgr-named" in named.stderr
    assert user.run("graft", "run", "--", "sh", "-c", "exit 7").returncode == 7


def test_rootless_state_without_xdg(user):
    """Neither XDG variable nor a home: state under /var/tmp/sockgraft-UID/state, sockets under
    /tmp/sockgraft-UID (mode 700); with them: $XDG_STATE_HOME/sockgraft, $XDG_RUNTIME_DIR/sockgraft."""
    env = user.env(xdg=False, GRAFT_EGRESS_ENFORCE="0")
    show = "import os; print(os.environ['GRAFT_SOCKET'])"
    p = user.run("graft", "run", "--", "/usr/bin/python3", "-c", show, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"/tmp/sockgraft-{user.uid}/run-")
    assert os.path.exists(f"/var/tmp/sockgraft-{user.uid}/state/tables.db")
    assert os.stat(f"/tmp/sockgraft-{user.uid}").st_mode & 0o777 == 0o700
    state_home = os.path.join(user.runtime_dir, "xdg-state")
    p = user.run("graft", "run", "--", "/usr/bin/python3", "-c", show,
                 env=user.env(XDG_STATE_HOME=state_home, GRAFT_EGRESS_ENFORCE="0"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(os.path.join(user.runtime_dir, "sockgraft", "run-"))
    assert os.path.exists(os.path.join(state_home, "sockgraft", "tables.db"))


@pytest.fixture
def www(tmp_path):
    d = f"/tmp/sgr-www-{os.getpid()}"
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "index.html"), "w") as f:
        f.write("daemon-ok\n")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _get(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    return data.decode()


@pytest.mark.parametrize("who", ["rootless", "root"])
def test_daemonizing_program_keeps_being_served(user, www, who, state_dir):
    """busybox httpd without -f forks away and its foreground process exits 0 at once: graft run
    stays (a subreaper) while the daemon lives, its binds and accepts keep being grafted, SIGTERM
    reaches the daemon, and graft run then exits with the foreground's status."""
    port = free_port()
    argv = ["graft", "run", "--mode", "seccomp", "--endpoint", f"ep-h type ipv4 addr 127.0.0.1 port {port}",
            "--ingress", "0.0.0.0:80=ep-h", "--", "busybox", "httpd", "-p", "80", "-h", www]
    env = user.env(GRAFT_EGRESS_ENFORCE="0")
    if who == "rootless":
        p = user.popen(*argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    else:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_port("127.0.0.1", port, 15)
        wait_for(lambda: len(_descendants(p.pid)) >= 1, 10, "the daemon")
        assert "daemon-ok" in _get(port)
        assert p.poll() is None  # the foreground httpd is gone; graft run is not
        assert "daemon-ok" in _get(port)
        daemons = _descendants(p.pid)
        assert daemons, "no daemon under graft run"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    for pid in daemons:
        assert not os.path.exists(f"/proc/{pid}/ns"), f"daemon {pid} still there"


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        try:
            with open(f"/proc/{cur}/task/{cur}/children") as f:
                kids = [int(c) for c in f.read().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def test_root_userns_command_cannot_touch_its_marks(state_dir):
    """As root, --userns: the command is root of a user namespace whose root is nobody on the host;
    its grafted socket carries the container's mark and the command cannot change it (EPERM), while
    the same command without --userns can."""
    prog = ("import os, socket, sockgraft\n"
            "s = sockgraft.socket(sockgraft.AF_GRAFT, sockgraft.SOCK_STREAM); s.bind('ep-u')\n"
            "m = s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)\n"
            "try:\n    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 1); r = 'changed'\n"
            "except OSError as e:\n    r = f'errno{e.errno}'\n"
            "print(os.getuid(), open('/proc/self/uid_map').read().split()[1], hex(m) if m else 0, r)\n")
    results = {}
    for flag in (["--userns"], []):
        p = subprocess.run(["graft", "run", *flag, "--endpoint", f"ep-u type ipv4 addr 127.0.0.1 port {free_port()}",
                            "--", VENV_PYTHON, "-c", prog], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        results[bool(flag)] = p.stdout.split()
    uid, outside, mark, userns_result = results[True]
    assert (uid, outside) == ("0", "65534") and mark != "0" and userns_result == f"errno{errno.EPERM}"
    assert results[False][1] == "0" and results[False][3] == "changed"


def test_rootless_refuses_a_fallback_dir_someone_else_made(user):
    """/tmp is shared: a /tmp/sockgraft-UID made by another user (here root) is refused in one line,
    not used (it would hold the user's sockets)."""
    d = f"/tmp/sockgraft-{user.uid}"
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d, mode=0o777)
    try:
        p = user.run("graft", "run", "--", "true", env=user.env(xdg=False, GRAFT_EGRESS_ENFORCE="0"))
        assert p.returncode == 1 and p.stderr.splitlines() == [f"graft: {d} belongs to uid 0, not to this user"]
    finally:
        shutil.rmtree(d, ignore_errors=True)
