"""Docker's and Podman's engines, started by the tests with everything under a temp dir."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from tests.runtime.common import GRAFT_RUNTIME, Graftd

IMAGE = "busybox:local"


def _run(argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    assert p.returncode == 0, f"{' '.join(argv)}: {p.stderr}"
    return p


def _import(cli: list[str], rootfs: str) -> None:
    tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
    try:
        p = subprocess.run([*cli, "import", "-", IMAGE], stdin=tar.stdout, capture_output=True, text=True, timeout=120)
    finally:
        tar.stdout.close()
        tar.wait()
    assert p.returncode == 0, p.stderr


def kill_leftovers(base: str) -> None:
    """Processes an engine left behind (a containerd shim, conmon) name `base` on their command
    line: kill them and their children (container inits), by pid."""
    me = os.getpid()
    procs: dict[int, tuple[int, bytes]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        procs[int(pid)] = (ppid, cmd)
    for pid, (_ppid, cmd) in procs.items():
        if pid != me and (base.rstrip("/") + "/").encode() in cmd:
            for child, (ppid, _c) in procs.items():
                if ppid == pid:
                    _kill(child)
            _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def unmount_under(base: str) -> None:
    """Mounts an engine left under its temp dir, deepest first (before the dir is removed)."""
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for mp in sorted((m for m in points if m.startswith(base + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


class Dockerd:
    """Debian's dockerd with data-root, exec-root, pidfile and socket under `base`; no bridge and
    no iptables (containers here use --network none), the graft runtime in its daemon.json."""

    def __init__(self, base: str, graftd: Graftd, rootfs: str, bip: str | None = None):
        """`bip`: also give docker its default bridge (docker0) on this address, for comparisons;
        still no iptables and no sysctl changes (a loopback client of `-p 127.0.0.1:P:PORT`
        goes through docker-proxy either way)."""
        import json

        self.base = base
        self.bridge_made = False
        if bip:
            self.bridge_made = subprocess.run(["ip", "link", "show", "docker0"], capture_output=True).returncode != 0
        self.sock = os.path.join(base, "docker.sock")
        config = os.path.join(base, "daemon.json")
        with open(config, "w") as f:
            json.dump({"runtimes": {"graft": {"path": GRAFT_RUNTIME, "runtimeArgs": [
                "--graft-state-dir", graftd.state, "--graft-agent", graftd.agent]}}}, f)
        self.log = open(os.path.join(base, "dockerd.log"), "w")
        self.proc = subprocess.Popen(
            ["dockerd", "--config-file", config, "--data-root", os.path.join(base, "data"),
             "--exec-root", os.path.join(base, "exec"), "-H", f"unix://{self.sock}",
             "--pidfile", os.path.join(base, "docker.pid"),
             *(["--bip", bip, "--ip-forward=false"] if bip else ["--bridge", "none"]),
             "--iptables=false", "--ip-masq=false"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.cli = [shutil.which("docker", path="/usr/bin") or "docker", "-H", f"unix://{self.sock}"]
        deadline = time.monotonic() + 60
        while subprocess.run([*self.cli, "info"], capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"dockerd did not start: {open(self.log.name).read()[-2000:]}")
            time.sleep(0.2)
        _import(self.cli, rootfs)

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run([*self.cli, *args], timeout=timeout)

    def close(self) -> None:
        subprocess.run([*self.cli, "rm", "-f", *self("ps", "-aq").stdout.split()], capture_output=True) \
            if self.proc.poll() is None else None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self.bridge_made:
            subprocess.run(["ip", "link", "del", "docker0"], capture_output=True)
        kill_leftovers(self.base)
        unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


class Podman:
    """podman with its storage, run root and tmp dir under `base`, graft-runtime as its runtime."""

    def __init__(self, base: str, graftd: Graftd, rootfs: str):
        self.base = base
        self.cli = [
            "podman", "--root", os.path.join(base, "root"), "--runroot", os.path.join(base, "runroot"),
            "--tmpdir", os.path.join(base, "tmp"), "--storage-driver", "vfs",
            "--runtime", GRAFT_RUNTIME, "--runtime-flag", f"graft-state-dir={graftd.state}",
            "--runtime-flag", f"graft-agent={graftd.agent}",
            "--cgroup-manager=cgroupfs", "--events-backend=file",
        ]
        _import(self.cli, rootfs)

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return _run([*self.cli, *args], timeout=timeout)

    def close(self) -> None:
        subprocess.run([*self.cli, "rm", "-af", "-t", "0"], capture_output=True, timeout=120)
        kill_leftovers(self.base)
        unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)
