"""Real unprivileged users for rootless runs (the bench's rootless topologies, tests/rootless): made
with useradd (no home, like a service account), their XDG_RUNTIME_DIR made as logind would
(/run/user/UID, mode 700), subordinate ids on request (rootless Podman); removed with their
processes (by pid), their dirs and their subuid/subgid lines. Whoever makes them names them so that
a sweep finds the ones of dead runs (the bench: `sgb<PID>u...`, see debris)."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

SUBID_FILES = ("/etc/subuid", "/etc/subgid")


def uid_pids(uid: int) -> list[int]:
    """Every live process owned by `uid` (by its /proc entry; zombies, already dead, left out)."""
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
        except (OSError, IndexError):
            continue
        pids.append(int(name))
    return pids


def user_dirs(uid: int) -> list[str]:
    """Where a user's rootless sockgraft keeps runtime and state when it has no home."""
    return [f"/run/user/{uid}", f"/tmp/sockgraft-{uid}", f"/var/tmp/sockgraft-{uid}"]


def kill_all(uid: int) -> None:
    """Kill every process of `uid`, by pid, a few times (a fork may race)."""
    for _ in range(3):
        pids = uid_pids(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def remove_user(name: str) -> None:
    """Kill the user's processes, remove the user, its dirs and its subordinate id lines."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        uid = None
    if uid is not None:
        kill_all(uid)
        for d in user_dirs(uid):  # rootless podman's storage may hold files of subordinate uids: as root
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

    def argv(self, *argv: str, pdeathsig: bool = False) -> list[str]:
        """`argv` run as the user (setpriv); with `pdeathsig`, killed when its parent dies (set after
        the switch of credentials, which clears a parent-death signal set before)."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                *(["--pdeathsig", "KILL"] if pdeathsig else []), "--", *argv]

    def run(self, *argv: str, env: dict | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*argv), env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd="/", stdin=subprocess.DEVNULL, **kw)

    def popen(self, *argv: str, env: dict | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*argv), env=env or self.env(), cwd="/", stdin=subprocess.DEVNULL,
                                text=True, **kw)

    def kill_all(self) -> None:
        kill_all(self.uid)


def create_user(name: str, subids: bool = False) -> User:
    """A fresh user `name` (one of that name is removed first), with /run/user/UID; `subids`: a
    65,536-id subordinate range in /etc/subuid and /etc/subgid (useradd's, else one above all)."""
    remove_user(name)
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", name], check=True,
                   capture_output=True, timeout=30)
    try:
        pw = pwd.getpwnam(name)
        for path in SUBID_FILES if subids else ():
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
        return User(name, pw.pw_uid, pw.pw_gid, rt)
    except BaseException:
        remove_user(name)
        raise


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
