"""A real unprivileged user for the rootless tests: created with useradd (no home, like a service
account), its XDG_RUNTIME_DIR made as logind would (/run/user/UID, mode 700), subuid/subgid ranges
for rootless Podman; removed at the end. Users of killed runs (`sgr<PID>` with PID dead) are swept
first: their processes (by pid), their dirs and their subuid/subgid lines go with them."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest

from sockgraft.host.netns import pid_alive

PREFIX = "sgr"  # every user these tests make is sgr<PID of the pytest process>
_OURS = re.compile(rf"^{PREFIX}(\d+)$")
VENV_PYTHON = "/opt/sockgraft/bin/python3"  # the install every user can run (scripts/setup)
SUBID_FILES = ("/etc/subuid", "/etc/subgid")


def _uid_pids(uid: int) -> list[int]:
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{name}").st_uid == uid:
                pids.append(int(name))
        except OSError:
            continue
    return pids


def _user_dirs(uid: int) -> list[str]:
    return [f"/run/user/{uid}", f"/tmp/sockgraft-{uid}", f"/var/tmp/sockgraft-{uid}"]


def remove_user(name: str) -> None:
    """Kill the user's processes (by pid, twice: a fork may race), remove the user, its dirs and
    its subordinate id lines."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        uid = None
    if uid is not None:
        for _ in range(3):
            pids = _uid_pids(uid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        # rootless podman's storage may hold files of subordinate uids: remove as root
        for d in _user_dirs(uid):
            _unmount_under(d)
            shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["userdel", name], capture_output=True, timeout=30)
    for path in SUBID_FILES:
        try:
            with open(path) as f:
                lines = f.readlines()
        except FileNotFoundError:
            continue
        keep = [line for line in lines if line.split(":", 1)[0] != name]
        if keep != lines:
            with open(path, "w") as f:
                f.writelines(keep)


def _unmount_under(d: str) -> None:
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return
    for p in sorted((p for p in points if p == d or p.startswith(d + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True, timeout=30)


def sweep_www() -> None:
    """The daemon test's web roots (/tmp/sgr-www-<PID>) of dead runs, and the daemons (root's too)
    still serving them: by pid, found by that path on their command line."""
    dead = set()
    for entry in os.listdir("/tmp"):
        m = re.match(r"^sgr-www-(\d+)$", entry)
        if m and not pid_alive(int(m[1])):
            dead.add(f"/tmp/{entry}")
    if not dead:
        return
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a in dead for a in argv):
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for d in dead:
        shutil.rmtree(d, ignore_errors=True)


def sweep_users() -> list[str]:
    """Users of earlier runs whose pytest process is gone (and the daemon test's leftovers)."""
    sweep_www()
    gone = []
    for entry in pwd.getpwall():
        m = _OURS.match(entry.pw_name)
        if m and not pid_alive(int(m[1])):
            remove_user(entry.pw_name)
            gone.append(entry.pw_name)
    return gone


@dataclass
class User:
    name: str
    uid: int
    gid: int
    runtime_dir: str

    def env(self, xdg: bool = True, **extra: str) -> dict[str, str]:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", "USER": self.name, "LANG": "C.UTF-8"}
        if xdg:
            env["XDG_RUNTIME_DIR"] = self.runtime_dir
        env.update(extra)
        return env

    def argv(self, *argv: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *argv]

    def run(self, *argv: str, env: dict | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*argv), env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd="/", stdin=subprocess.DEVNULL, **kw)

    def popen(self, *argv: str, env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*argv), env=env or self.env(), cwd="/", stdin=subprocess.DEVNULL,
                                text=True, **kw)

    def kill_all(self) -> None:
        for pid in _uid_pids(self.uid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def user():
    if os.geteuid() != 0:
        pytest.skip("the rootless tests create a user: run them as root")
    if not os.access(VENV_PYTHON, os.X_OK):
        pytest.skip(f"{VENV_PYTHON} missing: run scripts/setup")
    sweep_users()
    name = f"{PREFIX}{os.getpid()}"
    remove_user(name)
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", name], check=True,
                   capture_output=True, timeout=30)
    try:
        pw = pwd.getpwnam(name)
        for path in SUBID_FILES:  # useradd may have given a range; else one above every existing one
            with open(path) as f:
                if any(line.split(":", 1)[0] == name for line in f):
                    continue
            start = _free_subid_start()
            with open(path, "a") as f:
                f.write(f"{name}:{start}:65536\n")
        rt = f"/run/user/{pw.pw_uid}"
        os.makedirs(rt, exist_ok=True)
        os.chown(rt, pw.pw_uid, pw.pw_gid)
        os.chmod(rt, 0o700)
        yield User(name, pw.pw_uid, pw.pw_gid, rt)
    finally:
        remove_user(name)


def _free_subid_start() -> int:
    top = 200000
    for path in SUBID_FILES:
        try:
            with open(path) as f:
                for line in f:
                    parts = line.strip().split(":")
                    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                        top = max(top, int(parts[1]) + int(parts[2]))
        except FileNotFoundError:
            pass
    return top
