"""Rootless Podman for a test user: its storage under the user's XDG_RUNTIME_DIR (HOME points there:
the user has no home), a busybox image whose /usr is the host's (mounted read-only at run: iperf3,
wrk, nginx work inside), and the user's own graftd (its defaults: state under HOME/.local/state,
sockets and the OCI agent under XDG_RUNTIME_DIR/sockgraft)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

from tests.runtime.common import build_rootfs

IMAGE = "sgr-busybox:local"
HOST_USR = ["-v", "/usr:/usr:ro"]  # with lib -> usr/lib links in the image: the host's dynamic programs run
LIMITS = ["--ulimit", "nofile=1024:1024"]
GRAFT_RUNTIME = "/usr/local/bin/graft-runtime"


class RootlessPodman:
    def __init__(self, user):
        self.user = user
        self.home = os.path.join(user.runtime_dir, "home")
        self.env = user.env(HOME=self.home)
        self.graftd: subprocess.Popen | None = None
        self.graftd_log = os.path.join(user.runtime_dir, "graftd.log")
        os.makedirs(self.home, exist_ok=True)
        os.chown(self.home, user.uid, user.gid)
        rootfs = os.path.join(user.runtime_dir, "rootfs")
        build_rootfs(rootfs)
        for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/sbin")):
            if not os.path.lexists(os.path.join(rootfs, link)):
                os.symlink(target, os.path.join(rootfs, link))
        os.makedirs(os.path.join(rootfs, "usr"), exist_ok=True)
        subprocess.run(["chmod", "-R", "a+rX", rootfs], check=True)
        tar = subprocess.run(["tar", "-C", rootfs, "-c", "."], capture_output=True, check=True).stdout
        p = subprocess.run(self.user.argv(*self.cli(), "import", "-", IMAGE), input=tar, env=self.env,
                           capture_output=True, timeout=120, cwd="/")
        assert p.returncode == 0, p.stderr.decode()

    def cli(self) -> list[str]:
        return ["podman", "--cgroup-manager=cgroupfs", "--events-backend=file"]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        p = self.user.run(*self.cli(), *args, env=self.env, timeout=timeout)
        if check:
            assert p.returncode == 0, f"podman {' '.join(args)}: {p.stderr}"
        return p

    def start_graftd(self) -> None:
        log = open(self.graftd_log, "w")
        os.chown(self.graftd_log, self.user.uid, self.user.gid)
        self.graftd = self.user.popen("graftd", env=self.env, stdout=log, stderr=subprocess.STDOUT)
        agent = os.path.join(self.user.runtime_dir, "sockgraft", "agent.sock")
        deadline = time.monotonic() + 15
        while not os.path.exists(agent):
            assert self.graftd.poll() is None, open(self.graftd_log).read()
            assert time.monotonic() < deadline, "graftd did not serve"
            time.sleep(0.05)

    def graftd_events(self) -> str:
        with open(self.graftd_log) as f:
            return f.read()

    def graft_args(self, endpoints: str, ingress: str = "", egress: str = "") -> list[str]:
        args = ["--runtime", GRAFT_RUNTIME, "--network", "none", "--annotation", f"io.sockgraft.endpoints={endpoints}"]
        if ingress:
            args += ["--annotation", f"io.sockgraft.ingress={ingress}"]
        if egress:
            args += ["--annotation", f"io.sockgraft.egress={egress}"]
        return args

    def close(self) -> None:
        self("rm", "-a", "-f", "-t", "0", check=False)
        if self.graftd is not None and self.graftd.poll() is None:
            self.graftd.terminate()
            try:
                self.graftd.wait(10)
            except subprocess.TimeoutExpired:
                self.graftd.kill()
                self.graftd.wait()
        shutil.rmtree(os.path.join(self.user.runtime_dir, "rootfs"), ignore_errors=True)
