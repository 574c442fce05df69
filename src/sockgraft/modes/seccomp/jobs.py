"""The thread pool of the seccomp supervisor: the only operations that may block (a *local* blocking
connect or send, performed on our duplicate of the application's own socket) run here so that the
epoll loop never waits. Jobs stay registered until they end, so that those of a dead target (the
loop's sweep) or of a closing supervisor can be aborted (shutdown of the socket) instead of
blocking a worker or the exit."""
from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from sockgraft.modes.seccomp.targets import Call, Target


class Jobs:
    def __init__(self, workers: int, hold, release, stats):
        """`hold(target)`/`release(target)` count the target's users (its listener stays open
        while a job still answers on it); `stats` is the supervisor's Counter."""
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="graft-seccomp")
        self._hold, self._release, self._stats = hold, release, stats
        self._lock = threading.Lock()
        self._running: dict[socket.socket, Call] = {}

    def submit(self, call: Call, s: socket.socket, op) -> None:
        """Run `op() -> (val, errno)` on our duplicate `s`; the job answers `call` and closes `s`."""
        t: Target = call.target
        self._hold(t)
        with self._lock:
            self._running[s] = call

        def job():
            try:
                val, err = op()
                call.send(val=val, err=err)
            except OSError:
                pass
            finally:
                with self._lock:
                    del self._running[s]
                s.close()
                self._release(t)

        self._stats["pool_jobs"] += 1
        self._pool.submit(job)

    def abort(self, only_dead: bool) -> None:
        """Unblock running jobs: all of them, or those whose notification is no longer valid."""
        with self._lock:
            for s, call in self._running.items():
                if only_dead and call.kernel.id_valid(call.target.fd, call.n.id):
                    continue
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def shutdown(self) -> None:
        self.abort(only_dead=False)
        self._pool.shutdown(wait=True)
