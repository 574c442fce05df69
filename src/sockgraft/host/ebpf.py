"""bpf(2) plumbing shared by the cgroup programs sockgraft attaches to the cgroup2 root
(host/bindguard.py: who may bind a host socket; host/optwatch.py: which options a container's
socket was given): an assembler with labels, loading, attaching and finding programs by name, map
access. The programs themselves are written where they are used."""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import struct

from sockgraft.host.paths import RUNTIME_DIR

SYS_BPF = 321  # x86_64
MAP_CREATE, MAP_LOOKUP, MAP_UPDATE, MAP_DELETE, MAP_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, PROG_ATTACH, PROG_DETACH, PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID = 5, 8, 9, 13, 14
OBJ_GET_INFO_BY_FD, PROG_QUERY, BTF_LOAD = 15, 16, 18
F_NO_PREALLOC, F_ALLOW_MULTI = 1, 2
LD_IMM64 = 0x18  # the one 16-byte instruction

_libc = ctypes.CDLL(None, use_errno=True)


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def s32(v: int) -> int:
    return struct.unpack("<i", struct.pack("<I", v & 0xFFFFFFFF))[0]


def assemble(lines: list) -> bytes:
    """Instructions with symbolic jump targets: an item is a label (str) or (code, dst, src, off, imm)
    where a str `off` names a label; a 16-byte ld_imm64 counts as two (its imm: the low 32 bits, or
    a pseudo map fd; a sixth item: the high 32 bits)."""
    at, n = {}, 0
    for item in lines:
        if isinstance(item, str):
            at[item] = n
        else:
            n += 2 if item[0] == LD_IMM64 else 1
    out, n = [], 0
    for item in lines:
        if isinstance(item, str):
            continue
        code, dst, src, off, imm, *high = item
        if isinstance(off, str):
            off = at[off] - n - 1
        out.append(insn(code, dst, src, off, imm))
        n += 1
        if code == LD_IMM64:
            out.append(insn(0, imm=high[0] if high else 0))
            n += 1
    return b"".join(out)


def ld_imm64(dst: int, value: int) -> tuple:
    """dst = a 64-bit constant."""
    return (LD_IMM64, dst, 0, 0, s32(value), s32(value >> 32))


def bpf(cmd: int, attr: bytes) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(attr, 128)
    r = _libc.syscall(SYS_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf: {os.strerror(e)}")
    return r, buf.raw


def cgroup2_root() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, where, fstype = line.split()[:3]
            if fstype == "cgroup2":
                return where
    raise OSError(2, "no cgroup2 hierarchy is mounted")


def prog_info(prog_id: int) -> tuple[bytes, int]:
    """A program's name and the id of its first map (0: none)."""
    fd, _ = bpf(PROG_GET_FD_BY_ID, struct.pack("<I", prog_id))
    try:
        info, maps = ctypes.create_string_buffer(256), (ctypes.c_uint32 * 1)()
        struct.pack_into("<IQ", info, 52, 1, ctypes.addressof(maps))  # nr_map_ids, map_ids
        bpf(OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, 256, ctypes.addressof(info)))
        count = struct.unpack_from("<I", info.raw, 52)[0]
        return info.raw[64:80].rstrip(b"\0"), maps[0] if count else 0
    finally:
        os.close(fd)


def attached(cg: int, attach_type: int, name: bytes) -> list[tuple[int, int]]:
    """(id, map id) of the programs called `name` attached to the cgroup for this hook."""
    ids = (ctypes.c_uint32 * 64)()
    _, out = bpf(PROG_QUERY, struct.pack("<IIIIQI", cg, attach_type, 0, 0, ctypes.addressof(ids), 64))
    count = struct.unpack_from("<I", out, 24)[0]
    found = []
    for prog_id in ids[:min(count, 64)]:
        got, map_id = prog_info(prog_id)
        if got == name:
            found.append((prog_id, map_id))
    return found


def load(prog_type: int, attach_type: int, insns: bytes, name: bytes, what: str) -> int:
    """A loaded program's fd (GPL: its helpers need it); `what` names it in the error, which
    carries the verifier's last words (asked for only after a failure: a full log of a long
    program does not fit a small buffer, ENOSPC)."""
    code = ctypes.create_string_buffer(insns)
    lic = ctypes.create_string_buffer(b"GPL")

    def attempt(log) -> int:
        attr = struct.pack("<IIQQIIQII16sII", prog_type, len(insns) // 8, ctypes.addressof(code),
                           ctypes.addressof(lic), 1 if log is not None else 0, len(log) if log is not None else 0,
                           ctypes.addressof(log) if log is not None else 0, 0, 0, name, 0, attach_type)
        return bpf(PROG_LOAD, attr)[0]
    try:
        return attempt(None)
    except OSError as e:
        log = ctypes.create_string_buffer(1 << 20)
        with contextlib.suppress(OSError):
            os.close(attempt(log))
        words = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise OSError(e.errno, f"loading {what}: {e.strerror}: {' | '.join(words)[:300]}") from None


@contextlib.contextmanager
def cgroup(lock_name: str | None):
    """The cgroup2 root's fd, under the lock file `lock_name` (None: no lock) that makes two
    processes starting at once attach one copy."""
    cg = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    lock = -1
    try:
        if lock_name:
            os.makedirs(RUNTIME_DIR, exist_ok=True)
            lock = os.open(os.path.join(RUNTIME_DIR, lock_name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield cg
    finally:
        if lock >= 0:
            os.close(lock)
        os.close(cg)


def apply(cmd: int, cg: int, prog_fd: int, attach_type: int, flags: int) -> None:
    """Attach or detach one program; the fd is closed (an attachment holds its program)."""
    try:
        bpf(cmd, struct.pack("<IIII", cg, prog_fd, attach_type, flags))
    finally:
        os.close(prog_fd)


def detach(cg: int, names: dict[int, bytes]) -> None:
    """Detach every program named names[attach_type] from its hook."""
    for t, name in names.items():
        for prog_id, _ in attached(cg, t, name):
            apply(PROG_DETACH, cg, bpf(PROG_GET_FD_BY_ID, struct.pack("<I", prog_id))[0], t, 0)


def map_fd(map_id: int) -> int:
    return bpf(MAP_GET_FD_BY_ID, struct.pack("<I", map_id))[0]


def lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under `key`, or None (ENOENT)."""
    kb, vb = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    try:
        bpf(MAP_LOOKUP, struct.pack("<IIQQ", fd, 0, ctypes.addressof(kb), ctypes.addressof(vb)))
    except OSError as e:
        if e.errno == 2:
            return None
        raise
    return vb.raw


def command(name: str, argv: list[str], ensure, remove, active) -> int:
    """`python3 -m sockgraft.host.NAME status|attach|detach` for a program attached by `ensure`."""
    import sys

    verbs = {"status": None, "attach": ensure, "detach": remove}
    if len(argv) != 1 or argv[0] not in verbs:
        print(f"usage: python3 -m sockgraft.host.{name} status|attach|detach", file=sys.stderr)
        return 2
    try:
        if verbs[argv[0]] is not None:
            verbs[argv[0]]()
    except OSError as e:
        print(f"{name}: {argv[0]}: {e.strerror or e}", file=sys.stderr)
        return 1
    print("attached" if active() else "detached")
    return 0
