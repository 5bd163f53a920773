"""Adversarial inputs found by an attacker's run (issue 12), each answered at the edge with a documented status;
none may stop the daemon or change anything."""

from __future__ import annotations

import dataclasses
import os

import grpc

from gatewayd.v1 import challenge_pb2, control_pb2, types_pb2
from tests.api.test_challenge_api import LOOPBACK, ME, backup_set, quarantined, totp
from tests.api.test_control_api import status_of as refusal
from tests.api.test_device_api import device_member, submit
from tests.harness import Harness, gw

__all__ = ["gw"]


def policy(version: int) -> control_pb2.ApplyTeamPolicyRequest:
    return control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
        team_id="t", version=version, scope=types_pb2.MFA_SCOPE_BOTH, roles=types_pb2.MFA_ROLES_ALL))


async def test_versions_and_cursors_beyond_int64_are_invalid_arguments(gw: Harness) -> None:
    for version in (2**63, 2**64 - 1):
        code, details = await refusal(gw.local().ApplyTeamPolicy(policy(version)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("policy.version:")
    assert "t" not in gw.daemon.core.teams
    await gw.local().ApplyTeamPolicy(policy(2**63 - 1))  # the largest stored version works, and the daemon is up
    assert gw.daemon.core.teams["t"].version == 2**63 - 1
    stream = gw.local().WatchEvents(control_pb2.WatchEventsRequest(after_cursor=2**64 - 1))
    code, details = await refusal(stream.read())
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("after_cursor:")


async def test_a_resume_cursor_outside_the_outbox_is_out_of_range(gw: Harness) -> None:
    await gw.local().ApplyTeamPolicy(policy(1))
    newest = gw.daemon.store.outbox.next_cursor - 1
    stream = gw.local().WatchEvents(control_pb2.WatchEventsRequest(after_cursor=newest + 5))
    code, details = await refusal(stream.read())
    assert code is grpc.StatusCode.OUT_OF_RANGE and f"newest event ({newest})" in details
    # Retention: the oldest events are pruned; a cursor from before them missed events.
    gw.daemon.driver.event_retention = 1
    await gw.local().ApplyTeamPolicy(policy(2))
    await gw.local().ApplyTeamPolicy(policy(3))
    stream = gw.local().WatchEvents(control_pb2.WatchEventsRequest(after_cursor=1))
    code, details = await refusal(stream.read())
    assert code is grpc.StatusCode.OUT_OF_RANGE and "behind the oldest event kept" in details
    everything = gw.local().WatchEvents(control_pb2.WatchEventsRequest(after_cursor=0))  # 0: all that is kept
    assert (await everything.read()).cursor == gw.daemon.store.outbox.next_cursor - 1
    everything.cancel()
    # At the edges it is accepted: the newest cursor waits for live events.
    newest = gw.daemon.store.outbox.next_cursor - 1
    ok = gw.local().WatchEvents(control_pb2.WatchEventsRequest(after_cursor=newest))
    assert (await ok.initial_metadata())["gatewayd-cursor"] == str(newest)
    ok.cancel()


async def test_nul_bytes_duplicates_and_huge_filters_are_refused(gw: Harness) -> None:
    code, details = await refusal(gw.local().Disconnect(control_pb2.DisconnectRequest(
        member_id="alice", reason="siem\x00alert", idempotency_key="k")))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("reason:")
    same = "A" * 43 + "="
    code, details = await refusal(gw.local().UpsertMember(control_pb2.UpsertMemberRequest(
        member_id="alice", team_id="t", role=types_pb2.MEMBER_ROLE_MEMBER, peer_public_keys=[same, same])))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("peer_public_keys[1]:")
    assert "alice" not in gw.daemon.core.members
    for request in (control_pb2.ListSessionsRequest(member_id="x" * 60_000),
                    control_pb2.ListSessionsRequest(team_id="t\x00")):
        code, details = await refusal(gw.local().ListSessions(request))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
    stream = gw.local().WatchEvents(control_pb2.WatchEventsRequest(type_prefixes=["peer.\x00"]))
    code, details = await refusal(stream.read())
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("type_prefixes[0]:")


async def test_re_sending_the_same_enrollment_keeps_the_replay_mark(gw: Harness) -> None:
    """A code used once stays refused after the same secret is enrolled again (e.g. a team move)."""
    await quarantined(gw)
    code = gw.code()
    assert (await gw.challenge().SubmitTotp(totp(code))).accepted
    await gw.enroll("alice", (ME,), team="team-2")  # the same secret, another team
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key=os.urandom(4).hex()))
    result = await gw.challenge().SubmitTotp(totp(code))
    assert not result.accepted and LOOPBACK in gw.enforcer.held
    # A new secret starts its own mark.
    await gw.enroll("alice", (ME,), secret=b"N" * 20)
    assert (await gw.challenge().SubmitTotp(totp(gw.code(secret=b"N" * 20)))).accepted


