"""ChallengeService over real gRPC on loopback: the caller is the peer whose tunnel address is 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import grpc
import pytest

from gatewayd.auth import backup
from gatewayd.errors import Refused
from gatewayd.runtime.proofs import Prove, SubmitBackupCode
from gatewayd.v1 import challenge_pb2, control_pb2, types_pb2
from tests.harness import Harness, eventually, gw_either_challenge_server, key, start, stop
from tests.pki import Authority

__all__ = ["gw_either_challenge_server"]

ME = key(1)
LOOPBACK = "127.0.0.1/32"


async def quarantined(gw: Harness, **enroll: object) -> None:
    gw.source.add(ME, LOOPBACK, handshake=gw.clock() - 1)
    await gw.enroll("alice", (ME,), **enroll)  # type: ignore[arg-type]
    await gw.poll()
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key=os.urandom(8).hex()))
    assert LOOPBACK in gw.enforcer.held


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    raise AssertionError("call succeeded")


def totp(code: str) -> challenge_pb2.SubmitTotpRequest:
    return challenge_pb2.SubmitTotpRequest(code=code)


async def events(gw: Harness, prefix: str) -> list[dict[str, object]]:
    rows = await gw.daemon.store.outbox.events_after(0, 10_000)
    return [{"type": e.type, **json.loads(e.data_json)} for e in rows if e.type.startswith(prefix)]


async def test_untracked_caller_is_refused(gw: Harness) -> None:
    # ::1 is nobody's tunnel address; 127.0.0.1 is not yet either.
    assert await code_of(gw.challenge("::1").GetChallenge(challenge_pb2.GetChallengeRequest())) \
        is grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(gw.challenge().SubmitTotp(totp("123456"))) is grpc.StatusCode.PERMISSION_DENIED


async def test_a_peer_calling_over_ipv6_is_known_by_its_address(gw: Harness) -> None:
    """gRPC writes an IPv6 caller as "ipv6:%5B::1%5D:port": the peer holding ::1/128 is found, asked, and released
    by its proof over IPv6 - not refused as nobody's."""
    gw.source.add(ME, LOOPBACK, "::1/128", handshake=gw.clock() - 1)
    await gw.enroll("alice", (ME,))
    await gw.poll()
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="v6"))
    six = gw.challenge("::1")
    c = await six.GetChallenge(challenge_pb2.GetChallengeRequest())
    assert c.state == types_pb2.PEER_STATE_QUARANTINED and list(c.owes) == [types_pb2.PROOF_KIND_OTP]
    assert (await six.SubmitTotp(totp(gw.code()))).accepted
    assert not {LOOPBACK, "::1/128"} & set(gw.enforcer.held)


async def test_challenge_describes_what_is_owed(gw: Harness) -> None:
    await quarantined(gw)
    c = await gw.challenge().GetChallenge(challenge_pb2.GetChallengeRequest())
    assert c.state == types_pb2.PEER_STATE_QUARANTINED
    assert list(c.owes) == [types_pb2.PROOF_KIND_OTP]
    assert list(c.accepted_factors) == [types_pb2.FACTOR_TOTP]
    assert c.attempts_left == 10


async def test_totp_accepts_once_and_replay_is_refused_across_restart(tmp_path: Path) -> None:
    ca = Authority("ca")
    gw = await start(tmp_path, ca)
    try:
        await quarantined(gw)
        code = gw.code()
        assert (await gw.challenge().SubmitTotp(totp(code))).accepted
        assert LOOPBACK not in gw.enforcer.held
        config, source, clock = gw.daemon.config, gw.source, gw.clock
    finally:
        await stop(gw)
    gw = await start(tmp_path, ca, config=config, source=source, clock=clock)
    try:
        await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="again"))
        replay = await gw.challenge().SubmitTotp(totp(code))
        assert not replay.accepted and replay.status.attempts_left == 9
        assert (await events(gw, "proof.refused"))[-1]["reason"] == "replayed"
        gw.clock.advance(30)
        assert (await gw.challenge().SubmitTotp(totp(gw.code()))).accepted
        # The accepted proof cleared the failure, in the store too (checked after another restart).
        assert (await gw.challenge().GetChallenge(challenge_pb2.GetChallengeRequest())).attempts_left == 10
    finally:
        await stop(gw)
    gw = await start(tmp_path, ca, config=config, source=source, clock=clock)
    try:
        assert (await gw.challenge().GetChallenge(challenge_pb2.GetChallengeRequest())).attempts_left == 10
    finally:
        await stop(gw)


