"""Shared by the runtime tests: a busybox rootfs, a graftd with the OCI agent, a host server for
egress, and the one scenario every runtime (runc, Docker, Podman) must pass."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from tests.helpers import free_port, graftd, stop

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "httpd", "nc", "cat", "sleep", "ls", "echo", "ifconfig", "wget")
PAGE = "sockgraft-ok\n"
GRAFT_RUNTIME = "/usr/local/bin/graft-runtime"


def build_rootfs(path: str) -> str:
    """A rootfs from Debian's busybox-static: /bin/busybox, its applets, /www/index.html."""
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "www"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(path, "bin", "busybox"))
    for a in APPLETS:
        link = os.path.join(path, "bin", a)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    with open(os.path.join(path, "www", "index.html"), "w") as f:
        f.write(PAGE)
    with open(os.path.join(path, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/:/bin/sh\n")
    return path


class Graftd:
    """graftd with its own state and runtime dirs, the OCI agent, and optionally /metrics."""

    def __init__(self, base: str, metrics: bool = False):
        self.state = os.path.join(base, "state")
        self.runtime = os.path.join(base, "run")
        self.agent = os.path.join(self.runtime, "agent.sock")
        self.log = os.path.join(base, "graftd.log")
        self.metrics_port = free_port() if metrics else None
        args = ["--metrics", f"127.0.0.1:{self.metrics_port}"] if metrics else []
        os.makedirs(base, exist_ok=True)
        self._logf = open(self.log, "w")
        self.proc = graftd(self.state, self.runtime, *args, log=self._logf)
        assert os.path.exists(self.agent), open(self.log).read()

    def env(self) -> dict[str, str]:
        return dict(os.environ, GRAFT_STATE_DIR=self.state, GRAFT_AGENT_SOCKET=self.agent)

    def events(self) -> list[dict]:
        with open(os.path.join(self.state, "audit.log")) as f:
            return [json.loads(line) for line in f if line.strip()]

    def wait_event(self, pred, timeout: float = 10) -> dict:
        """The first audit event matching `pred` (lines may be written a moment after the fact)."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events():
                if pred(e):
                    return e
            assert time.monotonic() < deadline, "no such event in the audit log"
            time.sleep(0.1)

    def status(self) -> dict:
        p = subprocess.run([shutil.which("graft") or "graft", "status", "-j", "--state-dir", self.state,
                            "--runtime-dir", self.runtime], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    def graftd_view(self) -> dict:
        """graftd's own status file, once it has been rewritten after now."""
        t0 = time.time()
        path = os.path.join(self.runtime, "graftd.json")
        deadline = time.monotonic() + 10
        while True:
            try:
                with open(path) as f:
                    st = json.load(f)
                if st["time"] > t0:
                    return st
            except (OSError, ValueError):
                pass
            assert time.monotonic() < deadline, "graftd does not update its status"
            time.sleep(0.1)

    def close(self) -> None:
        stop(self.proc)
        self._logf.close()


class HostServer:
    """A TCP server on host loopback that records what each client sends and who it is."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[tuple, bytes]] = []
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while chunk := conn.recv(4096):
                        data += chunk
                except OSError:
                    pass
                self.received.append((peer, data))

    def wait(self, timeout: float = 20) -> tuple[tuple, bytes]:
        deadline = time.monotonic() + timeout
        while not self.received:
            assert time.monotonic() < deadline, "nothing reached the host server"
            time.sleep(0.05)
        return self.received[0]

    def close(self) -> None:
        self.sock.close()


def http_get(port: int, path: str = "/", timeout: float = 20) -> str:
    """GET from a grafted endpoint on host loopback, retrying until it answers."""
    url = f"http://127.0.0.1:{port}{path}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.read().decode()
        except OSError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url}: {e}")
            time.sleep(0.1)


@dataclass
class Scenario:
    """One container that shows everything a runtime integration must do:
    - busybox httpd bound to 0.0.0.0:8080 in the container, grafted onto host 127.0.0.1:http_port;
    - a client (busybox nc) reaching a host server through the egress rule;
    - an unmapped bind (0.0.0.0:local_port) that stays in the container's own netns;
    - a bind that the table denies (busybox nc listens on [::]; the pair names a unix endpoint:
      the engine refuses an IP socket there);
    the outcome of the last two is written to /www and fetched over the grafted endpoint."""

    tmp: str
    http_port: int = field(default_factory=free_port)
    local_port: int = field(default_factory=free_port)
    denied_port: int = 9091

    def __post_init__(self):
        self.server = HostServer()
        self.unix_path = os.path.join(self.tmp, "never.sock")

    @property
    def endpoints(self) -> str:
        return (f"http type ipv4 addr 127.0.0.1 port {self.http_port}; out type ipv4 addr 127.0.0.1 port dynamic; "
                f"u type unix path {self.unix_path}")

    @property
    def ingress(self) -> str:
        return f"0.0.0.0:8080=http [::]:{self.denied_port}=u"

    @property
    def egress(self) -> str:
        return "127.0.0.1/32=out"

    def annotations(self) -> dict[str, str]:
        return {"io.sockgraft.endpoints": self.endpoints, "io.sockgraft.ingress": self.ingress,
                "io.sockgraft.egress": self.egress}

    def env(self) -> dict[str, str]:
        return {"SOCKGRAFT_ENDPOINTS": self.endpoints, "SOCKGRAFT_INGRESS": self.ingress, "SOCKGRAFT_EGRESS": self.egress}

    def command(self) -> list[str]:
        script = (
            "httpd -p 0.0.0.0:8080 -h /www; "
            f"echo hello-from-container | nc 127.0.0.1 {self.server.port}; "
            f"nc -l -p {self.local_port} >/dev/null 2>&1 & "
            f"nc -l -p {self.denied_port} 2>/tmp/denied.err; echo $? >/tmp/denied.txt; "
            "ifconfig lo >/tmp/ifconfig.txt 2>&1; "
            "mv /tmp/denied.err /tmp/denied.txt /tmp/ifconfig.txt /www/; "  # whole files only
            "exec sleep 600"
        )
        return ["sh", "-c", script]

    def check(self, graftd: Graftd) -> str:
        """Everything the running container must show; returns its table key."""
        assert http_get(self.http_port) == PAGE
        peer, data = self.server.wait()
        assert data == b"hello-from-container\n"
        assert peer[0] == "127.0.0.1"  # it came over the host's loopback, from the `out` endpoint
        assert http_get(self.http_port, "/denied.txt").strip() == "1"
        assert http_get(self.http_port, "/denied.err").startswith("nc: bind: ")
        # the container's own interfaces: lo only (ifconfig's ioctls reach the container's stack)
        ifc = http_get(self.http_port, "/ifconfig.txt")
        assert "127.0.0.1" in ifc and "eth0" not in ifc
        # the unmapped listener is not on the host
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", self.local_port)) != 0
        key = graftd.wait_event(lambda e: e["event"] == "grant" and e.get("port") == 8080)["container"]
        graftd.wait_event(lambda e: e.get("container") == key and e["event"] == "grant" and e["op"] == "connect" and e["endpoint"] == "out")
        graftd.wait_event(lambda e: e.get("container") == key and e["event"] == "local" and e["op"] == "bind" and e.get("port") == self.local_port)
        graftd.wait_event(lambda e: e.get("container") == key and e["event"] == "deny" and e["op"] == "bind" and e.get("port") == self.denied_port)
        st = graftd.status()
        (c,) = [c for c in st["containers"] if c["key"] == key]
        assert c["mode"] == "seccomp"
        assert any(s["local"] == f"127.0.0.1:{self.http_port}" and s["state"] == "LISTEN" for s in c["sockets"])
        assert graftd.graftd_view()["seccomp_listeners"].get(key, 0) >= 1
        return key

    def check_gone(self, graftd: Graftd, key: str) -> None:
        """After the container was removed: no table, no record, no netns, no listener. (Engines
        may run the runtime's `delete` a moment after `rm` returns: wait for it.)"""
        deadline = time.monotonic() + 15
        while True:
            st = graftd.status()
            if all(c["key"] != key for c in st["containers"]):
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        assert not os.listdir(os.path.join(graftd.state, "oci"))
        assert key not in graftd.graftd_view()["seccomp_listeners"]
        if not key.startswith("netns:"):
            assert not os.path.exists(os.path.join("/run/netns", key))

    def close(self) -> None:
        self.server.close()