async def test_a_forged_assertion_is_invalid_not_a_clone(gw: Harness) -> None:
    """All-zero signature with a sign count that does not grow: refused as invalid, no clone alarm (WebAuthn
    checks the signature before the counter)."""
    from gatewayd.lab.authenticator import SoftAuthenticator

    auth = SoftAuthenticator()
    await device_member(gw, auth)
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="dora", idempotency_key="d1"))
    ch = gw.challenge()
    nonce = (await ch.GetChallenge(challenge_pb2.GetChallengeRequest())).device_nonce
    real = auth.assert_(nonce, count=0)
    fake = dataclasses.replace(real, signature=bytes(len(real.signature)))
    assert not (await ch.SubmitDeviceAssertion(submit(fake))).accepted
    rows = await gw.daemon.store.outbox.events_after(0, 10_000)
    assert [e.type for e in rows].count("device.possible_clone") == 0
    assert any(e.type == "device.assertion_refused" and "invalid_assertion" in e.data_json for e in rows)


async def test_a_completed_mfa_reset_invalidates_the_old_backup_codes(gw: Harness) -> None:
    """The old MFA stays valid while the new factor is unconfirmed (backup codes included); once the new TOTP is
    used, the backup codes that existed when the reset was requested are gone. A set pushed after it stays."""
    old, _ = backup_set(["OLD1-OLD1", "OLD2-OLD2", "OLD3-OLD3"])
    await quarantined(gw, backup_codes=old)
    ch = gw.challenge()
    await gw.local().ResetMfa(control_pb2.ResetMfaRequest(member_id="alice"))
    new_secret = b"R" * 20
    assert (await gw.enroll("alice", (ME,), secret=new_secret)).totp_pending
    assert (await ch.SubmitBackupCode(challenge_pb2.SubmitBackupCodeRequest(code="OLD1-OLD1"))).accepted
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="r1"))
    gw.clock.advance(30)
    assert (await ch.SubmitTotp(totp(gw.code(secret=new_secret)))).accepted  # the reset completes
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="r2"))
    code, _ = await refusal(ch.SubmitBackupCode(challenge_pb2.SubmitBackupCodeRequest(code="OLD2-OLD2")))
    assert code is grpc.StatusCode.FAILED_PRECONDITION  # no backup codes any more
    assert LOOPBACK in gw.enforcer.held
    rows = await gw.daemon.store.outbox.events_after(0, 10_000)
    (done,) = [e for e in rows if e.type == "mfa_reset.completed"]
    assert '"backup_codes_invalidated": 2' in done.data_json
    # A new set pushed during a later reset survives its completion.
    await gw.local().ResetMfa(control_pb2.ResetMfaRequest(member_id="alice"))
    fresh, _ = backup_set(["NEW1-NEW1"])
    await gw.enroll("alice", (ME,), secret=b"S" * 20, backup_codes=fresh)
    gw.clock.advance(30)
    assert (await ch.SubmitTotp(totp(gw.code(secret=b"S" * 20)))).accepted
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="r3"))
    assert (await ch.SubmitBackupCode(challenge_pb2.SubmitBackupCodeRequest(code="NEW1-NEW1"))).accepted


async def test_bytes_that_do_not_parse_are_invalid_arguments(gw: Harness) -> None:
    """Raw requests: a string field that is not UTF-8, a varint longer than 64 bits, a truncated field. Each is
    INVALID_ARGUMENT with no internal names, on both services; the daemon goes on."""
    bad = {
        "not UTF-8": b"\x0a\x02\xff\xfe",  # field 1 (a string) = 0xff 0xfe
        "varint past 64 bits": b"\x10" + b"\xff" * 10 + b"\x01",
        "truncated": b"\x0a\x10abc",
    }
    gw.local()
    control = gw.channels[-1]
    gw.challenge()
    challenge = gw.channels[-1]
    for name, data in bad.items():
        for ch, method in ((control, "/gatewayd.v1.ControlService/Disconnect"),
                           (challenge, "/gatewayd.v1.ChallengeService/SubmitTotp")):
            call = ch.unary_unary(method)(data)
            code, details = await refusal(call)
            assert code is grpc.StatusCode.INVALID_ARGUMENT, (name, method, code, details)
            assert "DecodeError" not in details and "class" not in details
    assert (await gw.local().GetStatus(control_pb2.GetStatusRequest())).gateway_id == "gw-test"
