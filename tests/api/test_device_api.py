"""PIN & biometrics proofs over gRPC: enrollment, nonces, verification, policy."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from gatewayd.auth.device import Assertion
from gatewayd.lab.authenticator import UP, SoftAuthenticator
from gatewayd.runtime.proofs import GetChallenge
from gatewayd.v1 import challenge_pb2, control_pb2, types_pb2
from tests.harness import Harness, gw_either_challenge_server, key, start, stop
from tests.pki import Authority

__all__ = ["gw_either_challenge_server"]
ME, OTHER = key(1), key(2)


def credential(auth: SoftAuthenticator) -> control_pb2.DeviceCredential:
    return control_pb2.DeviceCredential(credential_id=auth.credential_id, cose_public_key=auth.cose_public_key,
                                        sign_count=auth.sign_count, user_handle=auth.user_handle)


def submit(a: Assertion) -> challenge_pb2.SubmitDeviceAssertionRequest:
    return challenge_pb2.SubmitDeviceAssertionRequest(
        credential_id=a.credential_id, authenticator_data=a.authenticator_data, client_data_json=a.client_data_json,
        signature=a.signature, user_handle=a.user_handle)


async def device_member(gw: Harness, auth: SoftAuthenticator, *, totp: bool = False) -> None:
    gw.source.add(ME, "127.0.0.1/32", handshake=gw.clock())
    gw.source.add(OTHER, "10.8.0.2/32", handshake=gw.clock())
    await gw.enroll("dora", (ME, OTHER), secret=b"D" * 20 if totp else None,
                    device_credentials=[credential(auth)], replace_device_credentials=True)
    await gw.poll()


async def disconnect(gw: Harness, idem: str) -> None:
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="dora", idempotency_key=idem))


async def refused_events(gw: Harness) -> list[str]:
    rows = await gw.daemon.store.outbox.events_after(0, 10_000)
    return [json.loads(e.data_json)["reason"] for e in rows if e.type == "device.assertion_refused"]


async def test_device_only_member_is_released_by_a_device_proof(gw: Harness) -> None:
    auth = SoftAuthenticator()
    await device_member(gw, auth)
    await disconnect(gw, "1")
    ch = gw.challenge()
    c = await ch.GetChallenge(challenge_pb2.GetChallengeRequest())
    assert list(c.owes) == [types_pb2.PROOF_KIND_DEVICE] and list(c.accepted_factors) == [types_pb2.FACTOR_DEVICE]
    assert len(c.device_nonce) >= 32
    assert 0 < c.device_nonce_expires.ToNanoseconds() / 1e9 - gw.clock() <= 120
    result = await ch.SubmitDeviceAssertion(submit(auth.assert_(c.device_nonce)))
    assert result.accepted and result.status.state == types_pb2.PEER_STATE_AUTHORIZED
    assert "127.0.0.1/32" not in gw.enforcer.held
    stored = await gw.daemon.store.state.device_credential("dora", auth.credential_id)
    assert stored is not None and stored.sign_count == 1


async def test_challenge_is_single_use_even_when_raced(gw: Harness) -> None:
    auth = SoftAuthenticator()
    await device_member(gw, auth)
    await disconnect(gw, "1")
    ch = gw.challenge()
    nonce = (await ch.GetChallenge(challenge_pb2.GetChallengeRequest())).device_nonce
    signed = auth.assert_(nonce)
    results = await asyncio.gather(*(ch.SubmitDeviceAssertion(submit(signed)) for _ in range(10)),
                                   return_exceptions=True)
    assert sum(1 for r in results if isinstance(r, challenge_pb2.ProofResult) and r.accepted) == 1
    await disconnect(gw, "2")
    replay = await ch.SubmitDeviceAssertion(submit(auth.assert_(nonce)))
    assert not replay.accepted
    assert (await refused_events(gw))[-1] == "unknown_or_used_challenge"


async def test_expired_foreign_other_peer_and_clone(gw: Harness) -> None:
    auth = SoftAuthenticator(sign_count=5)  # enrolled with a stored count of 5
    await device_member(gw, auth)
    await disconnect(gw, "1")
    ch = gw.challenge()
    nonce = (await ch.GetChallenge(challenge_pb2.GetChallengeRequest())).device_nonce
    gw.clock.advance(121)
    assert not (await ch.SubmitDeviceAssertion(submit(auth.assert_(nonce)))).accepted
    # Another peer's challenge (issued to the member's other device).
    view = await gw.daemon.driver.submit(GetChallenge(public_key=OTHER))
    assert not (await ch.SubmitDeviceAssertion(submit(auth.assert_(view.device_nonce)))).accepted
    # A credential that is not the member's.
    stranger = SoftAuthenticator()
    nonce = (await ch.GetChallenge(challenge_pb2.GetChallengeRequest())).device_nonce
    assert not (await ch.SubmitDeviceAssertion(submit(stranger.assert_(nonce)))).accepted
    # A sign count that does not grow: a possible clone.
    gw.clock.advance(60)
    nonce = (await ch.GetChallenge(challenge_pb2.GetChallengeRequest())).device_nonce
    assert not (await ch.SubmitDeviceAssertion(submit(auth.assert_(nonce, count=0)))).accepted
    assert await refused_events(gw) == ["expired_challenge", "challenge_of_another_peer", "foreign_credential",
                                        "sign_count_not_increasing"]
    rows = await gw.daemon.store.outbox.events_after(0, 10_000)
    assert [e.type for e in rows].count("device.possible_clone") == 1
    # Each refusal was a failed attempt.
    c = await ch.GetChallenge(challenge_pb2.GetChallengeRequest())
    assert c.attempts_left == 6 and c.state == types_pb2.PEER_STATE_QUARANTINED


async def test_uv_is_required(gw: Harness) -> None:
    auth = SoftAuthenticator(kind="eddsa")
    await device_member(gw, auth)
    await disconnect(gw, "1")
    ch = gw.challenge()
    nonce = (await ch.GetChallenge(challenge_pb2.GetChallengeRequest())).device_nonce
    assert not (await ch.SubmitDeviceAssertion(submit(auth.assert_(nonce, flags=UP)))).accepted
    nonce = (await ch.GetChallenge(challenge_pb2.GetChallengeRequest())).device_nonce
    assert (await ch.SubmitDeviceAssertion(submit(auth.assert_(nonce)))).accepted


async def test_both_policies_need_both_proofs(gw: Harness) -> None:
    auth = SoftAuthenticator()
    await device_member(gw, auth, totp=True)
    await gw.policy(1, team="team-1", totp=True, device=True)
    ch = gw.challenge()
    c = await ch.GetChallenge(challenge_pb2.GetChallengeRequest())
    assert set(c.owes) == {types_pb2.PROOF_KIND_OTP, types_pb2.PROOF_KIND_DEVICE}
    assert (await ch.SubmitDeviceAssertion(submit(auth.assert_(c.device_nonce)))).status.state == \
        types_pb2.PEER_STATE_QUARANTINED
    assert (await ch.SubmitTotp(challenge_pb2.SubmitTotpRequest(code=gw.code(secret=b"D" * 20)))).accepted
    assert "127.0.0.1/32" not in gw.enforcer.held


@pytest.mark.parametrize(("cose", "detail"), [(b"\xa1\x01\x02" + b"\x00" * 20, "COSE"), (None, "unsupported")])
async def test_bad_device_keys_are_invalid_argument(gw: Harness, cose: bytes | None, detail: str) -> None:
    import cbor2

    if cose is None:  # a well-formed key of an algorithm we do not accept (ES512 on P-256 coordinates)
        fields = dict(cbor2.loads(SoftAuthenticator().cose_public_key))
        fields[3] = -36
        cose = cbor2.dumps(fields)
    bad = control_pb2.DeviceCredential(credential_id=b"c" * 16, cose_public_key=cose, user_handle=b"u")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.enroll("dora", (), secret=None, device_credentials=[bad], replace_device_credentials=True)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("device_credentials[0].cose_public_key")
    assert detail.lower() in (info.value.details() or "").lower()


async def test_nonce_survives_restart_and_is_used_once(tmp_path: Path) -> None:
    ca = Authority("ca")
    h = await start(tmp_path, ca)
    auth = SoftAuthenticator()
    try:
        await device_member(h, auth)
        await disconnect(h, "1")
        nonce = (await h.challenge().GetChallenge(challenge_pb2.GetChallengeRequest())).device_nonce
        config, source, clock = h.daemon.config, h.source, h.clock
    finally:
        await stop(h)
    h = await start(tmp_path, ca, config=config, source=source, clock=clock)
    try:
        signed = auth.assert_(nonce)
        assert (await h.challenge().SubmitDeviceAssertion(submit(signed))).accepted
        await disconnect(h, "2")
        assert not (await h.challenge().SubmitDeviceAssertion(submit(auth.assert_(nonce)))).accepted
    finally:
        await stop(h)
