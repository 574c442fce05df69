"""The kernel judges bind() on the host sockets made for containers (issue 11, pools).

A socket bound with IP_BIND_ADDRESS_NO_PORT and not yet connected can be bound AGAIN by whoever
holds it, to any host address and port (KERNEL-NOTES). A cgroup `bind4`/`bind6` BPF program attached
to the cgroup2 root judges every bind() by the socket's own mark, which a container cannot change
(SO_MARK needs CAP_NET_ADMIN in the host's user namespace); cgroup hooks run for the cgroup that
created the socket (graftd's, any), hence the root and BPF_F_ALLOW_MULTI:

- MARK_TAG | n (a socket the product bound, then marked): EPERM while it has no port (unbound, or
  bound with IP_BIND_ADDRESS_NO_PORT); one with a port gets the kernel's own EINVAL;
- UNBOUND_TAG | n (handed over unbound by the fd service's `bindpool`/`namedpool`): allowed only to an address
  and port in the GRANTS map under container n - its endpoints (`keys`), kept equal to the store by
  host/egress.sync - and the program then marks it MARK_TAG | n before the bind goes on; anything
  else is EPERM;
- every other socket: not judged.

`program()` is the pure part (the instructions); the rest is the bpf(2) plumbing: `ensure()`
attaches the two programs once per boot (they stay attached after this process exits, the map with
them) and replaces the first version's (which knew no map), `active()` says whether they are there,
`remove()` detaches them (`python3 -m sockgraft.host.bindguard status|attach|detach` from a
shell), `sync()` / `holds()` write and read one store's entries of the map."""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import struct

from sockgraft.core.tables import MARK_MASK, MARK_TAG, UNBOUND_TAG
from sockgraft.host.paths import RUNTIME_DIR

NAMES = {8: b"graft_bind4_2", 9: b"graft_bind6_2"}  # BPF_CGROUP_INET4_BIND, BPF_CGROUP_INET6_BIND
OLD_NAMES = {8: b"graft_bind4", 9: b"graft_bind6"}  # the first version's: detached by ensure()

_SYS_BPF = 321  # x86_64
_MAP_CREATE, _MAP_LOOKUP, _MAP_UPDATE, _MAP_DELETE, _MAP_NEXT_KEY = 0, 1, 2, 3, 4
_PROG_LOAD, _PROG_ATTACH, _PROG_DETACH, _PROG_GET_FD_BY_ID, _MAP_GET_FD_BY_ID = 5, 8, 9, 13, 14
_OBJ_GET_INFO_BY_FD, _PROG_QUERY = 15, 16
_MAP_TYPE_HASH, _F_NO_PREALLOC = 1, 1
_PROG_TYPE_CGROUP_SOCK_ADDR = 18
_F_ALLOW_MULTI = 2
_FUNC_MAP_LOOKUP, _FUNC_SETSOCKOPT = 1, 49
_SOL_SOCKET, _SO_MARK = 1, 36
# struct bpf_sock_addr: user_ip4 at 4, user_ip6[4] at 8, user_port at 24 (network order), sk at 64;
# struct bpf_sock: mark at 16, src_port at 44 (host order)
_USER_IP4, _USER_IP6, _USER_PORT, _SK = 4, 8, 24, 64
_MARK, _SRC_PORT = 16, 44
KEY_SIZE, VALUE_SIZE = 24, 8  # key: u32 mark (MARK_TAG | n), port as user_port holds it, 16-byte address
MAX_GRANTS = 65536  # endpoints of all containers of all stores on this machine


