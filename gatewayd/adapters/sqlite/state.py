"""Gateway state in SQLite: teams, members, factors (TOTP secrets sealed by the SecretBox), backup codes,
device credentials and challenges, peers and idempotent answers. Writes run on the driver's transaction."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from gatewayd.adapters.sqlite.database import Database
from gatewayd.adapters.sqlite.secretbox import SecretBox
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
    proof_set,
)
from gatewayd.ports import DeviceCredential, MemberAuth

_FACTOR_ROWS = (
    (Factor.TOTP, "totp", ""),
    (Factor.BACKUP_CODE, "backup_codes", " AND used_at IS NULL"),
    (Factor.DEVICE, "device_credentials", ""),
)
"""Where a member's row shows it has a factor: (factor, table, extra condition)."""


def _prefixes(text: str) -> tuple[str, ...]:
    """The stored JSON list of prefixes; the usual one-prefix list without a parse. Interned, as the interface
    reads intern theirs: one string object per prefix however many hold it."""
    if text.startswith('["') and text.endswith('"]') and '"' not in text[2:-2] and "\\" not in text:
        return (sys.intern(text[2:-2]),)
    return tuple(sys.intern(p) for p in json.loads(text))


def _aad(member_id: str, slot: str) -> bytes:
    return f"gatewayd/totp/{member_id}/{slot}".encode()