@pytest.mark.parametrize("bad", ["12345", "1234567", "12345a", "١٢٣٤٥٦"])
async def test_malformed_codes_are_invalid_argument_and_not_counted(gw: Harness, bad: str) -> None:
    await quarantined(gw)
    assert await code_of(gw.challenge().SubmitTotp(totp(bad))) is grpc.StatusCode.INVALID_ARGUMENT
    c = await gw.challenge().GetChallenge(challenge_pb2.GetChallengeRequest())
    assert c.attempts_left == 10


def wrong(gw: Harness) -> str:
    good = {gw.code(-1), gw.code(), gw.code(1)}
    return next(c for c in (f"{n:06d}" for n in range(1_000_000)) if c not in good)


async def test_ten_failures_lock_across_restart_until_unlocked(tmp_path: Path) -> None:
    ca = Authority("ca")
    gw = await start(tmp_path, ca)
    try:
        await quarantined(gw)
        ch = gw.challenge()
        for i in range(10):
            r = await ch.SubmitTotp(totp(wrong(gw)))
            assert not r.accepted and r.status.attempts_left == 9 - i
            gw.clock.advance(120)  # past any delay
        assert r.status.state == types_pb2.PEER_STATE_LOCKED and r.status.locked_reason == "factor_locked"
        assert [e["type"] for e in await events(gw, "factor.locked")] == ["factor.locked"]
        config, source, clock = gw.daemon.config, gw.source, gw.clock
    finally:
        await stop(gw)
    gw = await start(tmp_path, ca, config=config, source=source, clock=clock)
    try:
        gw.clock.advance(10**6)  # time alone never clears it
        assert await code_of(gw.challenge().SubmitTotp(totp(gw.code()))) is grpc.StatusCode.PERMISSION_DENIED
        assert LOOPBACK in gw.enforcer.held
        await gw.local().UnlockMfa(control_pb2.UnlockMfaRequest(member_id="alice"))
        assert (await gw.challenge().SubmitTotp(totp(gw.code()))).accepted
        assert LOOPBACK not in gw.enforcer.held
    finally:
        await stop(gw)


async def test_growing_delays(gw: Harness) -> None:
    await quarantined(gw)
    ch = gw.challenge()
    for _ in range(3):
        await ch.SubmitTotp(totp(wrong(gw)))
    c = await ch.GetChallenge(challenge_pb2.GetChallengeRequest())
    assert c.HasField("retry_not_before")
    assert await code_of(ch.SubmitTotp(totp(gw.code()))) is grpc.StatusCode.RESOURCE_EXHAUSTED
    gw.clock.advance(1.0)
    assert (await ch.SubmitTotp(totp(gw.code()))).accepted


async def test_reenrollment_clears_the_lock(gw: Harness) -> None:
    await quarantined(gw)
    for _ in range(10):
        await gw.challenge().SubmitTotp(totp(wrong(gw)))
        gw.clock.advance(120)
    new = b"N" * 20
    await gw.enroll("alice", (ME,), secret=new)
    assert (await gw.challenge().SubmitTotp(totp(gw.code(secret=new)))).accepted


def backup_set(codes: list[str]) -> tuple[control_pb2.BackupCodeSet, backup.KdfParams]:
    salt = os.urandom(16)
    params = backup.KdfParams(salt=salt, n=2**10, r=8, p=1, dklen=32)
    hashes = [hashlib.scrypt(backup.normalize(c), salt=salt, n=params.n, r=8, p=1, dklen=32) for c in codes]
    return control_pb2.BackupCodeSet(salt=salt, n=params.n, r=8, p=1, hashes=hashes), params