def key(mark: int, addr: str, port: int) -> bytes:
    """The map key of endpoint (addr, port) of the container whose sockets carry `mark`; an IPv4
    address as its v4-mapped IPv6 form, which is also what a dual-stack socket binds."""
    ip = ipaddress.ip_address(addr)
    packed = (b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip.packed
    return struct.pack("<I", mark) + struct.pack("!H2x", port) + packed


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _s32(v: int) -> int:
    return struct.unpack("<i", struct.pack("<I", v & 0xFFFFFFFF))[0]


def _assemble(lines: list) -> bytes:
    """Instructions with symbolic jump targets: an item is a label (str) or (code, dst, src, off, imm)
    where a str `off` names a label; a 16-byte ld_imm64 counts as two."""
    at, n = {}, 0
    for item in lines:
        if isinstance(item, str):
            at[item] = n
        else:
            n += 2 if item[0] == 0x18 else 1
    out, n = [], 0
    for item in lines:
        if isinstance(item, str):
            continue
        code, dst, src, off, imm = item
        if isinstance(off, str):
            off = at[off] - n - 1
        out.append(_insn(code, dst, src, off, imm))
        n += 1
        if code == 0x18:
            out.append(_insn(0))
            n += 1
    return b"".join(out)


def program(attach_type: int, map_fd: int, tag: int = MARK_TAG, unbound: int = UNBOUND_TAG,
            mask: int = MARK_MASK) -> bytes:
    """The bind program for BPF_CGROUP_INET4_BIND (8) or _INET6_BIND (9), looking grants up in the
    map `map_fd`: r0 = 1 lets the bind go on, r0 = 0 answers EPERM (see the module's text)."""
    if attach_type == 8:  # the v4-mapped form: ::ffff:a.b.c.d
        address = [(0x62, 10, 0, -16, 0), (0x62, 10, 0, -12, 0), (0x62, 10, 0, -8, _s32(0xFFFF0000)),
                   (0x61, 4, 6, _USER_IP4, 0), (0x63, 10, 4, -4, 0)]
    else:
        address = [op for i in range(4) for op in ((0x61, 4, 6, _USER_IP6 + 4 * i, 0), (0x63, 10, 4, -16 + 4 * i, 0))]
    return _assemble([
        (0xBF, 6, 1, 0, 0),                     # r6 = ctx
        (0x79, 2, 6, _SK, 0),                   # r2 = ctx->sk
        (0x15, 2, 0, "allow", 0),               # no socket: not ours
        (0x61, 3, 2, _MARK, 0),                 # r3 = sk->mark
        (0xBC, 4, 3, 0, 0),                     # w4 = w3
        (0x54, 4, 0, 0, _s32(mask)),            # w4 &= mask
        (0x16, 4, 0, "marked", _s32(tag)),      # MARK_TAG: judged by its port
        (0x56, 4, 0, "allow", _s32(unbound)),   # neither tag: not ours
        (0x54, 3, 0, 0, _s32(~mask)),           # UNBOUND_TAG | n: the key's mark is MARK_TAG | n
        (0x44, 3, 0, 0, _s32(tag)),
        (0x63, 10, 3, -24, 0),                  # key.mark
        (0x61, 4, 6, _USER_PORT, 0),
        (0x63, 10, 4, -20, 0),                  # key.port
        *address,                               # key.addr
        (0x18, 1, 1, 0, map_fd),                # r1 = the map (pseudo map fd)
        (0xBF, 2, 10, 0, 0),
        (0x07, 2, 0, 0, -24),                   # r2 = &key
        (0x85, 0, 0, 0, _FUNC_MAP_LOOKUP),
        (0x15, 0, 0, "deny", 0),                # not an endpoint of its container
        (0xBF, 1, 6, 0, 0),                     # bpf_setsockopt(ctx, SOL_SOCKET, SO_MARK, &key.mark, 4)
        (0xB7, 2, 0, 0, _SOL_SOCKET),
        (0xB7, 3, 0, 0, _SO_MARK),
        (0xBF, 4, 10, 0, 0),
        (0x07, 4, 0, 0, -24),
        (0xB7, 5, 0, 0, 4),
        (0x85, 0, 0, 0, _FUNC_SETSOCKOPT),
        (0x55, 0, 0, "deny", 0),                # not re-marked: not bound
        (0x05, 0, 0, "allow", 0),
        "marked",
        (0x61, 3, 2, _SRC_PORT, 0),             # a MARK_TAG socket without a port: never re-bound
        (0x15, 3, 0, "deny", 0),
        "allow",
        (0xB7, 0, 0, 0, 1),
        (0x95, 0, 0, 0, 0),
        "deny",
        (0xB7, 0, 0, 0, 0),
        (0x95, 0, 0, 0, 0),
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


def _info(prog_id: int) -> tuple[bytes, int]:
    """A program's name and the id of its first map (0: none)."""
    fd, _ = _bpf(_PROG_GET_FD_BY_ID, struct.pack("<I", prog_id))
    try:
        info, maps = ctypes.create_string_buffer(256), (ctypes.c_uint32 * 1)()
        struct.pack_into("<IQ", info, 52, 1, ctypes.addressof(maps))  # nr_map_ids, map_ids
        _bpf(_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, 256, ctypes.addressof(info)))
        count = struct.unpack_from("<I", info.raw, 52)[0]
        return info.raw[64:80].rstrip(b"\0"), maps[0] if count else 0
    finally:
        os.close(fd)


def _attached(cg: int, attach_type: int, names=NAMES) -> list[tuple[int, int]]:
    """(id, map id) of our programs named as in `names` attached to the cgroup for this hook."""
    ids = (ctypes.c_uint32 * 64)()
    _, out = _bpf(_PROG_QUERY, struct.pack("<IIIIQI", cg, attach_type, 0, 0, ctypes.addressof(ids), 64))
    count = struct.unpack_from("<I", out, 24)[0]
    found = []
    for prog_id in ids[:min(count, 64)]:
        name, map_id = _info(prog_id)
        if name == names[attach_type]:
            found.append((prog_id, map_id))
    return found


def _new_map() -> int:
    return _bpf(_MAP_CREATE, struct.pack("<IIIII", _MAP_TYPE_HASH, KEY_SIZE, VALUE_SIZE, MAX_GRANTS, _F_NO_PREALLOC))[0]


def _load(attach_type: int, map_fd: int) -> int:
    insns = program(attach_type, map_fd)
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


def _detach(cg: int, names) -> None:
    for t in names:
        for prog_id, _ in _attached(cg, t, names):
            _apply(_PROG_DETACH, cg, _bpf(_PROG_GET_FD_BY_ID, struct.pack("<I", prog_id))[0], t, 0)


def active() -> bool:
    """Whether both programs are attached (False where they cannot be looked at: not root)."""
    try:
        with _cgroup(locked=False) as cg:
            return all(_attached(cg, t) for t in NAMES)
    except OSError:
        return False


def map_id() -> int:
    """The id of the grants map the attached programs share (0: not attached, or not one map)."""
    try:
        with _cgroup(locked=False) as cg:
            ids = {m for t in NAMES for _, m in _attached(cg, t)}
    except OSError:
        return 0
    return ids.pop() if len(ids) == 1 else 0


def ensure() -> None:
    """Attach what is missing, both programs sharing one map, and detach the first version's
    (OSError when the kernel refuses: not root, no cgroup2, no BPF)."""
    with _cgroup() as cg:
        found = {t: _attached(cg, t) for t in NAMES}
        if not all(found.values()) or len({m for f in found.values() for _, m in f}) != 1:
            _detach(cg, NAMES)  # one map for both, or a new pair
            map_fd = _new_map()
            try:
                for t in NAMES:
                    _apply(_PROG_ATTACH, cg, _load(t, map_fd), t, _F_ALLOW_MULTI)
            finally:
                os.close(map_fd)
        _detach(cg, OLD_NAMES)


def remove() -> None:
    """Detach our programs (every copy, of both versions); the map goes with them."""
    with _cgroup() as cg:
        _detach(cg, NAMES)
        _detach(cg, OLD_NAMES)


# -- the grants map -----------------------------------------------------------------------------
@contextlib.contextmanager
def _map():
    ident = map_id()
    if not ident:
        raise OSError(2, "the bind guard is not attached")
    fd = _bpf(_MAP_GET_FD_BY_ID, struct.pack("<I", ident))[0]
    try:
        yield fd
    finally:
        os.close(fd)


def _entries(fd: int) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    prev, nxt, value = None, ctypes.create_string_buffer(KEY_SIZE), ctypes.create_string_buffer(VALUE_SIZE)
    while len(out) <= MAX_GRANTS:
        cur = ctypes.create_string_buffer(prev, KEY_SIZE) if prev is not None else None
        try:
            _bpf(_MAP_NEXT_KEY, struct.pack("<IIQQ", fd, 0, ctypes.addressof(cur) if cur is not None else 0,
                                            ctypes.addressof(nxt)))
        except OSError as e:
            if e.errno == 2:  # ENOENT: the last key
                return out
            raise
        prev = nxt.raw
        try:
            _bpf(_MAP_LOOKUP, struct.pack("<IIQQ", fd, 0, ctypes.addressof(nxt), ctypes.addressof(value)))
        except OSError:
            continue  # deleted meanwhile
        out[prev] = value.raw
    return out


def _set(fd: int, k: bytes, value: bytes | None) -> None:
    kb = ctypes.create_string_buffer(k, KEY_SIZE)
    if value is None:
        try:
            _bpf(_MAP_DELETE, struct.pack("<IIQ", fd, 0, ctypes.addressof(kb)))
        except OSError as e:
            if e.errno != 2:
                raise
        return
    vb = ctypes.create_string_buffer(value, VALUE_SIZE)
    _bpf(_MAP_UPDATE, struct.pack("<IIQQQ", fd, 0, ctypes.addressof(kb), ctypes.addressof(vb), 0))


def sync(owner: bytes, keys: set[bytes]) -> None:
    """Make the map hold exactly `keys` under `owner` (a store's 8 bytes), others' entries kept."""
    with _map() as fd:
        have = _entries(fd)
        for k, v in have.items():
            if v == owner and k not in keys:
                _set(fd, k, None)
        for k in keys:
            if have.get(k) != owner:
                _set(fd, k, owner)


def holds(owner: bytes, keys: set[bytes]) -> bool:
    """Whether the map holds every one of `keys` under `owner`."""
    try:
        with _map() as fd:
            value = ctypes.create_string_buffer(VALUE_SIZE)
            for k in keys:
                kb = ctypes.create_string_buffer(k, KEY_SIZE)
                _bpf(_MAP_LOOKUP, struct.pack("<IIQQ", fd, 0, ctypes.addressof(kb), ctypes.addressof(value)))
                if value.raw != owner:
                    return False
    except OSError:
        return False
    return True


def sweep(live) -> int:
    """Delete the entries whose owner `live(owner)` says is gone; how many."""
    try:
        with _map() as fd:
            gone = [k for k, v in _entries(fd).items() if not live(v)]
            for k in gone:
                _set(fd, k, None)
    except OSError:
        return 0
    return len(gone)


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