class SqliteState:
    def __init__(self, db: Database, box: SecretBox) -> None:
        self.db = db
        self._box = box

    # ---- loading ----------------------------------------------------------------------------------

    async def load(self) -> tuple[list[TeamPolicy], list[Member], Iterator[PeerRecord]]:
        """Teams and members, and the peers' records as they are read (consume them before the next statement
        of the driver's). Rows are read one at a time, not fetched all at once: at 100,000 peers the transient
        rows, sets and records were ~100 MB, and the allocator kept much of it after they were freed."""
        teams = [
            TeamPolicy(team_id=r[0], version=r[1], scope=Scope(r[2]), roles=Roles(r[3]),
                       totp_prior_connection=bool(r[4]), device_prior_connection=bool(r[5]),
                       reverify_interval=r[6])
            for r in self.db.writer.rows("SELECT * FROM teams")
        ]
        # Keys and team ids interned: one string object per key (shared with the peers' rows and the interface's
        # reads, see adapters/wireguard) and per team, not one per row. A member's keys are gathered in the
        # tuple its Member keeps (most members have one key).
        peers_of: dict[str, tuple[str, ...]] = {}
        for key, member_id in self.db.writer.rows("SELECT public_key, member_id FROM member_peers"):
            peers_of[member_id] = (*peers_of.get(member_id, ()), sys.intern(key))
        # One query per factor kind, not three per member (100,000 members: 0.3 s instead of minutes); a
        # member's factors as bits while gathering.
        factors_of: dict[str, int] = {}
        for bit, (_, table, condition) in enumerate(_FACTOR_ROWS):
            for (member_id,) in self.db.writer.rows(f"SELECT DISTINCT member_id FROM {table} WHERE 1{condition}"):  # noqa: S608
                factors_of[member_id] = factors_of.get(member_id, 0) | 1 << bit
        factor_sets = [frozenset(f for bit, (f, _, _) in enumerate(_FACTOR_ROWS) if mask >> bit & 1)
                       for mask in range(1 << len(_FACTOR_ROWS))]
        no_peers: tuple[str, ...] = ()
        members = []
        for member_id, team_id, role, locked in self.db.writer.rows(
                "SELECT member_id, team_id, role, locked FROM members"):
            keys = peers_of.pop(member_id, no_peers)
            members.append(Member(member_id=member_id, team_id=sys.intern(team_id), role=Role(role),
                                  peers=keys if len(keys) < 2 else tuple(sorted(keys)),
                                  factors=factor_sets[factors_of.get(member_id, 0)], locked=bool(locked)))
        del peers_of, factors_of
        return teams, members, self._peer_records()

    def _peer_records(self) -> Iterator[PeerRecord]:
        # A handful of distinct values across 100,000 rows: each is parsed once.
        states = {s.value: s for s in PeerState}
        reasons: dict[str | None, LockedReason | None] = {None: None, "": None}
        reasons.update((r.value, r) for r in LockedReason)
        owes_of: dict[str, frozenset[ProofKind]] = {}
        for r in self.db.writer.rows(
                "SELECT public_key, state, owes, owes_since, proven_at, locked_reason, allowed_ips, "
                "session_started_at, last_handshake, step_up, admitted_at, endpoint FROM peers"):
            owes = owes_of.get(r[2])
            if owes is None:
                owes = owes_of[r[2]] = proof_set(ProofKind(k) for k in r[2].split(",") if k)
            yield PeerRecord(public_key=sys.intern(r[0]), state=states[r[1]], owes=owes, owes_since=r[3],
                             proven_at=r[4], locked_reason=reasons[r[5]], allowed_ips=_prefixes(r[6]),
                             session_started_at=r[7], last_handshake=r[8], step_up=bool(r[9]),
                             admitted_at=r[10], endpoint=sys.intern(r[11]) if r[11] else r[11])

    # ---- teams and members ------------------------------------------------------------------------

    async def team_version(self, team_id: str) -> int | None:
        row = await self.db.one("SELECT version FROM teams WHERE team_id=?", (team_id,))
        return int(row[0]) if row else None

    async def save_team(self, t: TeamPolicy) -> None:
        await self.db.writer.execute(
            "INSERT OR REPLACE INTO teams VALUES (?,?,?,?,?,?,?)",
            (t.team_id, t.version, t.scope.value, t.roles.value, int(t.totp_prior_connection),
             int(t.device_prior_connection), t.reverify_interval))

    async def member_exists(self, member_id: str) -> bool:
        return await self.db.one("SELECT 1 FROM members WHERE member_id=?", (member_id,)) is not None

    async def owners(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(keys)
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        rows = await self.db.all(f"SELECT public_key, member_id FROM member_peers WHERE public_key IN ({marks})",  # noqa: S608
                               keys)
        return {r[0]: r[1] for r in rows}

    async def save_member(self, member_id: str, team_id: str, role: Role, peers: Iterable[str]) -> None:
        await self.db.writer.execute(
            "INSERT INTO members (member_id, team_id, role) VALUES (?,?,?) "
            "ON CONFLICT(member_id) DO UPDATE SET team_id=excluded.team_id, role=excluded.role",
            (member_id, team_id, role.value))
        await self.db.writer.execute("DELETE FROM member_peers WHERE member_id=?", (member_id,))
        await self.db.writer.executemany("INSERT INTO member_peers VALUES (?,?)", [(k, member_id) for k in peers])

    async def delete_member(self, member_id: str) -> None:
        await self.db.writer.execute("DELETE FROM members WHERE member_id=?", (member_id,))

    async def factors(self, member_id: str) -> frozenset[Factor]:
        found = set()
        for factor, table, condition in _FACTOR_ROWS:
            if await self.db.one(f"SELECT 1 FROM {table} WHERE member_id=?{condition} LIMIT 1",  # noqa: S608
                                 (member_id,)):
                found.add(factor)
        return frozenset(found)

    async def member_auth(self, member_id: str) -> MemberAuth | None:
        # One statement (a proof reads this first): the member's attempt state with each TOTP slot, if any.
        rows = await self.db.all(
            "SELECT m.failures, m.last_failure_at, m.locked, m.reset_pending, t.slot, t.nonce, t.secret_ct, "
            "t.algorithm, t.digits, t.period, t.last_step FROM members m LEFT JOIN totp t USING (member_id) "
            "WHERE m.member_id=?", (member_id,))
        if not rows:
            return None
        slots: dict[str, TotpFactor] = {}
        for *_, slot, nonce, ct, alg, digits, period, last_step in rows:
            if slot is not None:
                secret = self._box.open(nonce, ct, _aad(member_id, slot))
                slots[slot] = TotpFactor(secret=secret, algorithm=Algorithm(alg), digits=digits, period=period,
                                         last_step=last_step)
        row = rows[0]
        return MemberAuth(attempts=AttemptState(failures=row[0], last_failure_at=row[1], locked=bool(row[2])),
                          reset_pending=bool(row[3]), totp=slots.get("active"),
                          pending_totp=slots.get("pending"))

    async def save_attempts(self, member_id: str, state: AttemptState) -> None:
        await self.db.writer.execute("UPDATE members SET failures=?, last_failure_at=?, locked=? WHERE member_id=?",
                              (state.failures, state.last_failure_at, int(state.locked), member_id))

    async def set_reset_pending(self, member_id: str, pending: bool) -> None:
        await self.db.writer.execute("UPDATE members SET reset_pending=? WHERE member_id=?", (int(pending), member_id))

    async def save_totp(self, member_id: str, slot: str, f: TotpFactor) -> None:
        nonce, ct = self._box.seal(f.secret, _aad(member_id, slot))
        await self.db.writer.execute(
            "INSERT OR REPLACE INTO totp VALUES (?,?,?,?,?,?,?,?)",
            (member_id, slot, nonce, ct, f.algorithm.value, f.digits, f.period, f.last_step))

    async def drop_pending_totp(self, member_id: str) -> None:
        """Forget a TOTP enrollment that was never confirmed (a new MFA reset starts over)."""
        await self.db.writer.execute("DELETE FROM totp WHERE member_id=? AND slot='pending'", (member_id,))

    async def set_totp_step(self, member_id: str, slot: str, step: int) -> None:
        await self.db.writer.execute("UPDATE totp SET last_step=? WHERE member_id=? AND slot=?",
                              (step, member_id, slot))

    async def promote_pending_totp(self, member_id: str, step: int) -> None:
        """The new factor was used: it replaces the old one, which is invalid from now on."""
        row = await self.db.one("SELECT nonce, secret_ct, algorithm, digits, period FROM totp "
                              "WHERE member_id=? AND slot='pending'", (member_id,))
        if row is None:
            raise RuntimeError("no pending TOTP factor")
        secret = self._box.open(row[0], row[1], _aad(member_id, "pending"))
        await self.db.writer.execute("DELETE FROM totp WHERE member_id=?", (member_id,))
        await self.save_totp(member_id, "active", TotpFactor(
            secret=secret, algorithm=Algorithm(row[2]), digits=row[3], period=row[4], last_step=step))

    # ---- backup codes -----------------------------------------------------------------------------

    async def replace_backup_set(self, member_id: str, params: KdfParams, hashes: Sequence[bytes]) -> None:
        await self.db.writer.execute("DELETE FROM backup_sets WHERE member_id=?", (member_id,))
        await self.db.writer.execute(
            "INSERT INTO backup_sets (member_id, salt, n, r, p, dklen) VALUES (?,?,?,?,?,?)",
            (member_id, params.salt, params.n, params.r, params.p, params.dklen))
        await self.db.writer.executemany("INSERT INTO backup_codes VALUES (?,?,?,NULL)",
                                  [(member_id, i, h) for i, h in enumerate(hashes)])

    async def mark_backup_set_before_reset(self, member_id: str) -> None:
        await self.db.writer.execute("UPDATE backup_sets SET before_reset=1 WHERE member_id=?", (member_id,))

    async def drop_backup_set_before_reset(self, member_id: str) -> int:
        rows = await self.db.all("SELECT count(*) FROM backup_codes JOIN backup_sets USING (member_id) "
                                 "WHERE member_id=? AND before_reset=1 AND used_at IS NULL", (member_id,))
        await self.db.writer.execute("DELETE FROM backup_sets WHERE member_id=? AND before_reset=1", (member_id,))
        return int(rows[0][0]) if rows else 0

    async def backup_params(self, member_id: str) -> KdfParams | None:
        row = await self.db.one("SELECT salt, n, r, p, dklen FROM backup_sets WHERE member_id=?", (member_id,))
        return KdfParams(salt=row[0], n=row[1], r=row[2], p=row[3], dklen=row[4]) if row else None

    async def unused_backup_codes(self, member_id: str) -> list[tuple[int, bytes]]:
        rows = await self.db.all("SELECT idx, hash FROM backup_codes WHERE member_id=? AND used_at IS NULL",
                               (member_id,))
        return [(r[0], r[1]) for r in rows]

    async def consume_backup_code(self, member_id: str, index: int, now: float) -> bool:
        cur = await self.db.writer.execute(
            "UPDATE backup_codes SET used_at=? WHERE member_id=? AND idx=? AND used_at IS NULL",
            (now, member_id, index))
        return cur.rowcount == 1

    # ---- device credentials and their single-use challenges -----------------------------------

    async def replace_device_credentials(self, member_id: str, creds: Sequence[DeviceCredential]) -> None:
        await self.db.writer.execute("DELETE FROM device_credentials WHERE member_id=?", (member_id,))
        await self.db.writer.executemany(
            "INSERT INTO device_credentials VALUES (?,?,?,?,?)",
            [(member_id, c.credential_id, c.cose_public_key, c.sign_count, c.user_handle) for c in creds])

    async def device_credential(self, member_id: str, credential_id: bytes) -> DeviceCredential | None:
        """The member's credential with this id, if it is the member's."""
        row = await self.db.one("SELECT cose_public_key, sign_count, user_handle FROM device_credentials "
                                "WHERE member_id=? AND credential_id=?", (member_id, credential_id))
        return DeviceCredential(credential_id=credential_id, cose_public_key=row[0], sign_count=row[1],
                                user_handle=row[2]) if row else None

    async def set_sign_count(self, member_id: str, credential_id: bytes, count: int) -> None:
        await self.db.writer.execute("UPDATE device_credentials SET sign_count=? WHERE member_id=? AND credential_id=?",
                              (count, member_id, credential_id))

    async def issue_nonce(self, nonce: bytes, public_key: str, member_id: str, now: float, ttl: float) -> None:
        await self.db.writer.execute("DELETE FROM device_challenges WHERE expires_at < ?", (now - 3600,))
        await self.db.writer.execute("INSERT INTO device_challenges VALUES (?,?,?,?,?,NULL)",
                              (nonce, public_key, member_id, now, now + ttl))

    async def take_nonce(self, nonce: bytes, now: float) -> tuple[str, str, float] | None:
        """Consume an unused nonce: (peer key, member id, expiry), or None if unknown or already used."""
        row = await self.db.one("SELECT public_key, member_id, expires_at FROM device_challenges "
                              "WHERE nonce=? AND used_at IS NULL", (nonce,))
        if row is None:
            return None
        cur = await self.db.writer.execute("UPDATE device_challenges SET used_at=? WHERE nonce=? AND used_at IS NULL",
                                    (now, nonce))
        return (row[0], row[1], row[2]) if cur.rowcount == 1 else None

    # ---- peers ------------------------------------------------------------------------------------

    async def save_peers(self, records: Iterable[PeerRecord]) -> None:
        await self.db.writer.executemany(
            "INSERT OR REPLACE INTO peers (public_key, state, owes, owes_since, proven_at, locked_reason, "
            "allowed_ips, session_started_at, last_handshake, step_up, admitted_at, endpoint) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [(r.public_key, r.state.value, ",".join(sorted(k.value for k in r.owes)), r.owes_since,
              r.proven_at, r.locked_reason.value if r.locked_reason else None, json.dumps(list(r.allowed_ips)),
              r.session_started_at, r.last_handshake, int(r.step_up), r.admitted_at, r.endpoint) for r in records])

    async def forget_peers(self, keys: Iterable[str]) -> None:
        await self.db.writer.executemany("DELETE FROM peers WHERE public_key=?", [(k,) for k in keys])

    # ---- idempotency ------------------------------------------------------------------------------

    async def idempotent_response(self, key: str) -> dict[str, Any] | None:
        row = await self.db.one("SELECT response FROM idempotency WHERE key=?", (key,))
        return json.loads(row[0]) if row else None

    async def save_idempotent_response(self, key: str, response: dict[str, Any], now: float) -> None:
        await self.db.writer.execute("INSERT INTO idempotency VALUES (?,?,?)", (key, json.dumps(response), now))
