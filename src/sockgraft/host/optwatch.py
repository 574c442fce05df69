"""The kernel notes which socket options a container's socket was given (issue 11: the seccomp
supervisor's option copy).

A socket the seccomp supervisor replaces with a host socket takes the options its program set.
The supervisor cannot see the program's setsockopt calls (they are not trapped), so it read every
option of `core.tables.COPIED_OPTIONS` back (34 `getsockopt`s, ~12-19 µs of a grafted connect) to
find those that differ from a fresh socket's. This cgroup `setsockopt` program, attached to the
cgroup2 root (as the bind guard is, BPF_F_ALLOW_MULTI), records instead, in the socket's own BPF
storage (`BPF_MAP_TYPE_SK_STORAGE`: freed with the socket), a bit per option of that list set on
any socket outside the host's network namespace (its netns cookie, fixed at load): bit i for
COPIED_OPTIONS[i]. The supervisor reads that mask with one `bpf(MAP_LOOKUP)` on its duplicate of
the socket (no entry: none set) and copies those options only, as the preload library does with
the calls it sees. The program changes nothing: the call goes on with the caller's own value.

Options set before the program was attached are not known to it. A supervisor attaches it (once
per boot: it stays attached, its map with it) before it serves anything (`Watch`), so its targets'
sockets are all watched from their birth; and it stops using the map for good (back to reading
every option) once the program it was opened with is no longer attached (`Watch.current`, checked
at most once a second). `program()` is the pure part; `python3 -m sockgraft.host.optwatch
status|attach|detach` from a shell."""
from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
import time

from sockgraft.core.tables import COPIED_OPTIONS
from sockgraft.host import ebpf, netns

NAME = b"graft_optwatch"
SETSOCKOPT = 22  # BPF_CGROUP_SETSOCKOPT
NAMES = {SETSOCKOPT: NAME}
_PROG_TYPE_CGROUP_SOCKOPT = 25
_MAP_TYPE_SK_STORAGE = 24
_FUNC_SK_STORAGE_GET, _FUNC_GET_NETNS_COOKIE = 107, 122
_SK_STORAGE_GET_F_CREATE = 1
# struct bpf_sockopt: sk at 0, level at 24, optname at 28, optlen at 32
_SK, _LEVEL, _OPTNAME, _OPTLEN = 0, 24, 28, 32
_ATOMIC_DW, _ATOMIC_OR = 0xDB, 0x40  # BPF_STX | BPF_ATOMIC | BPF_DW; imm BPF_OR


def program(map_fd: int, host_cookie: int) -> bytes:
    """The setsockopt program: r0 = 1 always (the call goes on, optlen 0: with the caller's value)."""
    match = []
    for i, o in enumerate(COPIED_OPTIONS):
        match += [(0x55, 2, 0, f"next{i}", o.level),           # level?
                  (0x55, 3, 0, f"next{i}", o.number),          # optname?
                  ebpf.ld_imm64(7, 1 << i),
                  (0x05, 0, 0, "found", 0),
                  f"next{i}"]
    return ebpf.assemble([
        (0xBF, 6, 1, 0, 0),                        # r6 = ctx
        (0x85, 0, 0, 0, _FUNC_GET_NETNS_COOKIE),   # r0 = the socket's netns cookie
        ebpf.ld_imm64(1, host_cookie),
        (0x1D, 0, 1, "out", 0),                    # a host socket: not watched
        (0x61, 2, 6, _LEVEL, 0),
        (0x61, 3, 6, _OPTNAME, 0),
        *match,
        (0x05, 0, 0, "out", 0),                    # not an option the supervisor copies
        "found",
        (0x18, 1, 1, 0, map_fd),                   # r1 = the map (pseudo map fd)
        (0x79, 2, 6, _SK, 0),                      # r2 = ctx->sk
        (0x15, 2, 0, "out", 0),
        (0xB7, 3, 0, 0, 0),
        (0xB7, 4, 0, 0, _SK_STORAGE_GET_F_CREATE),
        (0x85, 0, 0, 0, _FUNC_SK_STORAGE_GET),
        (0x15, 0, 0, "out", 0),                    # no memory: the supervisor copies one option fewer
        (_ATOMIC_DW, 0, 7, 0, _ATOMIC_OR),         # lock *(u64 *)r0 |= r7
        "out",
        (0xB7, 1, 0, 0, 0),
        (0x63, 6, 1, _OPTLEN, 0),                  # ctx->optlen = 0: the caller's own optval
        (0xB7, 0, 0, 0, 1),
        (0x95, 0, 0, 0, 0),
    ])