async def test_backup_code_is_one_time_and_replacement_invalidates(gw: Harness) -> None:
    codes = ["AAAA-1111", "BBBB-2222", "CCCC-3333"]
    pb, _ = backup_set(codes)
    await quarantined(gw, backup_codes=pb)
    ch = gw.challenge()
    r = await ch.SubmitBackupCode(challenge_pb2.SubmitBackupCodeRequest(code="aaaa1111"))
    assert r.accepted and r.backup_codes_remaining == 2
    assert (await events(gw, "backup_code.used"))[-1]["remaining"] == 2
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="2"))
    r = await ch.SubmitBackupCode(challenge_pb2.SubmitBackupCodeRequest(code="AAAA-1111"))
    assert not r.accepted and r.status.attempts_left == 9  # failures count toward the limit
    new_pb, _ = backup_set(["DDDD-4444"])
    await gw.enroll("alice", (ME,), secret=None, backup_codes=new_pb)
    r = await ch.SubmitBackupCode(challenge_pb2.SubmitBackupCodeRequest(code="BBBB-2222"))
    assert not r.accepted
    r = await ch.SubmitBackupCode(challenge_pb2.SubmitBackupCodeRequest(code="DDDD-4444"))
    assert r.accepted and r.backup_codes_remaining == 0


async def test_fifty_concurrent_submissions_of_one_code(gw: Harness) -> None:
    pb, _ = backup_set(["SAME-CODE-1", "OTHER-CODE-2"])
    await quarantined(gw, backup_codes=pb)
    ch = gw.challenge()
    calls = [ch.SubmitBackupCode(challenge_pb2.SubmitBackupCodeRequest(code="SAME-CODE-1")) for _ in range(50)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    accepted = [r for r in results if isinstance(r, challenge_pb2.ProofResult) and r.accepted]
    assert len(accepted) == 1
    used = await gw.daemon.store.writer.execute_fetchall("SELECT count(*) FROM backup_codes WHERE used_at IS NOT NULL")
    assert [tuple(r) for r in used] == [(1,)]


async def test_fifty_peers_of_one_member_race_one_code(gw: Harness) -> None:
    """Fifty quarantined peers of one member submit the same code at once: exactly one is released."""
    keys = [key(100 + i) for i in range(50)]
    for i, k in enumerate(keys):
        gw.source.add(k, f"10.50.0.{i + 1}/32", handshake=gw.clock())
    pb, params = backup_set(["RACE-CODE-1"])
    await gw.enroll("alice", tuple(keys), backup_codes=pb)
    await gw.poll()
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="r"))
    derived = backup.derive("RACE-CODE-1", params)
    driver = gw.daemon.driver
    jobs = [Prove(proof=SubmitBackupCode(public_key=k, derived=derived, params=params)) for k in keys]
    outcomes = await asyncio.gather(*(driver.submit(j) for j in jobs), return_exceptions=True)
    # The losers are failed attempts (a used code), so growing delays refuse some outright.
    assert sum(getattr(o, "accepted", False) for o in outcomes) == 1
    assert all(getattr(o, "accepted", None) is not None or isinstance(o, Refused) for o in outcomes)
    released = [k for k in keys if gw.daemon.core.peers[k].state.value == "authorized"]  # type: ignore[union-attr]
    assert len(released) == 1


async def test_mfa_reset_keeps_old_factor_until_new_is_confirmed(gw: Harness) -> None:
    await quarantined(gw)
    ch = gw.challenge()
    await gw.local().ResetMfa(control_pb2.ResetMfaRequest(member_id="alice"))
    new = b"Z" * 20
    res = await gw.enroll("alice", (ME,), secret=new)
    assert res.totp_pending
    # The old factor still works while the new one is unconfirmed.
    assert (await ch.SubmitTotp(totp(gw.code()))).accepted
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="x"))
    gw.clock.advance(30)
    # First use of the new factor confirms it ...
    assert (await ch.SubmitTotp(totp(gw.code(secret=new)))).accepted
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="y"))
    gw.clock.advance(30)
    # ... and from then on the old one is invalid.
    assert not (await ch.SubmitTotp(totp(gw.code()))).accepted
    assert (await ch.SubmitTotp(totp(gw.code(secret=new)))).accepted
    steps = [e["type"] for e in await events(gw, "mfa_reset.")]
    assert steps == ["mfa_reset.requested", "mfa_reset.enrolled", "mfa_reset.completed"]


