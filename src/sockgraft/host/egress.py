"""Egress enforced by the kernel for every grafted socket: one nftables table per state directory.

Every host socket made for a container carries `SO_MARK = MARK_TAG | n` (core.tables), n the
container's number in the store; a container cannot change it (SO_MARK needs CAP_NET_ADMIN in the
host's user namespace). This module turns the store into an `inet` table whose `output` chain judges
every locally generated packet of a socket carrying one of THIS store's marks, whatever the send
path (connect, sendto, sendmsg, sendmmsg, a re-connect, io_uring):

- a TCP packet that is not a connection request (no SYN, or SYN+ACK) passes: it belongs to a
  connection the kernel let through (one this table judged, or one the socket accepted);
- a UDP datagram to a peer that wrote to this very socket in the last PEER_TIMEOUT seconds passes
  (a UDP server's answers): the `input` chain notes (peer address, peer port, socket mark) of every
  datagram delivered to a marked socket in a bounded set (PEER_SET_SIZE; full: new peers are not
  noted, and answers to them are judged as new flows). No conntrack: the table must not turn on
  connection tracking for the whole host (every connection tracked; TIME_WAIT entries filling
  `nf_conntrack_max` under connection-per-request load, and then every new packet dropped);
- a new flow passes if its destination is named by one of the container's egress rules, judged as
  the engine judges a grafted socket (longest prefix; a rule whose endpoint is missing names
  nothing), or is one of its fixed-port IP endpoints (what `dial`
  grants);
- anything else is refused: a TCP SYN gets a reset (`connect` fails with ECONNREFUSED, no hang),
  every other packet is dropped in output (the sender's call fails with EPERM).

Packets of other marks (another store's containers, unmarked sockets) get no verdict here. The
table's rules are rebuilt in one `nft` transaction from the store inside every write transaction
that changes them (Store._write calls sync before COMMIT, so tables are applied in commit order;
its peer sets keep their elements) and the table is removed when the store has no container left.
What was applied is noted in the store (`meta` row APPLIED, in the same transaction: the script's
digest with this boot and network namespace, and the chains it made), so a write that leaves the
kernel's view as it is (a unix endpoint, a container's inode) costs no `nft` at all, and one that
changes it costs one transaction (no listing of the chains first). A table changed behind the
store's back is made whole again at the next change, at graftd's start (`sync(force=True)`), and
after a reboot (another boot id); meanwhile pools_off, which reads the kernel, keeps pools off. Errors are
EgressError (the store, which calls this module, turns them into its StoreError).
GRAFT_EGRESS_ENFORCE: unset = enforce where possible (if nftables cannot be used, say so once on
stderr and carry on unenforced); 1 = a write that cannot be enforced fails; 0 = off (this store's
table is removed).
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import os
import re
import sys
import time
from dataclasses import dataclass

from sockgraft.core.engine import Policy
from sockgraft.core.tables import MARK_MASK, MARK_TAG, UNBOUND_TAG
from sockgraft.host import bindguard
from sockgraft.host.nft import EgressError, run as _nft

TABLE_PREFIX = "sockgraft-"
ENV = "GRAFT_EGRESS_ENFORCE"
DB_NAME = "tables.db"  # host/store.py's; a table whose state dir has none is debris


# -- the ruleset: pure code ------------------------------------------------------------------------
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ContainerEgress:
    """What the kernel lets one container's grafted sockets start: `groups` are egress prefixes in
    longest-first order, grouped by verdict (True: allowed; False: a longer rule naming nothing);
    `dials` are (address, port) of its fixed-port IP endpoints; `binds` (address, port) of all its
    IP endpoints (0: a dynamic one's), what the bind guard lets its unbound sockets bind to."""

    key: str
    mark: int
    groups: tuple[tuple[bool, tuple[Network, ...]], ...]
    dials: tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], ...]
    binds: tuple[tuple[str, int], ...] = ()

    def digest(self) -> str:
        """Short digest of what the kernel enforces for this container (in its chain's comment)."""
        text = repr((RULESET_VERSION, self.mark, [(ok, [str(n) for n in nets]) for ok, nets in self.groups],
                     [(str(a), p) for a, p in self.dials], list(self.binds)))
        return hashlib.blake2s(text.encode(), digest_size=6).hexdigest()