def _btf() -> bytes:
    """The BTF an SK_STORAGE map must name its key and value by: [1] int (4 bytes), [2] u64."""
    strings = b"\0int\0u64\0"
    types = (struct.pack("<III", 1, 1 << 24, 4) + struct.pack("<I", (1 << 24) | 32)     # INT, signed, 32 bits
             + struct.pack("<III", 5, 1 << 24, 8) + struct.pack("<I", 64))             # INT, 64 bits
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings


def _new_map() -> int:
    blob = ctypes.create_string_buffer(_btf())
    log = ctypes.create_string_buffer(1024)
    btf = ebpf.bpf(ebpf.BTF_LOAD, struct.pack("<QQIII", ctypes.addressof(blob), ctypes.addressof(log),
                                             len(blob.raw) - 1, len(log), 1))[0]
    try:
        return ebpf.bpf(ebpf.MAP_CREATE, struct.pack("<IIIIIII16sIIII", _MAP_TYPE_SK_STORAGE, 4, 8, 0,
                                                     ebpf.F_NO_PREALLOC, 0, 0, b"graft_optset", 0, btf, 1, 2))[0]
    finally:
        os.close(btf)


def host_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return netns.netns_cookie(s)


def _attached(cg: int) -> list[tuple[int, int]]:
    return ebpf.attached(cg, SETSOCKOPT, NAME)


def active() -> bool:
    """Whether the program is attached (False where it cannot be looked at: not root)."""
    try:
        with ebpf.cgroup(None) as cg:
            return bool(_attached(cg))
    except OSError:
        return False


def map_id() -> int:
    """The id of the attached program's map (0: not attached, or attached twice)."""
    try:
        with ebpf.cgroup(None) as cg:
            found = _attached(cg)
    except OSError:
        return 0
    return found[0][1] if len(found) == 1 else 0


def ensure() -> None:
    """Attach the program once (OSError when the kernel refuses: not root, no cgroup2, no BPF)."""
    with ebpf.cgroup("optwatch.lock") as cg:
        if len(_attached(cg)) == 1:
            return
        ebpf.detach(cg, NAMES)
        fd = _new_map()
        try:
            prog = ebpf.load(_PROG_TYPE_CGROUP_SOCKOPT, SETSOCKOPT, program(fd, host_cookie()), NAME, "the option watch")
            ebpf.apply(ebpf.PROG_ATTACH, cg, prog, SETSOCKOPT, ebpf.F_ALLOW_MULTI)
        finally:
            os.close(fd)


def remove() -> None:
    with ebpf.cgroup("optwatch.lock") as cg:
        ebpf.detach(cg, NAMES)


class Watch:
    """One supervisor's view of the map: `current()` is its fd while the program it was opened
    with stays attached, -1 otherwise (or where it could not be attached: not root, no BPF)."""

    def __init__(self) -> None:
        self.fd, self.id, self.checked = -1, 0, time.monotonic()
        self.lock = threading.Lock()  # the supervisor's loop and its handlers' worker threads ask
        self.retired: list[int] = []  # fds no longer handed out (a table may still hold one): closed at close()
        try:
            ensure()
            self.id = map_id()
            self.fd = ebpf.map_fd(self.id) if self.id else -1
        except OSError:
            self.fd = -1

    def current(self) -> int:
        now = time.monotonic()
        if self.fd >= 0 and now - self.checked >= 1.0:
            with self.lock:
                if self.fd >= 0 and now - self.checked >= 1.0:
                    self.checked = now
                    if map_id() != self.id:
                        self.retired.append(self.fd)
                        self.fd = -1
        return self.fd

    def options_set(self, sock_fd: int) -> int | None:
        """The mask of COPIED_OPTIONS set on `sock_fd`, or None: not known (read them all)."""
        fd = self.current()
        if fd < 0:
            return None
        try:
            return options_set(fd, sock_fd)
        except OSError:
            return None

    def close(self) -> None:
        with self.lock:
            for fd in [self.fd, *self.retired]:
                if fd >= 0:
                    os.close(fd)
            self.fd, self.retired = -1, []


def options_set(map_fd: int, sock_fd: int) -> int:
    """The mask of COPIED_OPTIONS set on the socket `sock_fd` (0: none recorded)."""
    value = ebpf.lookup(map_fd, struct.pack("<i", sock_fd), 8)
    return 0 if value is None else struct.unpack("<Q", value)[0]


def main(argv: list[str]) -> int:
    """`python3 -m sockgraft.host.optwatch status|attach|detach` (detach: when removing sockgraft
    from a machine; a seccomp supervisor attaches it again when it starts)."""
    return ebpf.command("optwatch", argv, ensure, remove, active)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
