"""The OCI seccomp agent: what runc/crun send to `linux.seccomp.listenerPath`.

The runtime connects to the agent's unix stream socket once per filtered process (the container's
init at create, each `exec` later) and sends the container process state as JSON in one message
with the seccomp listener fd attached (SCM_RIGHTS). runc closes the connection only when it exits
(`runc run` lives as long as the container), so the message ends where the JSON document does:

    {"ociVersion": "1.0.2", "fds": ["seccompFd"], "pid": 4242, "metadata": "sockgraft",
     "state": {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 4242,
               "bundle": "/path", "annotations": {"io.sockgraft.endpoints": "..."}}}

`fds` names the passed descriptors in order. The agent finds the container's table by the netns of
`pid` (the key graft-runtime registered it under); a container whose runtime pointed it here
without graft-runtime is registered from its annotations and forgotten when its last listener
goes. The listener fd then belongs to the seccomp supervisor; a duplicate goes to the listener
keeper first (`keep`, see keeper.py), so that a restarted graftd adopts it.
"""
from __future__ import annotations

import array
import json
import os
import selectors
import socket
import threading
from dataclasses import dataclass, field

from sockgraft.host import netns
from sockgraft.core.endpoint import SpecError
from sockgraft.host.store import Store
from sockgraft.runtime import annotations

MAX_MESSAGE = 1 << 20
MAX_FDS = 16
RECV_TIMEOUT = 5.0
SECCOMP_FD_NAME = "seccompFd"


class AgentError(Exception):
    """A message the agent cannot use (one line for the log)."""


@dataclass
class ProcessState:
    pid: int
    container_id: str
    status: str
    bundle: str
    annotations: dict[str, str]
    metadata: str
    listener_fd: int
    extra_fds: list[int] = field(default_factory=list)


