from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from gatewayd.adapters.sqlite import SecretBox, SqliteStore
from gatewayd.adapters.sqlite.database import MIGRATIONS
from gatewayd.auth.totp import TotpFactor
from gatewayd.core.model import Role
from gatewayd.errors import StartupError

SECRET = b"very-secret-totp-seed"


async def opened(path: Path, key: bytes) -> SqliteStore:
    store = SqliteStore(path, SecretBox(key))
    await store.open()
    return store


async def test_pragmas_and_migrations(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s.db", os.urandom(32))
    async with store.writer.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone())[0] == "wal"
    async with store.writer.execute("PRAGMA synchronous") as cur:
        assert (await cur.fetchone())[0] == 2  # FULL
    async with store.writer.execute("PRAGMA wal_autocheckpoint") as cur:
        assert (await cur.fetchone())[0] == 0  # never inside a COMMIT: see Store.checkpoint
    async with store.writer.execute("PRAGMA user_version") as cur:
        assert (await cur.fetchone())[0] == len(MIGRATIONS)
    await store.close()
    # Reopening runs no migration twice; a newer schema is refused.
    store = await opened(tmp_path / "s.db", os.urandom(32))
    await store.close()
    conn = sqlite3.connect(tmp_path / "s.db")
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StartupError, match="newer"):
        await opened(tmp_path / "s.db", os.urandom(32))


async def test_totp_secret_is_encrypted_at_rest_and_bound_to_its_row(tmp_path: Path) -> None:
    key = os.urandom(32)
    store = await opened(tmp_path / "s.db", key)
    await store.begin()
    await store.state.save_member("alice", "t", Role.MEMBER, [])
    await store.state.save_totp("alice", "active", TotpFactor(secret=SECRET))
    await store.commit()
    auth = await store.state.member_auth("alice")
    assert auth is not None and auth.totp is not None and auth.totp.secret == SECRET
    await store.close()
    for f in tmp_path.iterdir():
        assert SECRET not in f.read_bytes(), f.name
    assert oct((tmp_path / "s.db").stat().st_mode & 0o777) == "0o600"
    # Another key cannot read it; a ciphertext moved to another member's row does not open either.
    other = await opened(tmp_path / "s.db", os.urandom(32))
    with pytest.raises(InvalidTag):
        await other.state.member_auth("alice")
    await other.close()
    store = await opened(tmp_path / "s.db", key)
    await store.begin()
    await store.state.save_member("mallory", "t", Role.MEMBER, [])
    await store.writer.execute("INSERT INTO totp SELECT 'mallory', slot, nonce, secret_ct, algorithm, digits, period, "
                           "last_step FROM totp WHERE member_id='alice'")
    await store.commit()
    with pytest.raises(InvalidTag):
        await store.state.member_auth("mallory")
    await store.close()


