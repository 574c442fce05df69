"""The kernel refuses bind() on a host socket made for a container (issue 11, pools).

A socket bound with IP_BIND_ADDRESS_NO_PORT and not yet connected can be bound AGAIN by whoever
holds it, to any host address and port (KERNEL-NOTES). The product binds a host socket before it
marks it (core.tables.MARK_TAG); a cgroup `bind4`/`bind6` BPF program attached to the cgroup2 root
then answers EPERM to every later bind() of a socket whose mark carries the tag. cgroup hooks run
for the cgroup that created the socket (graftd's, any), hence the root and BPF_F_ALLOW_MULTI, and the
key is the socket's own mark, which a container cannot change (SO_MARK needs CAP_NET_ADMIN in the
host's user namespace). Only sockets with our tag are judged: every other bind is allowed.

`program()` is the pure part (the instructions); the rest is the bpf(2) plumbing: `ensure()`
attaches the two programs once per boot (they stay attached after this process exits), `active()`
says whether they are there, `remove()` detaches them (`python3 -m sockgraft.host.bindguard
status|attach|detach` from a shell)."""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import struct

from sockgraft.core.tables import MARK_MASK, MARK_TAG
from sockgraft.host.paths import RUNTIME_DIR

NAMES = {8: b"graft_bind4", 9: b"graft_bind6"}  # BPF_CGROUP_INET4_BIND, BPF_CGROUP_INET6_BIND

_SYS_BPF = 321  # x86_64
_PROG_LOAD, _PROG_ATTACH, _PROG_DETACH, _PROG_GET_FD_BY_ID, _OBJ_GET_INFO_BY_FD, _PROG_QUERY = 5, 8, 9, 13, 15, 16
_PROG_TYPE_CGROUP_SOCK_ADDR = 18
_F_ALLOW_MULTI = 2
_SK_OFFSET = 64  # offsetof(struct bpf_sock_addr, sk)
_MARK_OFFSET = 16  # offsetof(struct bpf_sock, mark)
_SRC_PORT_OFFSET = 44  # offsetof(struct bpf_sock, src_port) (host order)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _s32(v: int) -> int:
    return struct.unpack("<i", struct.pack("<I", v & 0xFFFFFFFF))[0]


def program(tag: int = MARK_TAG, mask: int = MARK_MASK) -> bytes:
    """r0 = 0 (EPERM) when (ctx->sk->mark & mask) == tag and the socket has no port yet (unbound,
    or bound with IP_BIND_ADDRESS_NO_PORT); else 1: the bind goes on (a socket that has a port gets
    the kernel's own EINVAL, as natively)."""
    return b"".join([
        _insn(0x79, 2, 1, _SK_OFFSET),           # 0: r2 = ctx->sk
        _insn(0x15, 2, 0, 5, 0),                 # 1: if r2 == 0 goto allow
        _insn(0x61, 3, 2, _MARK_OFFSET),         # 2: r3 = sk->mark
        _insn(0x54, 3, 0, 0, _s32(mask)),        # 3: w3 &= mask
        _insn(0x56, 3, 0, 2, _s32(tag)),         # 4: if w3 != tag goto allow
        _insn(0x61, 3, 2, _SRC_PORT_OFFSET),     # 5: r3 = sk->src_port
        _insn(0x15, 3, 0, 2, 0),                 # 6: if r3 == 0 goto deny
        _insn(0xB7, 0, 0, 0, 1),                 # 7: allow: r0 = 1
        _insn(0x95),                             # 8: exit
        _insn(0xB7, 0, 0, 0, 0),                 # 9: deny: r0 = 0
        _insn(0x95),                             # 10: exit
    ])