def parse_message(data: bytes, fds: list[int]) -> ProcessState:
    """Validate one ContainerProcessState message and pick out the seccomp listener fd.
    On error the caller still owns (and must close) `fds`."""
    try:
        msg = json.loads(data)
    except ValueError as e:
        raise AgentError(f"container process state is not JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("state"), dict):
        raise AgentError("container process state without a `state` object")
    names = msg.get("fds")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AgentError("container process state without an `fds` list")
    if len(names) != len(fds):
        raise AgentError(f"`fds` names {len(names)} descriptors but {len(fds)} arrived")
    if SECCOMP_FD_NAME not in names:
        raise AgentError(f"no {SECCOMP_FD_NAME} among the passed descriptors {names}")
    state = msg["state"]
    pid = msg.get("pid", state.get("pid"))
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise AgentError(f"bad pid {pid!r}")
    cid = state.get("id")
    if not isinstance(cid, str) or not cid:
        raise AgentError("state without a container id")
    ann = state.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise AgentError("annotations must map strings to strings")
    i = names.index(SECCOMP_FD_NAME)
    return ProcessState(
        pid=pid,
        container_id=cid,
        status=str(state.get("status", "")),
        bundle=str(state.get("bundle", "")),
        annotations=ann,
        metadata=str(msg.get("metadata", "")),
        listener_fd=fds[i],
        extra_fds=[fd for j, fd in enumerate(fds) if j != i],
    )


def _complete(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """One message of the runtime: data and fds. It ends at EOF or as soon as the data is a whole
    JSON document: `runc run` keeps the connection open while the container runs."""
    conn.settimeout(RECV_TIMEOUT)
    data, fds = bytearray(), []
    cmsg_space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    try:
        while True:
            chunk, ancdata, flags, _ = conn.recvmsg(65536, cmsg_space, socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            if flags & socket.MSG_CTRUNC:
                raise AgentError("too many descriptors in one message")
            if not chunk:
                return bytes(data), fds
            data += chunk
            if len(data) > MAX_MESSAGE:
                raise AgentError("container process state too large")
            if data.rstrip().endswith(b"}") and _complete(data):
                return bytes(data), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class Agent:
    """Accepts the runtime's connections on `path` and hands each listener to the supervisor.

    `supervisor` has `add_listener(fd, container_key, pid)`; `on_event(event, **fields)` logs;
    `keep(fd, key, pid, container_id, registered)`, if given, keeps a duplicate of each listener
    before the supervisor takes it (it must not close `fd`)."""

    def __init__(self, path: str, store: Store, supervisor, on_event=None, keep=None):
        self.path = path
        self.keep = keep
        self.store = store
        self.supervisor = supervisor
        self.on_event = on_event or (lambda event, **fields: None)
        self.registered: dict[str, str] = {}  # key -> container id, for containers the agent registered
        self.lock = threading.Lock()
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)  # only root (the runtime) may hand containers to graftd
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(64)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None

    # -- one connection --------------------------------------------------------------------------
    def handle(self, conn: socket.socket) -> str | None:
        """Receive, identify, supervise. Returns the container key (None when refused)."""
        try:
            data, fds = receive(conn)
        except (AgentError, OSError) as e:
            self.on_event("agent-error", error=str(e))
            return None
        try:
            ps = parse_message(data, fds)
        except AgentError as e:
            for fd in fds:
                os.close(fd)
            self.on_event("agent-error", error=str(e))
            return None
        for fd in ps.extra_fds:
            os.close(fd)
        try:
            kind = os.readlink(f"/proc/self/fd/{ps.listener_fd}")
            if kind != "anon_inode:seccomp notify":
                raise AgentError(f"{SECCOMP_FD_NAME} is not a seccomp listener ({kind})")
            key = self.identify(ps)
        except (SpecError, AgentError, OSError) as e:
            os.close(ps.listener_fd)  # its trapped syscalls now fail with ENOSYS: never ungrafted
            self.on_event("agent-refused", container_id=ps.container_id, pid=ps.pid, error=str(e))
            return None
        if self.keep is not None:
            with self.lock:
                registered = key in self.registered
            self.keep(ps.listener_fd, key, ps.pid, ps.container_id, registered)
        self.supervisor.add_listener(ps.listener_fd, key, ps.pid)
        self.on_event("agent-listener", container=key, container_id=ps.container_id, pid=ps.pid, status=ps.status)
        return key

    def identify(self, ps: ProcessState) -> str:
        """The table key of the container of `ps`: its netns, as graft-runtime registered it."""
        c = netns.by_pid(ps.pid)
        row = self.store.container(c.key)
        if row is not None and row.netns_ino == c.ino:
            return c.key
        if row is not None:
            raise AgentError(f"table {c.key} belongs to another network namespace (inode {row.netns_ino}, not {c.ino})")
        # not created through graft-runtime: the annotations in the state are the table
        spec = annotations.parse(ps.annotations)
        self.store.install(c.key, c.ino, "seccomp", spec.endpoints, spec.ingress, spec.egress, fresh=True)
        with self.lock:
            self.registered[c.key] = ps.container_id
        return c.key

    def container_gone(self, key: str) -> None:
        """The supervisor saw the last listener of `key` hang up."""
        with self.lock:
            cid = self.registered.pop(key, None)
        if cid is not None:
            self.store.forget(key)
            self.on_event("agent-forget", container=key, container_id=cid)

    # -- the loop --------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "accept")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                for k, _ in sel.select():
                    if k.data == "stop":
                        return
                    try:
                        conn, _ = self.sock.accept()
                    except OSError:
                        continue
                    with conn:
                        try:
                            self.handle(conn)
                        except Exception as e:  # one bad container must not stop the agent
                            self.on_event("agent-error", error=f"{type(e).__name__}: {e}")
        finally:
            sel.close()

    def start_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve_forever, name="graft-oci-agent", daemon=True)
        self._thread.start()
        return self._thread

    def close(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        self.sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
