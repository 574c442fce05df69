"""The listener keeper: seccomp listeners that outlive graftd (systemd's FileDescriptorStore, by hand).

graftd's OCI agent receives each container's seccomp listener from runc. If the listener died with
graftd, every new trapped call of a running container would fail with ENOSYS until the container
restarts. So graftd hands a duplicate of every listener it supervises to this small process, which
runs in its own session (a `kill -9` of graftd or of its process group does not reach it), one per
runtime dir, on `RUNTIME_DIR/keeper.sock` (SOCK_SEQPACKET, mode 0600, root only: SO_PEERCRED is
checked). While the keeper holds a listener the kernel keeps it alive: a trapped call made while no
graftd runs waits in the kernel and is answered by the next graftd, which adopts every entry
(SCM_RIGHTS) before its agent accepts anything new.

An entry goes when every task under its filter is gone (the listener reports POLLHUP), or when
graftd asks (`release`, `stop`). The keeper exits when it holds nothing and no graftd is connected
(a graftd that never connected: 10 s after start), and on `stop` (`graftd --stop`), which releases
everything: then the containers' trapped calls fail with ENOSYS, as they did without a keeper.
Entries whose tasks ended while no graftd was connected are reported to the next one (`gone`), so it
can forget tables that the agent itself registered; a keeper that exits with such reports leaves
them in `RUNTIME_DIR/keeper-gone.json` (`take_gone`).

Wire format: one JSON object per message, fds attached by SCM_RIGHTS.
    hello {"pid", "state_dir"}            -> {"ok", "entries": [...], "more": bool} (+fds), repeated
                                             while "more"; then the graftd is this keeper's owner
    keep {"key","pid","cid","registered"} (+1 fd) -> {"ok", "id"}
    release {"id"} / release-all / list / stop -> {"ok", ...}
Errors: {"ok": false, "error": "one line"}.
"""
from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

from sockgraft.host.children import python
from sockgraft.host.paths import write_json

SOCKET_NAME = "keeper.sock"
GONE_NAME = "keeper-gone.json"
MAX_MESSAGE = 1 << 16
BATCH = 64  # fds per message (SCM_MAX_FD is 253)
ORPHAN_GRACE = 10.0  # a keeper nobody ever connected to exits after this
CONNECT_TIMEOUT = 5.0


class KeeperError(Exception):
    """One line for the log."""


def socket_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, SOCKET_NAME)


def _send(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendmsg([data])


def _recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """One message: (object, fds); (None, []) at EOF. The fds belong to the caller."""
    cmsg = socket.CMSG_SPACE(BATCH * 4)
    data, anc, flags, _ = sock.recvmsg(MAX_MESSAGE, cmsg, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % 4])
            fds.extend(arr)
    if not data and not fds:
        return None, []
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise KeeperError("message truncated")
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise KeeperError("message is not a JSON object")
    except (ValueError, KeeperError) as e:
        for fd in fds:
            os.close(fd)
        raise KeeperError(str(e)) from None
    return obj, fds