async def test_watch_status_tells_both_transitions(gw: Harness) -> None:
    gw.source.add(ME, LOOPBACK, handshake=gw.clock() - 1)
    await gw.enroll("alice", (ME,))
    await gw.poll()
    stream = gw.challenge().WatchStatus(challenge_pb2.WatchStatusRequest())
    first = await asyncio.wait_for(stream.read(), 5)
    assert first.state == types_pb2.PEER_STATE_AUTHORIZED
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="w"))
    step_up = await asyncio.wait_for(stream.read(), 5)
    assert step_up.state == types_pb2.PEER_STATE_QUARANTINED and list(step_up.owes) == [types_pb2.PROOF_KIND_OTP]
    await gw.challenge().SubmitTotp(totp(wrong(gw)))
    cost = await asyncio.wait_for(stream.read(), 5)  # a refused proof changes nothing but the attempts left
    assert cost.state == types_pb2.PEER_STATE_QUARANTINED and cost.attempts_left == 9
    assert (await gw.challenge().SubmitTotp(totp(gw.code()))).accepted
    released = await asyncio.wait_for(stream.read(), 5)
    assert released.state == types_pb2.PEER_STATE_AUTHORIZED
    stream.cancel()


async def test_a_peer_keeps_at_most_four_status_streams_and_a_fifth_closes_the_oldest(gw: Harness) -> None:
    """A peer cannot pile up WatchStatus streams (each costs a driver job at every change of its status): its
    newest caller is served, the oldest stream is told RESOURCE_EXHAUSTED, the others and other peers' go on."""
    other = key(2)
    gw.source.add(ME, LOOPBACK, handshake=gw.clock() - 1)
    gw.source.add(other, "::1/128", handshake=gw.clock() - 1)
    await gw.enroll("alice", (ME,))
    await gw.enroll("bob", (other,))
    await gw.poll()
    theirs = gw.challenge("::1").WatchStatus(challenge_pb2.WatchStatusRequest())
    assert (await asyncio.wait_for(theirs.read(), 5)).state == types_pb2.PEER_STATE_AUTHORIZED
    mine = []
    for _ in range(5):  # each open (its first message read) before the next: the first is the oldest
        mine.append(stream := gw.challenge().WatchStatus(challenge_pb2.WatchStatusRequest()))
        assert (await asyncio.wait_for(stream.read(), 5)).state == types_pb2.PEER_STATE_AUTHORIZED
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await asyncio.wait_for(mine[0].read(), 5)
    assert closed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "oldest" in (closed.value.details() or "")
    watchers = gw.daemon.driver.watchers.peers
    assert len(watchers[ME]) == 4 and len(watchers[other]) == 1
    # The four newest still hear a change, and so does the other peer's stream.
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="w4"))
    for stream in mine[1:]:
        assert (await asyncio.wait_for(stream.read(), 5)).state == types_pb2.PEER_STATE_QUARANTINED
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="bob", idempotency_key="w5"))
    assert (await asyncio.wait_for(theirs.read(), 5)).state == types_pb2.PEER_STATE_QUARANTINED
    for stream in (*mine[1:], theirs):
        stream.cancel()
    await eventually(lambda: watchers == {})


async def test_nothing_owed_is_failed_precondition(gw: Harness) -> None:
    gw.source.add(ME, LOOPBACK, handshake=gw.clock())
    await gw.enroll("alice", (ME,))
    await gw.poll()
    assert await code_of(gw.challenge().SubmitTotp(totp(gw.code()))) is grpc.StatusCode.FAILED_PRECONDITION
