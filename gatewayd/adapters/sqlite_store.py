"""SQLite persistence (aiosqlite): state, factor secrets (AES-GCM at rest), idempotency and the event outbox.

One writer connection, used only by the driver, which wraps each batch in one transaction (and each request
in a savepoint, so that a refused request leaves nothing behind). A second connection serves reads for
streams. WAL with synchronous=FULL: replay and double-spend protection rest on committed rows.

Checkpoints (copying the WAL into the database file and syncing it) are not left to SQLite's automatic
checkpoint, which runs inside the COMMIT that crosses 1,000 pages and made every ~120th Disconnect wait
~12 ms for it. A third connection runs them (`checkpoint()`, PASSIVE: it neither waits for nor blocks the
writer), called by the daemon in the background.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gatewayd.auth.backup import KdfParams
from gatewayd.auth.limits import AttemptState
from gatewayd.auth.totp import Algorithm, TotpFactor
from gatewayd.core.model import (
    Factor,
    LockedReason,
    Member,
    PeerRecord,
    PeerState,
    ProofKind,
    Role,
    Roles,
    Scope,
    TeamPolicy,
)

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
]


class SecretBox:
    """AES-256-GCM for factor secrets at rest; the associated data binds a ciphertext to its row."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("secrets key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        raw = path.read_bytes()
        text = raw.strip()
        if len(raw) == 32:
            return cls(raw)
        try:
            return cls(bytes.fromhex(text.decode("ascii")))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{path}: secrets key must be 32 raw bytes or 64 hex digits") from exc

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        nonce = os.urandom(12)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return self._aead.decrypt(nonce, ciphertext, aad)


@dataclass(frozen=True, kw_only=True)
class StoredEvent:
    cursor: int
    """Monotonic position."""
    id: str
    """UUID."""
    type: str
    """Dotted type."""
    time: float
    """Wall-clock time."""
    subject: str
    """Subject."""
    data_json: str
    """JSON details."""


@dataclass(frozen=True, kw_only=True)
class MemberAuth:
    """The member's verification state, read inside the driver's transaction."""

    attempts: AttemptState
    """Failure counter."""
    reset_pending: bool
    """An MFA reset awaits confirmation of the new factor."""
    totp: TotpFactor | None
    """The active TOTP factor."""
    pending_totp: TotpFactor | None
    """The TOTP factor enrolled after a reset, not yet confirmed."""


def _aad(member_id: str, slot: str) -> bytes:
    return f"gatewayd/totp/{member_id}/{slot}".encode()


def _events(rows: Iterable[sqlite3.Row]) -> list[StoredEvent]:
    """Outbox rows selected as (cursor, id, type, time, subject, data_json)."""
    return [StoredEvent(cursor=r[0], id=r[1], type=r[2], time=r[3], subject=r[4], data_json=r[5]) for r in rows]


WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes of WAL file kept on disk after the writer starts it over."""


class Store:
    def __init__(self, path: Path, box: SecretBox) -> None:
        self.path = path
        self._box = box
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self.next_cursor = 1

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def open(self) -> None:
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=FULL")
            await self._db.execute("PRAGMA foreign_keys=ON")
            await self._db.execute("PRAGMA wal_autocheckpoint=0")
            await self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            await self._migrate()
        except BaseException:
            await self.close()
            raise
        os.chmod(self.path, 0o600)
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader.execute("PRAGMA query_only=ON")
        self._checkpointer = await aiosqlite.connect(self.path, isolation_level=None)
        async with self.db.execute("SELECT coalesce(max(cursor), 0) FROM outbox") as cur:
            row = await cur.fetchone()
        self.next_cursor = int(row[0]) + 1 if row else 1

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
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise RuntimeError(f"database schema {version} is newer than this gatewayd ({len(MIGRATIONS)})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self.db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={number}; COMMIT;")

    # ---- transactions -----------------------------------------------------------------------------

    async def begin(self) -> None:
        await self.db.execute("BEGIN IMMEDIATE")

    async def commit(self) -> None:
        await self.db.execute("COMMIT")

    async def rollback(self) -> None:
        await self.db.execute("ROLLBACK")

    async def savepoint(self) -> None:
        await self.db.execute("SAVEPOINT request")

    async def release_savepoint(self) -> None:
        await self.db.execute("RELEASE request")

    async def rollback_savepoint(self) -> None:
        await self.db.execute("ROLLBACK TO request")
        await self.db.execute("RELEASE request")

    # ---- loading ----------------------------------------------------------------------------------

    async def load(self) -> tuple[list[TeamPolicy], list[Member], list[PeerRecord]]:
        teams = [
            TeamPolicy(team_id=r[0], version=r[1], scope=Scope(r[2]), roles=Roles(r[3]),
                       totp_prior_connection=bool(r[4]), device_prior_connection=bool(r[5]),
                       reverify_interval=r[6])
            for r in await self._all("SELECT * FROM teams")
        ]
        peers_of: dict[str, set[str]] = {}
        for key, member_id in await self._all("SELECT public_key, member_id FROM member_peers"):
            peers_of.setdefault(member_id, set()).add(key)
        members = []
        for member_id, team_id, role, _f, _l, locked, _r in await self._all("SELECT * FROM members"):
            members.append(Member(member_id=member_id, team_id=team_id, role=Role(role),
                                  peers=frozenset(peers_of.get(member_id, ())),
                                  factors=await self.factors(member_id), locked=bool(locked)))
        records = [
            PeerRecord(public_key=r[0], state=PeerState(r[1]),
                       owes=frozenset(ProofKind(k) for k in r[2].split(",") if k),
                       owes_since=r[3], proven_at=r[4],
                       locked_reason=LockedReason(r[5]) if r[5] else None,
                       allowed_ips=tuple(json.loads(r[6])), session_started_at=r[7], last_handshake=r[8],
                       step_up=bool(r[9]))
            for r in await self._all("SELECT * FROM peers")
        ]
        return teams, members, records

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        async with self.db.execute(sql, args) as cur:
            return list(await cur.fetchall())

    async def _one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        async with self.db.execute(sql, args) as cur:
            return await cur.fetchone()

    # ---- teams and members ------------------------------------------------------------------------

    async def team_version(self, team_id: str) -> int | None:
        row = await self._one("SELECT version FROM teams WHERE team_id=?", (team_id,))
        return int(row[0]) if row else None

    async def save_team(self, t: TeamPolicy) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO teams VALUES (?,?,?,?,?,?,?)",
            (t.team_id, t.version, t.scope.value, t.roles.value, int(t.totp_prior_connection),
             int(t.device_prior_connection), t.reverify_interval))

    async def member_exists(self, member_id: str) -> bool:
        return await self._one("SELECT 1 FROM members WHERE member_id=?", (member_id,)) is not None

    async def owners(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(keys)
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        rows = await self._all(f"SELECT public_key, member_id FROM member_peers WHERE public_key IN ({marks})",  # noqa: S608
                               keys)
        return {r[0]: r[1] for r in rows}

    async def save_member(self, member_id: str, team_id: str, role: Role, peers: Iterable[str]) -> None:
        await self.db.execute(
            "INSERT INTO members (member_id, team_id, role) VALUES (?,?,?) "
            "ON CONFLICT(member_id) DO UPDATE SET team_id=excluded.team_id, role=excluded.role",
            (member_id, team_id, role.value))
        await self.db.execute("DELETE FROM member_peers WHERE member_id=?", (member_id,))
        await self.db.executemany("INSERT INTO member_peers VALUES (?,?)", [(k, member_id) for k in peers])

    async def delete_member(self, member_id: str) -> None:
        await self.db.execute("DELETE FROM members WHERE member_id=?", (member_id,))

    async def factors(self, member_id: str) -> frozenset[Factor]:
        found = set()
        if await self._one("SELECT 1 FROM totp WHERE member_id=?", (member_id,)):
            found.add(Factor.TOTP)
        if await self._one("SELECT 1 FROM backup_codes WHERE member_id=? AND used_at IS NULL", (member_id,)):
            found.add(Factor.BACKUP_CODE)
        if await self._one("SELECT 1 FROM device_credentials WHERE member_id=?", (member_id,)):
            found.add(Factor.DEVICE)
        return frozenset(found)

    async def member_auth(self, member_id: str) -> MemberAuth | None:
        row = await self._one("SELECT failures, last_failure_at, locked, reset_pending FROM members "
                              "WHERE member_id=?", (member_id,))
        if row is None:
            return None
        slots: dict[str, TotpFactor] = {}
        for slot, nonce, ct, alg, digits, period, last_step in await self._all(
                "SELECT slot, nonce, secret_ct, algorithm, digits, period, last_step FROM totp "
                "WHERE member_id=?", (member_id,)):
            secret = self._box.open(nonce, ct, _aad(member_id, slot))
            slots[slot] = TotpFactor(secret=secret, algorithm=Algorithm(alg), digits=digits, period=period,
                                     last_step=last_step)
        return MemberAuth(attempts=AttemptState(failures=row[0], last_failure_at=row[1], locked=bool(row[2])),
                          reset_pending=bool(row[3]), totp=slots.get("active"),
                          pending_totp=slots.get("pending"))

    async def save_attempts(self, member_id: str, state: AttemptState) -> None:
        await self.db.execute("UPDATE members SET failures=?, last_failure_at=?, locked=? WHERE member_id=?",
                              (state.failures, state.last_failure_at, int(state.locked), member_id))

    async def set_reset_pending(self, member_id: str, pending: bool) -> None:
        await self.db.execute("UPDATE members SET reset_pending=? WHERE member_id=?", (int(pending), member_id))

    async def save_totp(self, member_id: str, slot: str, f: TotpFactor) -> None:
        nonce, ct = self._box.seal(f.secret, _aad(member_id, slot))
        await self.db.execute(
            "INSERT OR REPLACE INTO totp VALUES (?,?,?,?,?,?,?,?)",
            (member_id, slot, nonce, ct, f.algorithm.value, f.digits, f.period, f.last_step))

    async def set_totp_step(self, member_id: str, slot: str, step: int) -> None:
        await self.db.execute("UPDATE totp SET last_step=? WHERE member_id=? AND slot=?",
                              (step, member_id, slot))

    async def promote_pending_totp(self, member_id: str, step: int) -> None:
        """The new factor was used: it replaces the old one, which is invalid from now on."""
        row = await self._one("SELECT nonce, secret_ct, algorithm, digits, period FROM totp "
                              "WHERE member_id=? AND slot='pending'", (member_id,))
        if row is None:
            raise RuntimeError("no pending TOTP factor")
        secret = self._box.open(row[0], row[1], _aad(member_id, "pending"))
        await self.db.execute("DELETE FROM totp WHERE member_id=?", (member_id,))
        await self.save_totp(member_id, "active", TotpFactor(
            secret=secret, algorithm=Algorithm(row[2]), digits=row[3], period=row[4], last_step=step))

    # ---- backup codes -----------------------------------------------------------------------------

    async def replace_backup_set(self, member_id: str, params: KdfParams, hashes: Sequence[bytes]) -> None:
        await self.db.execute("DELETE FROM backup_sets WHERE member_id=?", (member_id,))
        await self.db.execute("INSERT INTO backup_sets VALUES (?,?,?,?,?,?)",
                              (member_id, params.salt, params.n, params.r, params.p, params.dklen))
        await self.db.executemany("INSERT INTO backup_codes VALUES (?,?,?,NULL)",
                                  [(member_id, i, h) for i, h in enumerate(hashes)])

    async def backup_params(self, member_id: str) -> KdfParams | None:
        row = await self._one("SELECT salt, n, r, p, dklen FROM backup_sets WHERE member_id=?", (member_id,))
        return KdfParams(salt=row[0], n=row[1], r=row[2], p=row[3], dklen=row[4]) if row else None

    async def unused_backup_codes(self, member_id: str) -> list[tuple[int, bytes]]:
        rows = await self._all("SELECT idx, hash FROM backup_codes WHERE member_id=? AND used_at IS NULL",
                               (member_id,))
        return [(r[0], r[1]) for r in rows]

    async def consume_backup_code(self, member_id: str, index: int, now: float) -> bool:
        cur = await self.db.execute(
            "UPDATE backup_codes SET used_at=? WHERE member_id=? AND idx=? AND used_at IS NULL",
            (now, member_id, index))
        return cur.rowcount == 1

    # ---- device credentials (stored; verification arrives with the device-proof work) --------------

    async def replace_device_credentials(self, member_id: str, creds: Sequence[tuple[bytes, bytes, int, bytes]]
                                         ) -> None:
        await self.db.execute("DELETE FROM device_credentials WHERE member_id=?", (member_id,))
        await self.db.executemany("INSERT INTO device_credentials VALUES (?,?,?,?,?)",
                                  [(member_id, *c) for c in creds])

    async def device_credential(self, member_id: str, credential_id: bytes) -> tuple[bytes, int, bytes] | None:
        """(COSE public key, sign count, user handle) of the member's credential."""
        row = await self._one("SELECT cose_public_key, sign_count, user_handle FROM device_credentials "
                              "WHERE member_id=? AND credential_id=?", (member_id, credential_id))
        return (row[0], row[1], row[2]) if row else None

    async def set_sign_count(self, member_id: str, credential_id: bytes, count: int) -> None:
        await self.db.execute("UPDATE device_credentials SET sign_count=? WHERE member_id=? AND credential_id=?",
                              (count, member_id, credential_id))

    async def issue_nonce(self, nonce: bytes, public_key: str, member_id: str, now: float, ttl: float) -> None:
        await self.db.execute("DELETE FROM device_challenges WHERE expires_at < ?", (now - 3600,))
        await self.db.execute("INSERT INTO device_challenges VALUES (?,?,?,?,?,NULL)",
                              (nonce, public_key, member_id, now, now + ttl))

    async def take_nonce(self, nonce: bytes, now: float) -> tuple[str, str, float] | None:
        """Consume an unused nonce: (peer key, member id, expiry), or None if unknown or already used."""
        row = await self._one("SELECT public_key, member_id, expires_at FROM device_challenges "
                              "WHERE nonce=? AND used_at IS NULL", (nonce,))
        if row is None:
            return None
        cur = await self.db.execute("UPDATE device_challenges SET used_at=? WHERE nonce=? AND used_at IS NULL",
                                    (now, nonce))
        return (row[0], row[1], row[2]) if cur.rowcount == 1 else None

    # ---- peers ------------------------------------------------------------------------------------

    async def save_peers(self, records: Iterable[PeerRecord]) -> None:
        await self.db.executemany(
            "INSERT OR REPLACE INTO peers VALUES (?,?,?,?,?,?,?,?,?,?)",
            [(r.public_key, r.state.value, ",".join(sorted(k.value for k in r.owes)), r.owes_since,
              r.proven_at, r.locked_reason.value if r.locked_reason else None, json.dumps(list(r.allowed_ips)),
              r.session_started_at, r.last_handshake, int(r.step_up)) for r in records])

    async def forget_peers(self, keys: Iterable[str]) -> None:
        await self.db.executemany("DELETE FROM peers WHERE public_key=?", [(k,) for k in keys])

    # ---- idempotency ------------------------------------------------------------------------------

    async def idempotent_response(self, key: str) -> dict[str, Any] | None:
        row = await self._one("SELECT response FROM idempotency WHERE key=?", (key,))
        return json.loads(row[0]) if row else None

    async def save_idempotent_response(self, key: str, response: dict[str, Any], now: float) -> None:
        await self.db.execute("INSERT INTO idempotency VALUES (?,?,?)", (key, json.dumps(response), now))

    # ---- outbox -----------------------------------------------------------------------------------

    async def append_events(self, events: Sequence[StoredEvent]) -> None:
        await self.db.executemany(
            "INSERT INTO outbox (cursor, id, type, time, subject, data_json) VALUES (?,?,?,?,?,?)",
            [(e.cursor, e.id, e.type, e.time, e.subject, e.data_json) for e in events])

    async def prune_outbox(self, keep: int, *, keep_unpublished: bool, max_unpublished: int) -> None:
        """Keep the latest `keep` events; with a broker, also every event not yet acknowledged by it, up to
        `max_unpublished` (beyond that the oldest are dropped, loudly: a broker that is gone for good must not
        fill the disk)."""
        limit = self.next_cursor - 1 - keep
        if not keep_unpublished:
            await self.db.execute("DELETE FROM outbox WHERE cursor <= ?", (limit,))
            return
        await self.db.execute("DELETE FROM outbox WHERE cursor <= ? AND published = 1", (limit,))
        cur = await self.db.execute(
            "DELETE FROM outbox WHERE published = 0 AND cursor <= ?", (self.next_cursor - 1 - max_unpublished,))
        if cur.rowcount:
            logging.getLogger(__name__).error("outbox over %d unpublished events: dropped the %d oldest",
                                              max_unpublished, cur.rowcount)

    async def mark_published(self, cursors: Sequence[int]) -> None:
        await self.db.executemany("UPDATE outbox SET published = 1 WHERE cursor = ?", [(c,) for c in cursors])

    async def unpublished(self, limit: int) -> list[StoredEvent]:
        assert self._reader is not None
        async with self._reader.execute(
            "SELECT cursor, id, type, time, subject, data_json FROM outbox WHERE published = 0 "
            "ORDER BY cursor LIMIT ?", (limit,)) as cur:
            return _events(await cur.fetchall())

    async def outbox_stats(self) -> tuple[int, float | None]:
        """(unpublished events, time of the oldest unpublished one)."""
        assert self._reader is not None
        async with self._reader.execute("SELECT count(*), min(time) FROM outbox WHERE published = 0") as cur:
            row = await cur.fetchone()
        return (int(row[0]), row[1]) if row else (0, None)

    async def events_after(self, cursor: int, limit: int = 1000) -> list[StoredEvent]:
        assert self._reader is not None
        async with self._reader.execute(
            "SELECT cursor, id, type, time, subject, data_json FROM outbox WHERE cursor > ? "
            "ORDER BY cursor LIMIT ?", (cursor, limit)) as cur:
            return _events(await cur.fetchall())
