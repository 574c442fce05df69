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
import ipaddress
import os
import struct

from sockgraft.core.tables import MARK_MASK, MARK_TAG, UNBOUND_TAG
from sockgraft.host import ebpf

NAMES = {8: b"graft_bind4_2", 9: b"graft_bind6_2"}  # BPF_CGROUP_INET4_BIND, BPF_CGROUP_INET6_BIND
OLD_NAMES = {8: b"graft_bind4", 9: b"graft_bind6"}  # the first version's: detached by ensure()

_MAP_TYPE_HASH = 1
_PROG_TYPE_CGROUP_SOCK_ADDR = 18
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


def program(attach_type: int, map_fd: int, tag: int = MARK_TAG, unbound: int = UNBOUND_TAG,
            mask: int = MARK_MASK) -> bytes:
    """The bind program for BPF_CGROUP_INET4_BIND (8) or _INET6_BIND (9), looking grants up in the
    map `map_fd`: r0 = 1 lets the bind go on, r0 = 0 answers EPERM (see the module's text)."""
    if attach_type == 8:  # the v4-mapped form: ::ffff:a.b.c.d
        address = [(0x62, 10, 0, -16, 0), (0x62, 10, 0, -12, 0), (0x62, 10, 0, -8, ebpf.s32(0xFFFF0000)),
                   (0x61, 4, 6, _USER_IP4, 0), (0x63, 10, 4, -4, 0)]
    else:
        address = [op for i in range(4) for op in ((0x61, 4, 6, _USER_IP6 + 4 * i, 0), (0x63, 10, 4, -16 + 4 * i, 0))]
    return ebpf.assemble([
        (0xBF, 6, 1, 0, 0),                     # r6 = ctx
        (0x79, 2, 6, _SK, 0),                   # r2 = ctx->sk
        (0x15, 2, 0, "allow", 0),               # no socket: not ours
        (0x61, 3, 2, _MARK, 0),                 # r3 = sk->mark
        (0xBC, 4, 3, 0, 0),                     # w4 = w3
        (0x54, 4, 0, 0, ebpf.s32(mask)),        # w4 &= mask
        (0x16, 4, 0, "marked", ebpf.s32(tag)),  # MARK_TAG: judged by its port
        (0x56, 4, 0, "allow", ebpf.s32(unbound)),  # neither tag: not ours
        (0x54, 3, 0, 0, ebpf.s32(~mask)),       # UNBOUND_TAG | n: the key's mark is MARK_TAG | n
        (0x44, 3, 0, 0, ebpf.s32(tag)),
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


def _new_map() -> int:
    return ebpf.bpf(ebpf.MAP_CREATE, struct.pack("<IIIII", _MAP_TYPE_HASH, KEY_SIZE, VALUE_SIZE, MAX_GRANTS,
                                                  ebpf.F_NO_PREALLOC))[0]


def _load(attach_type: int, map_fd: int) -> int:
    return ebpf.load(_PROG_TYPE_CGROUP_SOCK_ADDR, attach_type, program(attach_type, map_fd), NAMES[attach_type],
                     "the bind guard")


def _cgroup(locked: bool = True):
    return ebpf.cgroup("bindguard.lock" if locked else None)


def _attached(cg: int, attach_type: int, names=NAMES) -> list[tuple[int, int]]:
    """(id, map id) of our programs named as in `names` attached to the cgroup for this hook."""
    return ebpf.attached(cg, attach_type, names[attach_type])


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
            ebpf.detach(cg, NAMES)  # one map for both, or a new pair
            map_fd = _new_map()
            try:
                for t in NAMES:
                    ebpf.apply(ebpf.PROG_ATTACH, cg, _load(t, map_fd), t, ebpf.F_ALLOW_MULTI)
            finally:
                os.close(map_fd)
        ebpf.detach(cg, OLD_NAMES)


def remove() -> None:
    """Detach our programs (every copy, of both versions); the map goes with them."""
    with _cgroup() as cg:
        ebpf.detach(cg, NAMES)
        ebpf.detach(cg, OLD_NAMES)


# -- the grants map -----------------------------------------------------------------------------
@contextlib.contextmanager
def _map():
    ident = map_id()
    if not ident:
        raise OSError(2, "the bind guard is not attached")
    fd = ebpf.map_fd(ident)
    try:
        yield fd
    finally:
        os.close(fd)


def _entries(fd: int) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    prev, nxt = None, ctypes.create_string_buffer(KEY_SIZE)
    while len(out) <= MAX_GRANTS:
        cur = ctypes.create_string_buffer(prev, KEY_SIZE) if prev is not None else None
        try:
            ebpf.bpf(ebpf.MAP_NEXT_KEY, struct.pack("<IIQQ", fd, 0, ctypes.addressof(cur) if cur is not None else 0,
                                                    ctypes.addressof(nxt)))
        except OSError as e:
            if e.errno == 2:  # ENOENT: the last key
                return out
            raise
        prev = nxt.raw
        try:
            value = ebpf.lookup(fd, prev, VALUE_SIZE)
        except OSError:
            continue
        if value is not None:  # (None: deleted meanwhile)
            out[prev] = value
    return out


def _set(fd: int, k: bytes, value: bytes | None) -> None:
    kb = ctypes.create_string_buffer(k, KEY_SIZE)
    if value is None:
        try:
            ebpf.bpf(ebpf.MAP_DELETE, struct.pack("<IIQ", fd, 0, ctypes.addressof(kb)))
        except OSError as e:
            if e.errno != 2:
                raise
        return
    vb = ctypes.create_string_buffer(value, VALUE_SIZE)
    ebpf.bpf(ebpf.MAP_UPDATE, struct.pack("<IIQQQ", fd, 0, ctypes.addressof(kb), ctypes.addressof(vb), 0))


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
            for k in keys:
                if ebpf.lookup(fd, k, VALUE_SIZE) != owner:
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
    return ebpf.command("bindguard", argv, ensure, remove, active)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
