"""`graft run --mode seccomp`: the launcher side. It installs the filter in the child (after the child
entered the container netns, before exec) and hands the listener to a Supervisor in this process,
which lives in the host netns.

Hand-over without SCM_RIGHTS (the filtered child's own sendmsg is not trapped today, but the
launcher must not depend on that): the child writes "PID FD" on a pipe and waits; the parent takes
the listener with pidfd_getfd(pidfd_open(PID), FD), gives it to the supervisor and acknowledges;
only then does the child exec (the listener fd is close-on-exec in the child).

The filter traps what the container's table needs (`core.tables.trapped_for`), read from the store
at launch: a table changed later (rules added to an empty one) needs a new `graft run`.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import threading

from sockgraft.core.endpoint import SpecError
from sockgraft.core.tables import trapped_for
from sockgraft.host.store import Store
from sockgraft.modes.base import Attach
from sockgraft.modes.seccomp import kernel as K
from sockgraft.modes.seccomp.bpf import filter_program
from sockgraft.modes.seccomp.supervisor import Supervisor

PR_SET_NO_NEW_PRIVS = 38
FILTER_FLAGS = K.SECCOMP_FILTER_FLAG_NEW_LISTENER | K.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV


def install_in_child(prog: bytes) -> int:
    """Install the filter in the calling process; returns the listener fd (close-on-exec)."""
    try:
        return K.install_filter(prog, FILTER_FLAGS)
    except PermissionError:
        # without CAP_SYS_ADMIN seccomp needs no_new_privs
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise
        return K.install_filter(prog, FILTER_FLAGS)


class SeccompAttach(Attach):
    name = "seccomp"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.supervisor: Supervisor | None = None
        self._pipes: list[int] = []
        self._error: str | None = None

    def prepare(self) -> None:
        try:
            K.check_arch()
        except K.UnsupportedArch as e:
            raise SpecError(str(e)) from None
        with Store(self.ctx.spec.state_dir) as store:  # the table as installed (shared netns: merged)
            policy = store.policy(self.ctx.container.key)
        self.trapped = trapped_for(bool(policy.endpoints), bool(policy.ingress))
        self.prog = filter_program(self.trapped).assemble()
        self.supervisor = Supervisor(self.ctx.spec.state_dir)
        self.supervisor.start_thread()

    def preexec(self) -> None:
        # runs in the child, in the container netns; only async-signal-safe-ish work here
        try:
            fd = install_in_child(self.prog)
            msg = f"{os.getpid()} {fd}\n"
        except OSError as e:
            msg = f"ERR seccomp filter: {e.strerror or e}\n"
        os.write(self._hand_w, msg.encode())
        if msg.startswith("ERR") or os.read(self._ack_r, 1) != b"1":
            os._exit(126)

    def _take_listener(self) -> None:
        """Parent side of the hand-over (a thread: Popen blocks until the child execs)."""
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(self._hand_r, 256)
            if not chunk:
                return
            line += chunk
        text = line.decode().strip()
        ok = b"0"
        try:
            if text.startswith("ERR"):
                self._error = text[4:]
                return
            pid, fd = map(int, text.split())
            pidfd = os.pidfd_open(pid)
            try:
                listener = K.pidfd_getfd(pidfd, fd)
            finally:
                os.close(pidfd)
            self.supervisor.add_listener(listener, self.ctx.container.key, pid)
            ok = b"1"
        except OSError as e:
            self._error = f"cannot take the seccomp listener: {e.strerror or e}"
        finally:
            try:
                os.write(self._ack_w, ok)
            except OSError:
                pass

    def spawn(self, preexec) -> subprocess.Popen:
        self._hand_r, self._hand_w = os.pipe()
        self._ack_r, self._ack_w = os.pipe()
        self._pipes = [self._hand_r, self._hand_w, self._ack_r, self._ack_w]
        taker = threading.Thread(target=self._take_listener, name="graft-seccomp-handover", daemon=True)
        taker.start()
        try:
            proc = subprocess.Popen(self.ctx.spec.cmd, env=self.ctx.env, preexec_fn=preexec)
        except subprocess.SubprocessError:
            proc = None
        finally:
            os.close(self._hand_w)  # EOF for the taker if the child never wrote
            self._pipes.remove(self._hand_w)
            taker.join(10)
        self._close_pipes()  # the hand-over is over either way
        if self._error or proc is None:
            if proc is not None:
                proc.kill()
                proc.wait()
            raise SpecError(self._error or "the command could not be started under the seccomp filter")
        return proc

    def _close_pipes(self) -> None:
        for fd in self._pipes:
            try:
                os.close(fd)
            except OSError:
                pass
        self._pipes = []

    def cleanup(self) -> None:
        self._close_pipes()
        if self.supervisor is not None:
            self.supervisor.close()
            self.supervisor = None