def container_egress(key: str, policy: Policy) -> ContainerEgress:
    """The kernel's view of one container (`policy.mark` must be set)."""
    rules = sorted(policy.egress, key=lambda r: (-r.network.prefixlen, r.network.version, int(r.network.network_address)))
    groups: list[tuple[bool, list[Network]]] = []
    for rule in rules:
        ok = rule.endpoint in policy.endpoints  # as Policy._on_grafted judges a grafted socket
        if groups and groups[-1][0] == ok:
            groups[-1][1].append(rule.network)
        else:
            groups.append((ok, [rule.network]))
    while groups and not groups[-1][0]:
        groups.pop()  # a trailing group naming nothing is the default anyway
    dials, binds = [], set()
    for ep in policy.endpoints.values():
        if ep.type in ("ipv4", "ipv6"):
            binds.add((str(ipaddress.ip_address(ep.addr)), 0 if ep.dynamic else int(ep.port)))
        if ep.type in ("ipv4", "ipv6") and ep.port not in (None, "dynamic"):
            addr = ipaddress.ip_address(ep.addr)
            if addr.is_unspecified:  # a connect to 0.0.0.0 / :: goes to the loopback
                addr = ipaddress.ip_address("127.0.0.1" if addr.version == 4 else "::1")
            dials.append((addr, int(ep.port)))
    return ContainerEgress(key, policy.mark, tuple((ok, tuple(nets)) for ok, nets in groups),
                           tuple(sorted(set(dials), key=lambda d: (d[0].version, int(d[0]), d[1]))), tuple(sorted(binds)))


def table_name(state_dir: str) -> str:
    """The table of a state directory (its real path), so that state dirs never share one."""
    digest = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:12]
    return TABLE_PREFIX + digest


def owner(table: str) -> bytes:
    """A table's store as the bind guard's map names the owner of an entry (8 bytes)."""
    return bytes.fromhex(table[len(TABLE_PREFIX):]).ljust(bindguard.VALUE_SIZE, b"\0")


def bind_keys(containers: list[ContainerEgress]) -> set[bytes]:
    """The bind guard's map entries of these containers: each of its IP endpoints."""
    return {bindguard.key(c.mark, addr, port) for c in containers for addr, port in c.binds}


def _comment(text: str) -> str:
    """Text safe inside an nft comment (quotes and control characters replaced, 120 bytes)."""
    return re.sub(r'[^\x20-\x7e]|["\\]', "?", text)[:120]


def _set(items) -> str:
    return "{ " + ", ".join(items) + " }"


def _prefix_rules(nets: tuple[Network, ...], verdict: str) -> list[str]:
    out = []
    for version, field in ((4, "ip daddr"), (6, "ip6 daddr")):
        fam = [n for n in nets if n.version == version]
        if any(n.prefixlen == 0 for n in fam):
            out.append(f"meta nfproto {'ipv4' if version == 4 else 'ipv6'} {verdict}")
        elif fam:
            out.append(f"{field} {_set(str(n) for n in fam)} {verdict}")
    return out


RULESET_VERSION = 2  # 2: sockets of UNBOUND_TAG refused (in the containers' digests: a table of 1 is redone)
PEER_TIMEOUT = 30  # seconds a UDP peer may be answered after its last datagram (conntrack's UDP default)
PEER_SET_SIZE = 65536  # UDP peers noted at most, per address family


def chain_name(mark: int) -> str:
    return f"mark-{mark:08x}"