# -- the keeper process ------------------------------------------------------------------------------
class Keeper:
    def __init__(self, runtime_dir: str, state_dir: str | None = None):
        self.runtime_dir = runtime_dir
        self.state_dir = state_dir
        self.path = socket_path(runtime_dir)
        self.entries: dict[int, dict] = {}  # id -> {"fd", "key", "pid", "cid", "registered", "since"}
        self.gone: list[dict] = []  # ended while no graftd was connected
        self.next_id = 1
        self.owner: socket.socket | None = None
        self.owner_pid: int | None = None
        self.had_owner = False
        self.started = time.monotonic()
        self.clients: dict[int, socket.socket] = {}
        self.stopping = False
        os.makedirs(runtime_dir, mode=0o755, exist_ok=True)
        # one keeper per runtime dir: a lock on the directory itself (no file left behind)
        self._dirfd = os.open(runtime_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._dirfd)
            raise KeeperError(f"another keeper serves {runtime_dir}") from None
        try:
            os.unlink(self.path)  # a killed keeper's socket
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            self.sock.bind(self.path)
        finally:
            os.umask(old)
        self._ino = os.stat(self.path).st_ino
        self.sock.listen(16)
        self.epoll = select.epoll()
        self.epoll.register(self.sock.fileno(), select.EPOLLIN)

    # -- entries ---------------------------------------------------------------------------------
    def keep(self, fd: int, meta: dict) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:seccomp notify":
            os.close(fd)
            raise KeeperError("not a seccomp listener")
        i = self.next_id
        self.next_id += 1
        self.entries[i] = {"fd": fd, "key": str(meta.get("key", "")), "pid": meta.get("pid"),
                           "cid": str(meta.get("cid", "")), "registered": bool(meta.get("registered")),
                           "since": time.time()}
        self.epoll.register(fd, 0)  # POLLHUP only: never woken by the notifications themselves
        return i

    def release(self, i: int, hangup: bool = False) -> bool:
        e = self.entries.pop(i, None)
        if e is None:
            return False
        try:
            self.epoll.unregister(e["fd"])
        except OSError:
            pass
        os.close(e["fd"])
        if hangup and self.owner is None:
            self.gone.append(self._meta(i, e))
        return True

    @staticmethod
    def _meta(i: int, e: dict) -> dict:
        return {"id": i, "key": e["key"], "pid": e["pid"], "cid": e["cid"], "registered": e["registered"]}

    # -- requests --------------------------------------------------------------------------------
    def request(self, conn: socket.socket, msg: dict, fds: list[int]) -> None:
        op = msg.get("op")
        if op == "keep":
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise KeeperError("keep needs exactly one fd")
            _send(conn, {"ok": True, "id": self.keep(fds[0], msg)})
            return
        for fd in fds:
            os.close(fd)
        if op == "hello":
            if self.owner is not None and self.owner is not conn:
                raise KeeperError(f"the keeper of {self.runtime_dir} is held by graftd pid {self.owner_pid}")
            items = sorted(self.entries.items())
            gone, self.gone = self.gone, []
            first = True
            while first or items:
                batch, items = items[:BATCH], items[BATCH:]
                reply = {"ok": True, "entries": [self._meta(i, e) for i, e in batch], "more": bool(items),
                         "pid": os.getpid()}
                if first:
                    reply["gone"] = gone
                    first = False
                _send(conn, reply, [e["fd"] for _i, e in batch])
            self.owner, self.owner_pid, self.had_owner = conn, msg.get("pid"), True
        elif op == "release":
            _send(conn, {"ok": True, "released": self.release(int(msg.get("id", 0)))})
        elif op == "release-all":
            n = len(self.entries)
            for i in list(self.entries):
                self.release(i)
            _send(conn, {"ok": True, "released": n})
        elif op == "list":
            _send(conn, {"ok": True, "pid": os.getpid(), "owner": self.owner_pid,
                         "entries": [self._meta(i, e) for i, e in sorted(self.entries.items())]})
        elif op == "stop":
            n = len(self.entries)
            for i in list(self.entries):
                self.release(i)
            _send(conn, {"ok": True, "released": n})
            self.stopping = True
        else:
            raise KeeperError(f"unknown op {op!r}")

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid not in (0, os.geteuid()):
            conn.close()
            return
        self.clients[conn.fileno()] = conn
        self.epoll.register(conn.fileno(), select.EPOLLIN)

    def _client(self, conn: socket.socket, ev: int) -> None:
        try:
            msg, fds = _recv(conn) if ev & select.EPOLLIN else (None, [])
        except KeeperError as e:
            self._reply_error(conn, str(e))
            return
        except OSError:
            msg, fds = None, []
        if msg is None:
            self._drop_client(conn)
            return
        try:
            self.request(conn, msg, fds)
        except (KeeperError, OSError, ValueError, TypeError) as e:
            self._reply_error(conn, str(e))

    def _reply_error(self, conn: socket.socket, error: str) -> None:
        try:
            _send(conn, {"ok": False, "error": error})
        except OSError:
            self._drop_client(conn)

    def _drop_client(self, conn: socket.socket) -> None:
        self.clients.pop(conn.fileno(), None)
        try:
            self.epoll.unregister(conn.fileno())
        except OSError:
            pass
        if conn is self.owner:
            self.owner, self.owner_pid = None, None
        conn.close()

    def done(self) -> bool:
        if self.stopping:
            return True
        if self.entries or self.owner is not None:
            return False
        return self.had_owner or time.monotonic() - self.started > ORPHAN_GRACE

    def run(self) -> None:
        by_fd = lambda fd: next((i for i, e in self.entries.items() if e["fd"] == fd), None)  # noqa: E731
        try:
            while not self.done():
                try:
                    events = self.epoll.poll(1.0)
                except InterruptedError:
                    continue
                for fd, ev in events:
                    if fd == self.sock.fileno():
                        self._accept()
                    elif fd in self.clients:
                        self._client(self.clients[fd], ev)
                    else:
                        i = by_fd(fd)
                        if i is not None and ev & (select.EPOLLHUP | select.EPOLLERR):
                            self.release(i, hangup=True)
        finally:
            self.close()

    def close(self) -> None:
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass
        for i in list(self.entries):
            self.release(i, hangup=not self.stopping)
        if self.gone and not self.stopping:  # for the next graftd (take_gone)
            path = os.path.join(self.runtime_dir, GONE_NAME)
            try:
                old = json.load(open(path))
            except (OSError, ValueError):
                old = []
            try:
                write_json(path, (old if isinstance(old, list) else []) + self.gone)
            except OSError:
                pass
        for conn in list(self.clients.values()):
            conn.close()
        self.sock.close()
        self.epoll.close()
        os.close(self._dirfd)  # the lock last: a new keeper may start now


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    runtime_dir = state = None
    while args:
        a = args.pop(0)
        if a == "--runtime-dir" and args:
            runtime_dir = args.pop(0)
        elif a == "--state-dir" and args:
            state = args.pop(0)
        else:
            print(f"graft-keeper: bad argument {a!r}", file=sys.stderr)
            return 2
    if not runtime_dir:
        print("graft-keeper: --runtime-dir is required", file=sys.stderr)
        return 2
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    try:
        k = Keeper(runtime_dir, state)
    except KeeperError as e:  # another keeper is there: fine, graftd talks to that one
        print(f"graft-keeper: {e}", file=sys.stderr)
        return 0
    except OSError as e:
        print(f"graft-keeper: {runtime_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    k.run()
    return 0


# -- graftd's side ------------------------------------------------------------------------------------
class Client:
    """graftd's connection to the keeper of its runtime dir (one thread at a time: callers lock)."""

    def __init__(self, sock: socket.socket, keeper_pid: int | None = None):
        self.sock = sock
        self.keeper_pid = keeper_pid

    @classmethod
    def connect(cls, runtime_dir: str) -> "Client | None":
        """The running keeper, or None (no socket, or a killed keeper's stale one)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.settimeout(CONNECT_TIMEOUT)
        try:
            s.connect(socket_path(runtime_dir))
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            return None
        except OSError:
            s.close()
            raise
        return cls(s)

    @classmethod
    def spawn(cls, runtime_dir: str, state_dir: str | None = None, timeout: float = 10.0) -> "Client":
        """Start a keeper in its own session (stdio on /dev/null: it must hold no pipe of graftd's)
        and connect to it. Returns the Popen too, as `.proc`, for graftd to reap."""
        cmd = python("-m", "sockgraft.runtime.keeper", "--runtime-dir", runtime_dir)
        if state_dir:
            cmd += ["--state-dir", state_dir]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
        deadline = time.monotonic() + timeout
        while True:
            c = cls.connect(runtime_dir)
            if c is not None:
                c.proc = proc
                return c
            if proc.poll() is not None and proc.returncode != 0:
                raise KeeperError(f"the listener keeper exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise KeeperError(f"the listener keeper did not come up on {socket_path(runtime_dir)}")
            time.sleep(0.02)

    proc: subprocess.Popen | None = None

    def call(self, msg: dict, fds: list[int] = ()) -> dict:
        _send(self.sock, msg, fds)
        reply, got = _recv(self.sock)
        for fd in got:
            os.close(fd)
        return self._check(reply)

    @staticmethod
    def _check(reply: dict | None) -> dict:
        if reply is None:
            raise KeeperError("the listener keeper hung up")
        if not reply.get("ok"):
            raise KeeperError(str(reply.get("error", "refused")))
        return reply

    def hello(self, pid: int, state_dir: str | None) -> tuple[list[tuple[int, dict]], list[dict]]:
        """Become the owner; returns [(fd, meta)] of every kept listener (the fds are the
        caller's) and what ended while no graftd was connected."""
        _send(self.sock, {"op": "hello", "pid": pid, "state_dir": state_dir})
        out: list[tuple[int, dict]] = []
        gone: list[dict] = []
        try:
            while True:
                reply, fds = _recv(self.sock)
                try:
                    reply = self._check(reply)
                    entries = reply.get("entries", [])
                    if len(entries) != len(fds):
                        raise KeeperError(f"{len(entries)} entries but {len(fds)} fds")
                except KeeperError:
                    for fd in fds:
                        os.close(fd)
                    raise
                out.extend(zip(fds, entries))
                gone.extend(reply.get("gone", []))
                self.keeper_pid = reply.get("pid")
                if not reply.get("more"):
                    return out, gone
        except BaseException:
            for fd, _m in out:
                os.close(fd)
            raise

    def keep(self, fd: int, key: str, pid: int | None, cid: str = "", registered: bool = False) -> int:
        """Hand the keeper a duplicate of listener `fd` (the caller keeps `fd`)."""
        return int(self.call({"op": "keep", "key": key, "pid": pid, "cid": cid, "registered": registered}, [fd])["id"])

    def alive(self) -> bool:
        try:
            ready = select.select([self.sock], [], [], 0)[0]
            if not ready:
                return True
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError as e:
            return e.errno == errno.EAGAIN

    def close(self) -> None:
        self.sock.close()


def take_gone(runtime_dir: str) -> list[dict]:
    """What a keeper that exited left for the next graftd: entries whose tasks all ended while no
    graftd was connected (read once, then removed)."""
    path = os.path.join(runtime_dir, GONE_NAME)
    try:
        with open(path) as f:
            gone = json.load(f)
        os.unlink(path)
    except (OSError, ValueError):
        return []
    return [g for g in gone if isinstance(g, dict)] if isinstance(gone, list) else []


def stop(runtime_dir: str) -> int | None:
    """Release every kept listener and stop the keeper of `runtime_dir`: the number released,
    or None when no keeper runs there."""
    c = Client.connect(runtime_dir)
    if c is None:
        try:
            os.unlink(socket_path(runtime_dir))  # a killed keeper's socket
        except (FileNotFoundError, PermissionError):
            pass
        return None
    try:
        return int(c.call({"op": "stop"})["released"])
    except (KeeperError, ConnectionResetError) as e:
        if isinstance(e, KeeperError) and "hung up" not in str(e):
            raise
        return 0  # it was exiting by itself (nothing held, no graftd)
    finally:
        c.close()


def listing(runtime_dir: str) -> dict | None:
    """What the keeper of `runtime_dir` holds ({"pid", "owner", "entries"}), or None."""
    c = Client.connect(runtime_dir)
    if c is None:
        return None
    try:
        return c.call({"op": "list"})
    except (KeeperError, ConnectionResetError):
        return None  # it was exiting (or was killed) as we asked
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
