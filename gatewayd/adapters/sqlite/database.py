"""The SQLite database: connections, schema migrations, transactions and checkpoints.

One writer connection, used only by the driver, which wraps each batch in one transaction (and each request
in a savepoint, so that a refused request leaves nothing behind). Its statements run on the event loop's thread
(`InlineConnection`): they take microseconds, where a hop to a worker thread and back (aiosqlite) costs
~70-250 us each, several times per batch (measured: Disconnect p50 at 10,000 peers 3.3 -> 1.7 ms back to back,
~5 -> ~3 ms arriving at random). COMMIT, which waits for the disk, goes to a worker thread; so does BEGIN
IMMEDIATE when another process holds the write lock. A
second connection (aiosqlite) serves reads for streams. WAL with synchronous=FULL: replay and double-spend
protection rest on committed rows.

Checkpoints (copying the WAL into the database file and syncing it) are not left to SQLite's automatic
checkpoint, which runs inside the COMMIT that crosses 1,000 pages and made every ~120th Disconnect wait
~12 ms for it. A third connection runs them (`checkpoint()`, PASSIVE: it neither waits for nor blocks the
writer), called by the runtime in the background.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from gatewayd.errors import StartupError, StorageFailed

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
"""How long the writer waits for a write lock another process holds (sqlite3's default)."""

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE teams (
        team_id TEXT PRIMARY KEY, version INTEGER NOT NULL, scope TEXT NOT NULL, roles TEXT NOT NULL,
        totp_prior INTEGER NOT NULL, device_prior INTEGER NOT NULL, reverify_interval REAL NOT NULL);
    CREATE TABLE members (
        member_id TEXT PRIMARY KEY, team_id TEXT NOT NULL, role TEXT NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0, last_failure_at REAL, locked INTEGER NOT NULL DEFAULT 0,
        reset_pending INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE member_peers (
        public_key TEXT PRIMARY KEY, member_id TEXT NOT NULL REFERENCES members ON DELETE CASCADE);
    CREATE INDEX member_peers_member ON member_peers(member_id);
    CREATE TABLE totp (
        member_id TEXT NOT NULL REFERENCES members ON DELETE CASCADE,
        slot TEXT NOT NULL CHECK (slot IN ('active', 'pending')),
        nonce BLOB NOT NULL, secret_ct BLOB NOT NULL, algorithm TEXT NOT NULL, digits INTEGER NOT NULL,
        period INTEGER NOT NULL, last_step INTEGER NOT NULL DEFAULT -1,
        PRIMARY KEY (member_id, slot));
    CREATE TABLE backup_sets (
        member_id TEXT PRIMARY KEY REFERENCES members ON DELETE CASCADE,
        salt BLOB NOT NULL, n INTEGER NOT NULL, r INTEGER NOT NULL, p INTEGER NOT NULL, dklen INTEGER NOT NULL);
    CREATE TABLE backup_codes (
        member_id TEXT NOT NULL REFERENCES backup_sets ON DELETE CASCADE, idx INTEGER NOT NULL,
        hash BLOB NOT NULL, used_at REAL, PRIMARY KEY (member_id, idx));
    CREATE TABLE device_credentials (
        member_id TEXT NOT NULL REFERENCES members ON DELETE CASCADE, credential_id BLOB NOT NULL,
        cose_public_key BLOB NOT NULL, sign_count INTEGER NOT NULL, user_handle BLOB NOT NULL,
        PRIMARY KEY (member_id, credential_id));
    CREATE TABLE peers (
        public_key TEXT PRIMARY KEY, state TEXT NOT NULL, owes TEXT NOT NULL, owes_since REAL,
        proven_at REAL, locked_reason TEXT, allowed_ips TEXT NOT NULL, session_started_at REAL,
        last_handshake REAL, step_up INTEGER NOT NULL);
    CREATE TABLE idempotency (
        key TEXT PRIMARY KEY, response TEXT NOT NULL, created_at REAL NOT NULL);
    CREATE TABLE outbox (
        cursor INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, type TEXT NOT NULL, time REAL NOT NULL,
        subject TEXT NOT NULL, data_json TEXT NOT NULL, published INTEGER NOT NULL DEFAULT 0);
    """,
    # 2: single-use device challenges, bound to a peer and a member
    """
    CREATE TABLE device_challenges (
        nonce BLOB PRIMARY KEY, public_key TEXT NOT NULL, member_id TEXT NOT NULL,
        issued_at REAL NOT NULL, expires_at REAL NOT NULL, used_at REAL);
    CREATE INDEX device_challenges_expiry ON device_challenges(expires_at);
    """,
    # 3: find unpublished events without a scan
    """
    CREATE INDEX outbox_unpublished ON outbox(cursor) WHERE published = 0;
    """,
    # 4: when a peer was admitted without a proof (re-verification counts from it); backup sets that an MFA
    # reset will invalidate once the new factor is confirmed
    """
    ALTER TABLE peers ADD COLUMN admitted_at REAL;
    ALTER TABLE backup_sets ADD COLUMN before_reset INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: a peer's last endpoint (a restart compares the first read with it)
    """
    ALTER TABLE peers ADD COLUMN endpoint TEXT;
    """,
]



WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes of WAL file kept on disk after the writer starts it over."""


OUR_TABLES = {"teams", "members", "peers", "outbox"}


def _inspect(path: Path) -> str | None:
    """What is wrong with an existing database file, or None (also for a missing file: it is created)."""
    if not path.exists():
        return None
    if path.stat().st_size == 0:
        return "is empty (0 bytes), not a gatewayd database"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return f"cannot be opened as SQLite ({exc})"
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        check = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
    except sqlite3.Error as exc:
        return f"is not a usable SQLite database ({exc})"
    finally:
        conn.close()
    if version > len(MIGRATIONS):
        # Not a damaged file: nothing to move aside. Refused whatever the operator says.
        raise StartupError(f"{path}: database schema {version} is newer than this gatewayd's ({len(MIGRATIONS)}): "
                           "was it written by a newer version?")
    if check != ["ok"]:
        return f"fails SQLite's integrity check ({'; '.join(check)[:200]})"
    if version == 0 or not OUR_TABLES <= tables:
        return "is an SQLite database but not a gatewayd one"
    return None


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.rename(aside.with_name(aside.name + suffix))
    return aside


class _Cursor:
    """A cursor with aiosqlite's (async) reading methods."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _Statement:
    """What `execute` returns: awaited, the cursor; in `async with`, the cursor, closed afterwards (as aiosqlite)."""

    def __init__(self, run: Callable[[], sqlite3.Cursor]) -> None:
        self._run = run
        self._cursor: _Cursor | None = None

    def __await__(self) -> Generator[Any, None, _Cursor]:
        return self._open().__await__()

    async def _open(self) -> _Cursor:
        return _Cursor(self._run())

    async def __aenter__(self) -> _Cursor:
        self._cursor = await self._open()
        return self._cursor

    async def __aexit__(self, *exc: object) -> None:
        if self._cursor is not None:
            await self._cursor.close()


class InlineConnection:
    """The writer: aiosqlite's interface over a plain sqlite3 connection whose statements run on the calling
    (event loop's) thread, except what can wait: COMMIT, and BEGIN IMMEDIATE when another process holds the
    write lock. The driver awaits each before the next statement, so the connection is never used from two
    threads at once."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                     timeout=BUSY_TIMEOUT_MS / 1000)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> _Statement:
        return _Statement(lambda: self._conn.execute(sql, args))

    def execute_now(self, sql: str) -> None:
        """A statement run on the calling thread. COMMIT waits for the disk: it is called from a worker thread
        while the driver awaits it, so the connection is still used by one thread at a time."""
        self._conn.execute(sql)

    def query(self, sql: str, args: Sequence[Any] = (), *, limit: int | None = None) -> list[Any]:
        """A query's rows (the first `limit`), on the calling thread."""
        cursor = self._conn.execute(sql, args)
        try:
            return cursor.fetchall() if limit is None else cursor.fetchmany(limit)
        finally:
            cursor.close()

    async def begin_immediate(self) -> None:
        """BEGIN IMMEDIATE: tried here without waiting; if another process holds the write lock, waited for (up
        to the 5 s busy timeout) in a worker thread, not on the event loop."""
        self._conn.execute("PRAGMA busy_timeout=0")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        finally:
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        await asyncio.to_thread(self._conn.execute, "BEGIN IMMEDIATE")

    def rows(self, sql: str, args: Sequence[Any] = ()) -> Iterator[Any]:
        """A query's rows one at a time as the caller takes them (start-up and rebuilds read 100,000 rows)."""
        return iter(self._conn.execute(sql, args))

    async def execute_fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self._conn.execute(sql, args).fetchall()

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> _Cursor:
        return _Cursor(self._conn.executemany(sql, rows))

    async def executescript(self, script: str) -> None:
        self._conn.executescript(script)

    async def close(self) -> None:
        self._conn.close()


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: InlineConnection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None

    @property
    def writer(self) -> InlineConnection:
        """The driver's connection: every write goes through it, inside the batch's transaction."""
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    @property
    def reader(self) -> aiosqlite.Connection:
        """A read-only connection for streams (WatchEvents, the MQTT publisher)."""
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    async def open(self, *, init: bool = False) -> None:
        """Open the database, creating it if the file does not exist. An existing file that is not a healthy
        gatewayd database (empty, not SQLite, another program's, a newer schema, failing quick_check, not
        writable) is refused with a StartupError naming it - never replaced silently. With `init`, such a file
        is moved aside (<name>.broken-<time>) and a new database is created in its place."""
        try:
            problem = await asyncio.to_thread(_inspect, self.path)
        except OSError as exc:
            raise StartupError(f"{self.path}: cannot be read: {exc.strerror or exc}") from None
        if problem is not None:
            if not init:
                raise StartupError(f"{self.path}: {problem}; refusing to start rather than replace it (every "
                                   "member, factor and policy would be lost): restore it from a backup, or start "
                                   "once with `gatewayd run --init-store` to move it aside and begin empty")
            aside = _move_aside(self.path)
            log.warning("%s: %s; moved aside to %s, starting with an empty database (--init-store)",
                        self.path, problem, aside)
        try:
            self._db = InlineConnection(self.path)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=FULL")
            await self._db.execute("PRAGMA foreign_keys=ON")
            await self._db.execute("PRAGMA wal_autocheckpoint=0")
            await self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            await self._migrate()
            os.chmod(self.path, 0o600)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute("PRAGMA query_only=ON")
            self._checkpointer = await aiosqlite.connect(self.path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StartupError(f"{self.path}: cannot be opened for writing: {exc}") from None
        except BaseException:
            # Closing matters: aiosqlite's thread would otherwise keep a failed process alive.
            await self.close()
            raise

    async def close(self) -> None:
        for conn in (self._reader, self._checkpointer, self._db):
            if conn is not None:
                await conn.close()
        self._db = self._reader = self._checkpointer = None

    async def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL frames into the database file without waiting for (or blocking) the writer.

        Returns (frames in the WAL, frames now in the database file); the writer starts the WAL over once
        all were copied."""
        assert self._checkpointer is not None
        async with self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
            row = await cur.fetchone()
        return (int(row[1]), int(row[2])) if row else (0, 0)

    async def _migrate(self) -> None:
        async with self.writer.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StartupError(f"{self.path}: database schema {version} is newer than this gatewayd's "
                               f"({len(MIGRATIONS)}): was it written by a newer version?")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self.writer.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")

    def storage_error(self, exc: BaseException) -> StorageFailed | None:
        if isinstance(exc, StorageFailed):
            return exc
        if not isinstance(exc, (sqlite3.Error, OSError)):
            return None
        cause = str(exc) or type(exc).__name__
        if "full" in cause or getattr(exc, "errno", None) == errno.ENOSPC:
            cause = f"the disk is full ({cause})"
        return StorageFailed(f"the gateway's database {self.path} could not be written: {cause}; nothing of this "
                             "request was kept, what was committed before (and its enforcement) holds")

    # ---- transactions (the driver's) --------------------------------------------------------------

    async def begin(self) -> None:
        await self.writer.begin_immediate()

    async def commit(self) -> None:
        await asyncio.to_thread(self.commit_blocking)

    def commit_blocking(self) -> None:
        self.writer.execute_now("COMMIT")

    async def rollback(self) -> None:
        await self.writer.execute("ROLLBACK")

    # The statements of every request (savepoints, the reads below) run directly on the writer's connection:
    # they never wait for the disk, and the cursor objects of aiosqlite's interface cost more than they do.

    async def savepoint(self) -> None:
        self.writer.execute_now("SAVEPOINT request")

    async def release_savepoint(self) -> None:
        self.writer.execute_now("RELEASE request")

    async def rollback_savepoint(self) -> None:
        self.writer.execute_now("ROLLBACK TO request")
        self.writer.execute_now("RELEASE request")

    # ---- queries on the writer --------------------------------------------------------------------

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self.writer.query(sql, args)

    async def one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = self.writer.query(sql, args, limit=1)
        return rows[0] if rows else None