def ruleset(state_dir: str, containers: list[ContainerEgress], existing: tuple[str, ...] = (), *,
            replace: bool = False) -> str:
    """The whole nft script for a store, applied in one transaction; only a removal when there is no
    container. The table's rules are rebuilt (`flush table`; the containers' chains, `existing` as
    listed by `chains`, deleted and made anew, so their comments - what pools_off reads - are new
    too) but its peer sets keep their elements: a UDP answer of a grafted socket must not be
    dropped because another container's rules changed.
    `replace`: the table is deleted and made anew (its sets emptied), for a table this code cannot
    update in place (one an older version made). Pure: the same input gives the same text."""
    table = table_name(state_dir)
    removal = [f"add table inet {table}", f"delete table inet {table}"]
    if not containers:
        return "\n".join(removal) + "\n"
    containers = sorted(containers, key=lambda c: c.mark)
    sets = [f"\tset peers{v} {{ type {addr} . inet_service . mark; flags dynamic, timeout; size {PEER_SET_SIZE}; }}"
            for v, addr in ((4, "ipv4_addr"), (6, "ipv6_addr"))]
    hooks = {"output": "\t\ttype filter hook output priority filter; policy accept;",
             "input": "\t\ttype filter hook input priority filter; policy accept;"}
    lines = removal if replace else []
    # the skeleton (made if missing, left as it is if there), emptied of rules, then filled
    lines += [f"table inet {table} {{", f'\tcomment "{_comment(os.path.realpath(state_dir))}"', *sets]
    for name in ("output", "input", "refuse"):
        lines += [f"\tchain {name} {{", *([hooks[name]] if name in hooks else []), "\t}"]
    lines += ["}", f"flush table inet {table}"]
    lines += [f"delete chain inet {table} {name}" for name in sorted(set(existing)) if re.fullmatch(r"mark-[0-9a-f]{8}", name)]
    vmap = ", ".join(f"0x{c.mark:08x} : jump {chain_name(c.mark)}" for c in containers)
    lines += [
        f"table inet {table} {{",
        "\tchain output {",
        f"\t\tmeta mark & 0x{MARK_MASK:08x} == 0x{UNBOUND_TAG:08x} goto refuse",
        f"\t\tmeta mark & 0x{MARK_MASK:08x} != 0x{MARK_TAG:08x} return",
        f"\t\tmeta mark vmap {{ {vmap} }}",
        "\t}",
        "\tchain refuse {",
        "\t\ttcp flags & (syn | ack) == syn reject with tcp reset",
        "\t\tdrop",
        "\t}",
        "\tchain input {",
        f"\t\ttcp flags & (syn | ack) == syn socket mark & 0x{MARK_MASK:08x} == 0x{UNBOUND_TAG:08x} goto refuse",
        f"\t\tmeta l4proto != udp return",
        f"\t\tsocket mark & 0x{MARK_MASK:08x} == 0x{UNBOUND_TAG:08x} drop",
        f"\t\tsocket mark & 0x{MARK_MASK:08x} != 0x{MARK_TAG:08x} return",
        f"\t\tmeta nfproto ipv4 update @peers4 {{ ip saddr . udp sport . socket mark timeout {PEER_TIMEOUT}s }}",
        f"\t\tmeta nfproto ipv6 update @peers6 {{ ip6 saddr . udp sport . socket mark timeout {PEER_TIMEOUT}s }}",
        "\t}",
    ]
    for c in containers:
        lines += [f"\tchain {chain_name(c.mark)} {{", f'\t\tcomment "{c.digest()} {_comment(c.key)}"',
                  "\t\ttcp flags & (syn | ack) != syn accept",
                  "\t\tip daddr . udp dport . meta mark @peers4 accept",
                  "\t\tip6 daddr . udp dport . meta mark @peers6 accept"]
        for version, field in ((4, "ip daddr"), (6, "ip6 daddr")):
            targets = [f"{a} . {proto} . {port}" for a, port in c.dials if a.version == version for proto in ("tcp", "udp")]
            if targets:
                lines.append(f"\t\t{field} . meta l4proto . th dport {_set(targets)} accept")
        for ok, nets in c.groups:
            lines += ["\t\t" + r for r in _prefix_rules(nets, "accept" if ok else "goto refuse")]
        lines += ["\t\tgoto refuse", "\t}"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def chains(state_dir: str) -> tuple[str, ...]:
    """The chains of a state directory's table (none when it has no table): a chain listing, not
    the table's (which would print every peer set element)."""
    table, found, inside = table_name(state_dir), [], False
    for line in _nft("list chains inet").splitlines():
        if line.startswith("table "):
            inside = line.split()[2:3] == [table]
        elif inside and line.startswith("\tchain "):
            found.append(line.split()[1])
    return tuple(found)


def plan(store: Store) -> list[ContainerEgress]:
    """Every container of the store as the kernel will judge it, read in the caller's transaction."""
    policies = [(row.key, store._policy(row.key)) for row in store.containers()]
    return [container_egress(key, policy) for key, policy in policies if policy.mark]


# -- keeping the table true ------------------------------------------------------------------------
def enforce_setting() -> str | None:
    """'1' (required), '0' (off) or None (where possible), from GRAFT_EGRESS_ENFORCE."""
    value = os.environ.get(ENV, "").strip()
    return value if value in ("0", "1") else None


APPLIED = "egress_applied"  # the store's meta row: what its last write applied (json: digest, chains)


def _where() -> str:
    """This boot and network namespace (a table applied in another one is not there)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot} {os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return ""


def sync(store: Store, force: bool = False) -> None:
    """Make the kernel's table of `store` match its content. Called by Store._write inside each write
    transaction (before COMMIT), where a plan the store says is applied already is left as it is,
    and by graftd at start (`force`: applied whatever the store says); outside a transaction it
    takes one."""
    if store.readonly:
        return
    if not store.db.in_transaction:
        store.db.execute("BEGIN IMMEDIATE")
        try:
            sync(store, force)
        except BaseException:
            store.db.execute("ROLLBACK")
            raise
        store.db.execute("COMMIT")
        return
    setting = enforce_setting()
    containers = [] if setting == "0" else plan(store)
    digest = hashlib.blake2s(f"{_where()}\n{ruleset(store.dir, containers)}".encode(), digest_size=16).hexdigest()
    row = store.db.execute("SELECT value FROM meta WHERE key = ?", (APPLIED,)).fetchone()
    try:
        applied = json.loads(row[0]) if row else {}
    except ValueError:
        applied = {}
    if not force and applied.get("digest") == digest:
        return
    store.db.execute("DELETE FROM meta WHERE key = ?", (APPLIED,))
    known = applied.get("chains") if isinstance(applied.get("chains"), list) and not force else None
    try:
        apply(store.dir, containers, known)
        _sync_binds(store.dir, containers)
        chains_made = [chain_name(c.mark) for c in containers]
        store.db.execute("INSERT INTO meta VALUES (?, ?)", (APPLIED, json.dumps({"digest": digest, "chains": chains_made})))
    except EgressError as e:
        if setting == "1":  # the store turns it into a StoreError (its write is rolled back)
            raise EgressError(f"egress cannot be enforced by the kernel ({ENV}=1): nftables: {e}") from None
        if setting is None:
            _warn_once(f"egress is not enforced by the kernel (nftables: {e}); set {ENV}=0 to silence this")


def apply(state_dir: str, containers: list[ContainerEgress], known: list[str] | None = None) -> None:
    """Make the kernel's table of `state_dir` enforce `containers`, keeping its UDP peers; `known`:
    its chains as the last apply left them (else, or if the kernel's differ, they are listed); a
    table that cannot be updated in place (made by an older version) is replaced."""
    if not containers:
        _nft(ruleset(state_dir, []))
        return
    if known is not None:
        try:
            return _nft(ruleset(state_dir, containers, tuple(known)))
        except EgressError:
            pass
    try:
        _nft(ruleset(state_dir, containers, chains(state_dir)))
    except EgressError:
        _nft(ruleset(state_dir, containers, replace=True))


def _sync_binds(state_dir: str, containers: list[ContainerEgress]) -> None:
    """The bind guard's map entries of this store: exactly its containers' endpoints (nothing to do
    where the guard is not attached: no unbound socket is handed over there)."""
    try:
        bindguard.sync(owner(table_name(state_dir)), bind_keys(containers))
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: not attached
            raise EgressError(f"the bind guard's map: {e.strerror or e}") from None


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"graft: {message}", file=sys.stderr)


_warned = False
_checked: dict[tuple[str, str], tuple[float, str]] = {}  # pools_off: (table, digest) -> (when, answer)


def pools_off(store: Store, key: str, unbound: bool = False) -> str:
    """Why the sockets of container `key` may not be handed over unconnected ("" when they may):
    pooled sockets (fd service `pool`, the seccomp fast path) need the bind guard attached and the
    kernel judging them by exactly the container's current rules; `unbound` ones (`bindpool`, `namedpool`) also
    need the guard's map to hold the container's endpoints (put back from the store if it lost
    them: a guard attached anew starts empty). The one check of every pool user; asks the kernel
    at most once a second per container state."""
    if os.environ.get("GRAFT_POOLS", "1") == "0":
        return "pools off (GRAFT_POOLS=0)"
    if enforce_setting() == "0":
        return f"egress enforcement is off ({ENV}=0)"
    policy = store.cached_policy(key)
    if not policy.mark:
        return f"container {key} has no socket mark"
    want, mark = container_egress(key, policy), policy.mark
    table, now = table_name(store.dir), time.monotonic()
    cached = _checked.get((table, want.digest(), unbound))
    if cached is not None and now - cached[0] < 1.0:
        return cached[1]
    try:
        text = _nft(f"list chain inet {table} {chain_name(mark)}")
        m = re.search(r'^\s*comment "(\S+) ', text, re.M)
        answer = "" if m and m.group(1) == want.digest() else "the kernel's egress table is not up to date for this container"
    except EgressError as e:
        answer = f"egress is not enforced by the kernel ({e})"
    if not answer and not bindguard.active():
        answer = "pools off: the bind guard is not attached (host/bindguard.py)"
    if not answer and unbound:
        answer = _binds_off(store, table, want)
    if len(_checked) > 4096:
        _checked.clear()
    _checked[(table, want.digest(), unbound)] = (now, answer)
    return answer


def _binds_off(store: Store, table: str, want: ContainerEgress) -> str:
    keys = bind_keys([want])
    if bindguard.holds(owner(table), keys):
        return ""
    try:
        bindguard.sync(owner(table), bind_keys(plan(store)))
    except Exception as e:  # OSError, or the store's StoreError (host/store.py imports this module)
        return f"the bind guard's map cannot be written ({e})"
    return "" if bindguard.holds(owner(table), keys) else "the bind guard's map does not hold this container's endpoints"


def remove(state_dir: str) -> None:
    """Drop the table of a state directory (if any)."""
    _nft(ruleset(state_dir, []))


def tables() -> dict[str, str | None]:
    """Our tables on this host: name -> the state directory in its comment (None: unreadable)."""
    listing = _nft("list tables inet")
    out: dict[str, str | None] = {}
    for name in re.findall(rf"^table inet ({re.escape(TABLE_PREFIX)}[0-9a-f]+)$", listing, re.M):
        try:
            text = _nft(f"list table inet {name}")
        except EgressError:
            continue  # gone meanwhile
        m = re.search(r'^\s*comment "(.*)"$', text, re.M)
        out[name] = m.group(1) if m else None
    return out


def sweep(keep=lambda state_dir: os.path.exists(os.path.join(state_dir, DB_NAME))) -> list[str]:
    """Remove the tables of state directories that are gone (a killed test's); their names."""
    gone = []
    try:
        found = tables()
    except EgressError:
        return gone
    for name, state_dir in found.items():
        if state_dir is not None and state_dir.startswith("/") and table_name(state_dir) == name and not keep(state_dir):
            try:
                _nft(f"add table inet {name}\ndelete table inet {name}\n")
                gone.append(name)
            except EgressError:
                pass
    return gone
