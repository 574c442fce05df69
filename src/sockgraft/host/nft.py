"""nftables for host/egress.py: libnftables through ctypes (one netlink socket per process), else
`nft -f -`. Errors are EgressError (one line for the user)."""
from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading


class EgressError(Exception):
    """nftables could not be used (one line for the user)."""


class _Lib:
    """A libnftables context kept for the life of the process: a transaction costs ~0.3 ms, where
    each `nft` process costs ~15 ms (closing its netlink socket waits for the kernel)."""

    def __init__(self):
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12):  # NETLINK_NETFILTER: libnftables exits without it
            pass
        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        before = _fds()
        self.ctx = lib.nft_ctx_new(0)
        if not self.ctx:
            raise OSError("nft_ctx_new failed")
        for fd in _fds() - before:  # its netlink socket: never inherited by what we exec
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)
        self.lib = lib

    def run(self, script: str) -> str:
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, script.encode())
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode(errors="replace")
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise EgressError(_first_error(err) or f"nft failed ({rc})")
        return out


def _fds() -> set[int]:
    try:
        return {int(fd) for fd in os.listdir("/proc/self/fd")}
    except OSError:
        return set()


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if line.strip().startswith("Error:") or ": Error:" in line:
            return line.split("Error:", 1)[1].strip()
    return text.strip().splitlines()[0] if text.strip() else ""


class _Cmd:
    """The `nft` program (where libnftables cannot be loaded)."""

    def run(self, script: str) -> str:
        try:
            p = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            raise EgressError(f"cannot run nft: {e}") from None
        if p.returncode != 0:
            raise EgressError(_first_error(p.stderr) or f"nft exited {p.returncode}")
        return p.stdout


_lock = threading.Lock()
_backend: tuple[int, object] | None = None  # (pid, backend): a forked child makes its own


def net_admin() -> bool:
    """Whether this process has CAP_NET_ADMIN (libnftables prints to stderr when it has not)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 12 & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def run(script: str) -> str:
    """Run an nft script in one transaction; its output (EgressError with nft's first error)."""
    global _backend
    if not net_admin():
        raise EgressError("Operation not permitted: nftables needs CAP_NET_ADMIN (root)")
    with _lock:
        if _backend is None or _backend[0] != os.getpid():
            try:
                backend: object = _Lib()
            except (OSError, AttributeError):
                backend = _Cmd()
            _backend = (os.getpid(), backend)
        return _backend[1].run(script)
