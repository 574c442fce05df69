"""Where sockgraft keeps things on the host: the state dir (tables, audit log) and the runtime dir
(sockets, graftd's status).

Root (euid 0 in the initial user namespace) uses the system's places, /var/lib/sockgraft and
/run/sockgraft. Anyone else (an unprivileged user, or root of a user namespace such as rootless
Podman's, where graft-runtime runs) gets their own:
- state: `$XDG_STATE_HOME/sockgraft`, else `$HOME/.local/state/sockgraft` (when HOME is set and
  exists), else `/var/tmp/sockgraft-UID/state`;
- runtime: `$XDG_RUNTIME_DIR/sockgraft`, else `/tmp/sockgraft-UID` (made mode 700 and refused when
  someone else owns it).
UID is the user's id on the host (mapped out of a user namespace). `GRAFT_STATE_DIR` and
`GRAFT_RUNTIME_DIR` override both for everyone.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

SYSTEM_STATE_DIR = "/var/lib/sockgraft"
SYSTEM_RUNTIME_DIR = "/run/sockgraft"


def _uid_map() -> list[tuple[int, int, int]]:
    try:
        with open("/proc/self/uid_map") as f:
            return [tuple(map(int, line.split())) for line in f if line.strip()]  # type: ignore[misc]
    except (OSError, ValueError):
        return [(0, 0, 4294967295)]


def in_initial_userns() -> bool:
    return _uid_map() == [(0, 0, 4294967295)]


def privileged() -> bool:
    """Root of the host: euid 0 in the initial user namespace."""
    return os.geteuid() == 0 and in_initial_userns()


def host_uid() -> int:
    """This process's effective uid as the host sees it."""
    uid = os.geteuid()
    for inside, outside, count in _uid_map():
        if inside <= uid < inside + count:
            return outside + uid - inside
    return uid


def _user_state_dir() -> str:
    if xdg := os.environ.get("XDG_STATE_HOME"):
        return os.path.join(xdg, "sockgraft")
    home = os.environ.get("HOME")
    if home and home != "/" and os.path.isdir(home) and os.access(home, os.W_OK):
        return os.path.join(home, ".local", "state", "sockgraft")
    return f"/var/tmp/sockgraft-{host_uid()}/state"


def _user_runtime_dir() -> str:
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(xdg, "sockgraft")
    return f"/tmp/sockgraft-{host_uid()}"


def default_state_dir() -> str:
    return os.environ.get("GRAFT_STATE_DIR") or (SYSTEM_STATE_DIR if privileged() else _user_state_dir())


def default_runtime_dir() -> str:
    return os.environ.get("GRAFT_RUNTIME_DIR") or (SYSTEM_RUNTIME_DIR if privileged() else _user_runtime_dir())


# module-level defaults, as the commands' --state-dir/--runtime-dir show them
STATE_DIR = SYSTEM_STATE_DIR if privileged() else _user_state_dir()
RUNTIME_DIR = default_runtime_dir()
AGENT_SOCKET = os.path.join(RUNTIME_DIR, "agent.sock")


def state_dir(explicit: str | None = None) -> str:
    return explicit or os.environ.get("GRAFT_STATE_DIR") or STATE_DIR


def ensure_private_dir(path: str) -> str:
    """Make `path` (mode 700 when new); refuse one that another user owns (a shared /tmp)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this user")
    return path


def write_json(path: str, obj, mode: int = 0o600) -> None:
    """Replace `path` with `obj` as JSON atomically: a reader sees the old file or the new one,
    never a part; concurrent writers each write their own temporary file. Its directory must exist."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def check_user_dirs(state: str | None = None) -> None:
    """Rootless: the fallbacks in shared /tmp and /var/tmp must be this user's own (someone else's
    pre-made dir would hold this user's tables or sockets)."""
    state = state_dir(state)
    for fallback in (f"/var/tmp/sockgraft-{host_uid()}", f"/tmp/sockgraft-{host_uid()}"):
        if state == fallback or state.startswith(fallback + "/"):
            ensure_private_dir(fallback)
    ensure_private_dir(default_runtime_dir())


def fd_socket_path(runtime_dir: str, key: str) -> str:
    """graftd's fd-service socket for one container."""
    path = os.path.join(runtime_dir, "fd", key.replace("/", "_") + ".sock")
    if len(path.encode()) > 107:  # sun_path: a long key gets a short, stable name
        path = os.path.join(runtime_dir, "fd", "h-" + hashlib.sha256(key.encode()).hexdigest()[:24] + ".sock")
    return path