async def test_savepoint_rollback_leaves_nothing(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s.db", os.urandom(32))
    await store.begin()
    await store.savepoint()
    await store.state.save_member("alice", "t", Role.MEMBER, [])
    await store.rollback_savepoint()
    await store.savepoint()
    await store.state.save_member("bob", "t", Role.MEMBER, [])
    await store.release_savepoint()
    await store.commit()
    assert not await store.state.member_exists("alice")
    assert await store.state.member_exists("bob")
    await store.close()


def test_secrets_key_file_formats(tmp_path: Path) -> None:
    raw = os.urandom(32)
    (tmp_path / "raw").write_bytes(raw)
    (tmp_path / "hex").write_text(raw.hex() + "\n")
    (tmp_path / "bad").write_text("not a key")
    box1, box2 = SecretBox.from_file(tmp_path / "raw"), SecretBox.from_file(tmp_path / "hex")
    nonce, ct = box1.seal(b"x", b"aad")
    assert box2.open(nonce, ct, b"aad") == b"x"
    with pytest.raises(StartupError, match="32 raw bytes"):
        SecretBox.from_file(tmp_path / "bad")


async def test_a_write_lock_held_by_another_process_is_waited_for_off_the_event_loop(tmp_path: Path) -> None:
    """The writer's statements run on the event loop; BEGIN IMMEDIATE, if it must wait for another holder of the
    write lock (an operator's sqlite3 shell), waits in a worker thread while the loop goes on."""
    store = await opened(tmp_path / "s.db", os.urandom(32))
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    release = threading.Timer(0.4, lambda: other.execute("COMMIT"))
    release.start()
    try:
        await store.begin()
        assert ticks >= 20, ticks  # the loop kept running while the lock was waited for
        await store.state.save_member("m", "t", Role.MEMBER, [])
        await store.commit()
    finally:
        ticker.cancel()
        release.join()
        other.close()
        await store.close()


async def test_the_set_based_load_gives_each_member_the_factors_its_rows_show(tmp_path: Path) -> None:
    """load() reads factors with one query per kind for all members; factors() asks for one member: they agree,
    including a member whose backup codes are all used (no BACKUP_CODE) and one with nothing enrolled."""
    from gatewayd.auth.backup import KdfParams
    from gatewayd.core.model import Factor
    from gatewayd.ports import DeviceCredential

    store = await opened(tmp_path / "s.db", os.urandom(32))
    await store.begin()
    params = KdfParams(salt=b"s" * 16, n=2, r=1, p=1, dklen=32)
    for member in ("totp", "backup", "used-up", "device", "all", "none"):
        await store.state.save_member(member, "t", Role.MEMBER, [])
    for member in ("totp", "all"):
        await store.state.save_totp(member, "active", TotpFactor(secret=SECRET))
    for member in ("backup", "used-up", "all"):
        await store.state.replace_backup_set(member, params, [b"h1", b"h2"])
    for index in (0, 1):
        assert await store.state.consume_backup_code("used-up", index, 1.0)
    for member in ("device", "all"):
        await store.state.replace_device_credentials(member, [DeviceCredential(
            credential_id=member.encode(), cose_public_key=b"k", sign_count=0, user_handle=b"u")])
    await store.commit()
    _, members, _ = await store.load()
    loaded = {m.member_id: m.factors for m in members}
    assert loaded == {
        "totp": {Factor.TOTP}, "backup": {Factor.BACKUP_CODE}, "used-up": set(), "device": {Factor.DEVICE},
        "all": {Factor.TOTP, Factor.BACKUP_CODE, Factor.DEVICE}, "none": set()}
    for member, factors in loaded.items():
        assert await store.state.factors(member) == factors
    await store.close()


async def test_a_peer_record_round_trips_with_its_endpoint_and_unusual_prefixes(tmp_path: Path) -> None:
    from gatewayd.core.model import LockedReason, PeerRecord, PeerState, ProofKind

    store = await opened(tmp_path / "s.db", os.urandom(32))
    records = [
        PeerRecord(public_key="a", state=PeerState.QUARANTINED, owes=frozenset({ProofKind.OTP, ProofKind.DEVICE}),
                   owes_since=1.5, proven_at=None, locked_reason=None, allowed_ips=("10.0.0.1/32",),
                   session_started_at=2.0, last_handshake=3.0, step_up=True, admitted_at=None,
                   endpoint="[2001:db8::1]:51820"),
        PeerRecord(public_key="b", state=PeerState.LOCKED, owes=frozenset(), owes_since=None, proven_at=4.0,
                   locked_reason=next(iter(LockedReason)), allowed_ips=("10.0.1.0/24", "fd00::1/128"),
                   session_started_at=None, last_handshake=None, step_up=False, admitted_at=5.0, endpoint=None),
        PeerRecord(public_key="c", state=PeerState.AUTHORIZED, owes=frozenset(), owes_since=None, proven_at=None,
                   locked_reason=None, allowed_ips=(), session_started_at=None, last_handshake=None,
                   step_up=False, admitted_at=None, endpoint="192.0.2.7:1"),
    ]
    await store.begin()
    await store.state.save_peers(records)
    await store.commit()
    await store.close()
    store = await opened(tmp_path / "s.db", os.urandom(32))
    _, _, loaded = await store.load()
    assert sorted(loaded, key=lambda r: r.public_key) == records
    await store.close()


def test_event_ids_are_unique_time_ordered_uuids() -> None:
    """Event ids are RFC 9562 version 7 UUIDs: canonical text, the creation time in milliseconds up front (an id
    made in a later millisecond sorts after the earlier ones: the outbox's unique index grows at its end), and
    74 random bits that keep ids of the same millisecond apart."""
    import time
    import uuid

    from gatewayd.ports import new_event_id

    def millis(text: str) -> int:
        return uuid.UUID(text).int >> 80

    before = time.time_ns() // 1_000_000
    ids = [new_event_id() for _ in range(20_000)]
    while time.time_ns() // 1_000_000 <= millis(ids[-1]):
        time.sleep(0.001)
    later = new_event_id()
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for text in (later, *ids[:1000], *ids[-1000:]):
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # canonical: lower case, 8-4-4-4-12
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before <= millis(text) <= after
    assert millis(later) > millis(ids[-1])
    assert all(text < later for text in ids)
    # the random part is not a counter: no two ids share it
    assert len({uuid.UUID(t).int & ((1 << 74) - 1) for t in ids}) == len(ids)


@pytest.mark.parametrize("clock_ns", [-1, 0, (1 << 48) * 1_000_000 + 5_000_000])
def test_an_event_id_is_made_whatever_the_clock_says(monkeypatch: pytest.MonkeyPatch, clock_ns: int) -> None:
    """A clock set before 1970 or past what 48 bits of milliseconds hold still gives a valid id (an event must
    never fail for its id): the time field wraps."""
    import time
    import uuid

    from gatewayd.ports import new_event_id

    monkeypatch.setattr(time, "time_ns", lambda: clock_ns)
    parsed = uuid.UUID(new_event_id())
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert parsed.int >> 80 == (clock_ns // 1_000_000) % (1 << 48)
