"""Endpoint tables and per-container rules in SQLite (WAL) under the state directory."""
from __future__ import annotations

import os
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass

from sockgraft.core.endpoint import Endpoint, SpecError, conflicts
from sockgraft.core.engine import Policy
from sockgraft.core.tables import MARK_MAX, MARK_TAG
from sockgraft.core.rules import EgressRule, IngressPair, parse_egress, parse_ingress
from sockgraft.host import egress
from sockgraft.host.paths import state_dir

SCHEMA_VERSION = 2  # 2: the marks table
DB_NAME = "tables.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS containers (
    key TEXT PRIMARY KEY,
    netns_ino INTEGER,
    mode TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    container TEXT NOT NULL REFERENCES containers(key) ON DELETE CASCADE,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    addr TEXT,
    port INTEGER,
    path TEXT,
    PRIMARY KEY (container, name)
);
CREATE TABLE IF NOT EXISTS rules (
    container TEXT NOT NULL REFERENCES containers(key) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('ingress', 'egress')),
    seq INTEGER NOT NULL,
    spec TEXT NOT NULL,
    PRIMARY KEY (container, kind, seq)
);
CREATE TABLE IF NOT EXISTS marks (
    container TEXT PRIMARY KEY REFERENCES containers(key) ON DELETE CASCADE,
    n INTEGER NOT NULL UNIQUE
);
"""


class StoreError(Exception):
    """The state database could not be used (one line for the user)."""


@dataclass(frozen=True)
class ContainerRow:
    key: str
    netns_ino: int | None
    mode: str | None
    created: float


class Store:
    def __init__(self, directory: str | None = None):
        self.dir = state_dir(directory)
        self.path = os.path.join(self.dir, DB_NAME)
        self.readonly = False
        self._policies: dict[str, Policy] = {}  # cached_policy(), valid for one data_version
        self._policies_at: int | None = None
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self.db = self._connect(self.path)
            try:
                self._setup_waiting()
            except sqlite3.OperationalError:
                # a read-only or full disk (no room even for the WAL index): the tables, as last
                # checkpointed, can still be read; writes fail with one line
                self.db.close()
                self.db = self._connect(f"file:{self.path}?mode=ro&immutable=1", uri=True)
                self.readonly = True
                self._check_version()
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"state database {self.path}: {e}") from None

    @staticmethod
    def _connect(target: str, uri: bool = False) -> sqlite3.Connection:
        db = sqlite3.connect(target, timeout=30, isolation_level=None, check_same_thread=False, uri=uri)
        db.execute("PRAGMA busy_timeout = 30000")
        db.execute("PRAGMA foreign_keys = ON")
        return db

    def _check_version(self) -> int:
        """The schema's version (0: none yet); refuses a newer schema than this code knows."""
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            return 0
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row and int(row[0]) > SCHEMA_VERSION:
            raise StoreError(f"state database {self.path} has schema {row[0]}, newer than this sockgraft ({SCHEMA_VERSION})")
        return int(row[0]) if row else 0

    def _setup_waiting(self) -> None:
        """_setup, waiting (as long as busy_timeout) while another process holds the database: a
        new database's `journal_mode = WAL` does not wait by itself, and a writer that is creating
        the schema must not make this one fall back to the read-only view (which ignores the WAL,
        so a fresh database looks empty: "no such table")."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return self._setup()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _setup(self) -> None:
        mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"state database {self.path}: cannot switch to WAL (journal mode {mode})")
        self.db.execute("PRAGMA synchronous = NORMAL")
        if self._check_version() == SCHEMA_VERSION:
            return
        with self._write():  # a new database, or an older one brought up to date (tables IF NOT EXISTS)
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self.db.execute(statement)
            for (key,) in self.db.execute("SELECT key FROM containers").fetchall():
                self._ensure_mark(key)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def _write(self):
        """One write transaction, taken at once so concurrent writers queue instead of failing."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                egress.sync(self)  # the kernel's egress table follows, applied in commit order (host/egress.py)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                self._resync_after_failed_commit()
                raise
            self._policies.clear()  # our own commits do not change our data_version
        except sqlite3.Error as e:
            raise StoreError(f"state database {self.path}: {e}") from None
        except egress.EgressError as e:  # GRAFT_EGRESS_ENFORCE=1 and nftables unusable: rolled back
            raise StoreError(str(e)) from None

    def _resync_after_failed_commit(self) -> None:
        """The kernel's table was applied for a write that did not commit: made from the tables
        again (best effort; what the store says was applied is rewritten with it)."""
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            egress.sync(self, force=True)
        except (sqlite3.Error, egress.EgressError):
            pass

    def sync_egress(self) -> None:
        """Rebuild the kernel's egress table from the tables, whatever the store says was applied
        (graftd at start)."""
        try:
            egress.sync(self, force=True)
        except sqlite3.Error as e:
            raise StoreError(f"state database {self.path}: {e}") from None
        except egress.EgressError as e:
            raise StoreError(str(e)) from None

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"state database {self.path}: {e}") from None

    def data_version(self) -> int:
        """Changes whenever another connection commits (cheap: for polling)."""
        try:
            return self.db.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error as e:
            raise StoreError(f"state database {self.path}: {e}") from None

    # -- containers ------------------------------------------------------------------------------
    def _ensure_container(self, key: str, ino: int | None, mode: str | None = None) -> None:
        self.db.execute(
            "INSERT INTO containers (key, netns_ino, mode, created) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET netns_ino = coalesce(excluded.netns_ino, netns_ino), "
            "mode = coalesce(excluded.mode, mode)",
            (key, ino, mode, time.time()),
        )
        self._ensure_mark(key)

    def _ensure_mark(self, key: str) -> None:
        """Give a container its socket mark number: the next free one after the last given, so a
        number comes back only after MARK_MAX others (a removed container's sockets may linger)."""
        if self.db.execute("SELECT 1 FROM marks WHERE container = ?", (key,)).fetchone():
            return
        row = self.db.execute("SELECT value FROM meta WHERE key = 'last_mark'").fetchone()
        # a new state directory starts at a random number: two of them on one machine (a test's,
        # a user's) then seldom hand out the same mark at the same time
        n = int(row[0]) if row else secrets.randbelow(MARK_MAX)
        for _ in range(MARK_MAX):
            n = n % MARK_MAX + 1
            if not self.db.execute("SELECT 1 FROM marks WHERE n = ?", (n,)).fetchone():
                break
        else:
            raise StoreError(f"state database {self.path}: all {MARK_MAX} container marks are in use")
        self.db.execute("INSERT INTO marks VALUES (?, ?)", (key, n))
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('last_mark', ?)", (str(n),))

    def marks(self) -> dict[str, int]:
        """Each container's socket mark (core.tables.MARK_TAG | its number)."""
        return {k: MARK_TAG | n for k, n in self._read("SELECT container, n FROM marks")}

    def register(self, key: str, ino: int | None, mode: str | None = None) -> None:
        with self._write():
            self._ensure_container(key, ino, mode)

    def containers(self) -> list[ContainerRow]:
        return [ContainerRow(*r) for r in self._read("SELECT key, netns_ino, mode, created FROM containers ORDER BY key")]

    def container(self, key: str) -> ContainerRow | None:
        rows = self._read("SELECT key, netns_ino, mode, created FROM containers WHERE key = ?", (key,))
        return ContainerRow(*rows[0]) if rows else None

    def forget(self, key: str) -> None:
        """Remove a container with its table and rules."""
        with self._write():
            self.db.execute("DELETE FROM containers WHERE key = ?", (key,))

    # -- endpoints -------------------------------------------------------------------------------
    def add(self, key: str, ep: Endpoint, ino: int | None = None) -> None:
        with self._write():
            self._add(key, ep, ino)

    def _add(self, key: str, ep: Endpoint, ino: int | None) -> None:
        if self._read("SELECT 1 FROM endpoints WHERE container = ? AND name = ?", (key, ep.name)):
            raise SpecError(f"endpoint {ep.name!r} already exists in {key}")
        for other_key, other in self._all_endpoints():
            if other_key != key and conflicts(ep, other):
                raise SpecError(
                    f"host endpoint of {ep.name!r} ({ep.line().split(' ', 1)[1]}) is already granted to {other_key} as {other.name!r}"
                )
        self._ensure_container(key, ino)
        self.db.execute(
            "INSERT INTO endpoints (container, name, type, addr, port, path) VALUES (?, ?, ?, ?, ?, ?)",
            (key, ep.name, ep.type, ep.addr, ep.port, ep.path),
        )

    def delete(self, key: str, name: str) -> None:
        with self._write():
            cur = self.db.execute("DELETE FROM endpoints WHERE container = ? AND name = ?", (key, name))
            if cur.rowcount == 0:
                raise SpecError(f"no endpoint {name!r} in {key}")

    def _all_endpoints(self) -> list[tuple[str, Endpoint]]:
        rows = self._read("SELECT container, name, type, addr, port, path FROM endpoints")
        return [(r[0], Endpoint(*r[1:])) for r in rows]

    def endpoints(self, key: str) -> list[Endpoint]:
        rows = self._read(
            "SELECT name, type, addr, port, path FROM endpoints WHERE container = ? ORDER BY rowid", (key,)
        )
        return [Endpoint(*r) for r in rows]

    # -- rules -----------------------------------------------------------------------------------
    def set_rules(self, key: str, ingress: list[IngressPair], egress: list[EgressRule], ino: int | None = None) -> None:
        with self._write():
            self._set_rules(key, ingress, egress, ino)

    def _set_rules(self, key: str, ingress: list[IngressPair], egress: list[EgressRule], ino: int | None) -> None:
        self._ensure_container(key, ino)
        self.db.execute("DELETE FROM rules WHERE container = ?", (key,))
        for kind, specs in (("ingress", ingress), ("egress", egress)):
            for seq, spec in enumerate(specs):
                self.db.execute("INSERT INTO rules VALUES (?, ?, ?, ?)", (key, kind, seq, str(spec)))

    # -- a container's whole table ---------------------------------------------------------------
    def install(self, key: str, ino: int | None, mode: str, endpoints: list[Endpoint],
                ingress: list[IngressPair], egress: list[EgressRule], *, fresh: bool):
        """Register a container with its endpoints and rules in one transaction: every caller that
        brings a table (`graft run`, graft-runtime, the OCI agent, the CNI plugin) goes through here.

        fresh: the table is exactly this (an earlier table under the same key is dropped).
        Otherwise it is merged into what is there: an identical endpoint is kept, a different one
        of the same name is an error, rules replace the stored ones only when some are given.
        Returns a callable that undoes exactly what this call changed."""
        with self._write():
            existed = self.container(key) is not None
            if fresh and existed:
                self.db.execute("DELETE FROM containers WHERE key = ?", (key,))
                existed = False
            self._ensure_container(key, ino, mode)
            have = {ep.name: ep for ep in self.endpoints(key)}
            added = []
            for ep in endpoints:
                if ep.name in have:
                    if have[ep.name] != ep:
                        raise SpecError(f"endpoint {ep.name!r} already exists in {key} as: {have[ep.name].line()}")
                    continue
                self._add(key, ep, ino)
                added.append(ep.name)
            old = self._policy(key) if existed else None
            if fresh or ingress or egress:
                self._set_rules(key, ingress, egress, ino)

        def undo() -> None:
            if not existed:
                self.forget(key)
                return
            with self._write():
                for name in added:
                    self.db.execute("DELETE FROM endpoints WHERE container = ? AND name = ?", (key, name))
                if ingress or egress:
                    self._set_rules(key, old.ingress, old.egress, None)

        return undo

    def cached_policy(self, key: str) -> Policy:
        """`policy(key)`, read again only after a write by anyone: the hot path of the fd service
        and the seccomp supervisor (a changed table takes effect at the next request)."""
        version = self.data_version()
        if version != self._policies_at:
            self._policies.clear()
            self._policies_at = version
        pol = self._policies.get(key)
        if pol is None:
            pol = self._policies[key] = self.policy(key)
        return pol

    def policy(self, key: str) -> Policy:
        """Everything the engine needs to decide for this container, read in one snapshot."""
        try:
            self.db.execute("BEGIN")
            try:
                return self._policy(key)
            finally:
                self.db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"state database {self.path}: {e}") from None

    def _policy(self, key: str) -> Policy:
        eps = self.endpoints(key)
        rules = self._read("SELECT kind, spec FROM rules WHERE container = ? ORDER BY kind, seq", (key,))
        mark = self._read("SELECT n FROM marks WHERE container = ?", (key,))
        return Policy(
            {ep.name: ep for ep in eps},
            [parse_ingress(s) for k, s in rules if k == "ingress"],
            [parse_egress(s) for k, s in rules if k == "egress"],
            MARK_TAG | mark[0][0] if mark and _can_mark() else 0,  # rootless: no mark (see _can_mark)
        )


def _can_mark() -> bool:
    """Whether this process can put a mark on a host socket (SO_MARK needs CAP_NET_ADMIN in the host's
    user namespace). A rootless fd service or supervisor cannot, and nftables is root's anyway: its
    containers' sockets go unmarked, which also tells egress.pools_off that the kernel does not guard
    them (no pooled sockets). egress.sync still says once that egress is not enforced."""
    from sockgraft.host.nft import net_admin
    from sockgraft.host.paths import in_initial_userns

    return in_initial_userns() and net_admin()