# -- bpf(2) ------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(attr, 128)
    r = _libc.syscall(_SYS_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf: {os.strerror(e)}")
    return r, buf.raw


def _cgroup2_root() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, where, fstype = line.split()[:3]
            if fstype == "cgroup2":
                return where
    raise OSError(2, "no cgroup2 hierarchy is mounted")


def _name_of(prog_id: int) -> bytes:
    fd, _ = _bpf(_PROG_GET_FD_BY_ID, struct.pack("<I", prog_id))
    try:
        info = ctypes.create_string_buffer(256)
        _bpf(_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, 256, ctypes.addressof(info)))
        return info.raw[64:80].rstrip(b"\0")
    finally:
        os.close(fd)


def _attached(cg: int, attach_type: int) -> list[int]:
    """Ids of our programs attached to the cgroup for this hook."""
    ids = (ctypes.c_uint32 * 64)()
    _, out = _bpf(_PROG_QUERY, struct.pack("<IIIIQI", cg, attach_type, 0, 0, ctypes.addressof(ids), 64))
    count = struct.unpack_from("<I", out, 24)[0]
    return [i for i in ids[:min(count, 64)] if _name_of(i) == NAMES[attach_type]]


def _load(attach_type: int) -> int:
    insns = program()
    code = ctypes.create_string_buffer(insns)
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = struct.pack("<IIQQIIQII16sII", _PROG_TYPE_CGROUP_SOCK_ADDR, len(insns) // 8, ctypes.addressof(code),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0, NAMES[attach_type], 0,
                       attach_type)
    try:
        return _bpf(_PROG_LOAD, attr)[0]
    except OSError as e:
        raise OSError(e.errno, f"loading the bind guard: {e.strerror}: {log.value.decode(errors='replace')[:200]}") from None


@contextlib.contextmanager
def _cgroup(locked: bool = True):
    """The cgroup2 root's fd, under the lock that makes two processes starting at once attach one
    copy (`locked`)."""
    cg = os.open(_cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    lock = -1
    try:
        if locked:
            os.makedirs(RUNTIME_DIR, exist_ok=True)
            lock = os.open(os.path.join(RUNTIME_DIR, "bindguard.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield cg
    finally:
        if lock >= 0:
            os.close(lock)
        os.close(cg)


def _apply(cmd: int, cg: int, prog_fd: int, attach_type: int, flags: int) -> None:
    """Attach or detach one program; the fd is closed (an attachment holds its program)."""
    try:
        _bpf(cmd, struct.pack("<IIII", cg, prog_fd, attach_type, flags))
    finally:
        os.close(prog_fd)


def active() -> bool:
    """Whether both programs are attached (False where they cannot be looked at: not root)."""
    try:
        with _cgroup(locked=False) as cg:
            return all(_attached(cg, t) for t in NAMES)
    except OSError:
        return False


def ensure() -> None:
    """Attach what is missing (OSError when the kernel refuses: not root, no cgroup2, no BPF)."""
    with _cgroup() as cg:
        for t in NAMES:
            if not _attached(cg, t):
                _apply(_PROG_ATTACH, cg, _load(t), t, _F_ALLOW_MULTI)


def remove() -> None:
    """Detach our programs (every copy)."""
    with _cgroup() as cg:
        for t in NAMES:
            for prog_id in _attached(cg, t):
                _apply(_PROG_DETACH, cg, _bpf(_PROG_GET_FD_BY_ID, struct.pack("<I", prog_id))[0], t, 0)


def main(argv: list[str]) -> int:
    """`python3 -m sockgraft.host.bindguard status|attach|detach` (detach: when removing sockgraft
    from a machine; graftd and the fd service attach it again when they start)."""
    import sys

    verbs = {"status": None, "attach": ensure, "detach": remove}
    if len(argv) != 1 or argv[0] not in verbs:
        print("usage: python3 -m sockgraft.host.bindguard status|attach|detach", file=sys.stderr)
        return 2
    try:
        if verbs[argv[0]] is not None:
            verbs[argv[0]]()
    except OSError as e:
        print(f"bindguard: {argv[0]}: {e.strerror or e}", file=sys.stderr)
        return 1
    print("attached" if active() else "detached")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
