"""gatewayd-client against a real daemon (in-process harness, real gRPC over TCP on loopback): the reconnect
flow with codes typed wrong and right, backup codes, the device key, a lock, a user who gives up."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace
from pathlib import Path

import grpc

from gatewayd.auth import backup
from gatewayd.lab.authenticator import SoftAuthenticator
from gatewayd.v1 import challenge_pb2_grpc, control_pb2
from gatewayd_client.app import ClientApp, Exit, Signed
from gatewayd_client.fido import SoftwareSigner
from tests.harness import Harness, config_for, gw, key, start, stop  # noqa: F401 (fixture)
from tests.pki import Authority

ME = key(1)


class Done(Exception):
    pass


class Script:
    """The user: types the given codes in order (None: gives up), and what the app said."""

    def __init__(self, *codes: str | None) -> None:
        self.codes = list(codes)
        self.prompts: list[str] = []
        self.said: list[str] = []

    def code(self, prompt: str) -> str | None:
        self.prompts.append(prompt)
        return self.codes.pop(0) if self.codes else None

    def say(self, text: str) -> None:
        self.said.append(text)


async def run_client(gw: Harness, user: Script, signer: object | None = None) -> int:  # noqa: F811
    def run() -> int:
        with grpc.insecure_channel(f"127.0.0.1:{gw.daemon.challenge_ports[0]}") as channel:
            app = ClientApp(challenge_pb2_grpc.ChallengeServiceStub(channel), user, signer,  # type: ignore[arg-type]
                            retry_seconds=0.05)
            return app.run(once=True)

    return await asyncio.wait_for(asyncio.to_thread(run), 30)


async def quarantined(gw: Harness, **enroll: object) -> None:  # noqa: F811
    gw.source.add(ME, "127.0.0.1/32", handshake=gw.clock())
    await gw.enroll("alice", (ME,), **enroll)  # type: ignore[arg-type]
    await gw.poll()
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="c"))


def wrong(gw: Harness) -> str:  # noqa: F811
    return "000000" if gw.code() != "000000" else "111111"


async def test_a_wrong_code_then_the_right_one_opens_the_tunnel(gw: Harness) -> None:  # noqa: F811
    await quarantined(gw)
    user = Script(wrong(gw), gw.code())
    assert await run_client(gw, user) == Exit.AUTHORIZED
    assert user.said == ["refused: 9 attempts left", "accepted", "authorized: the tunnel is open"]
    assert "authenticator code" in user.prompts[0] and "(10 attempts left)" in user.prompts[0]
    assert "(9 attempts left)" in user.prompts[1]


async def test_a_backup_code_is_sent_as_one(gw: Harness) -> None:  # noqa: F811
    salt = os.urandom(16)
    hashes = [hashlib.scrypt(backup.normalize(c), salt=salt, n=2**10, r=8, p=1, dklen=32) for c in ("ABCD-2345",)]
    await quarantined(gw, backup_codes=control_pb2.BackupCodeSet(salt=salt, n=2**10, r=8, p=1, hashes=hashes))
    user = Script("abcd-2345")
    assert await run_client(gw, user) == Exit.AUTHORIZED
    assert user.said[0] == "accepted" and "backup code" in user.prompts[0]


async def test_a_malformed_code_is_explained_and_asked_again(gw: Harness) -> None:  # noqa: F811
    await quarantined(gw)
    user = Script("12", gw.code())
    assert await run_client(gw, user) == Exit.AUTHORIZED
    assert user.said[0].startswith("not a valid code") and user.said[1] == "accepted"


async def test_a_user_who_gives_up_leaves_the_peer_quarantined(gw: Harness) -> None:  # noqa: F811
    await quarantined(gw)
    assert await run_client(gw, Script(None)) == Exit.GAVE_UP
    state = gw.daemon.core.peers[ME].state
    assert state is not None and state.value == "quarantined"


async def test_a_locked_member_is_told_why(gw: Harness) -> None:  # noqa: F811
    await quarantined(gw, secret=None)  # no factor at all: locked
    user = Script()
    assert await run_client(gw, user) == Exit.LOCKED
    assert "no_factor" in user.said[-1] and "administrator" in user.said[-1]


async def test_the_device_challenge_is_signed_by_the_key(gw: Harness) -> None:  # noqa: F811
    auth = SoftAuthenticator()
    await quarantined(gw, secret=None, replace_device_credentials=True, device_credentials=[
        control_pb2.DeviceCredential(credential_id=auth.credential_id, cose_public_key=auth.cose_public_key,
                                     sign_count=auth.sign_count, user_handle=auth.user_handle)])
    signer = SoftwareSigner(auth.private_pem(), auth.credential_id, auth.user_handle, auth.sign_count,
                            auth.rp_id, auth.origin)
    user = Script()
    assert await run_client(gw, user, signer) == Exit.AUTHORIZED
    assert user.said == ["confirm with your security key (PIN or fingerprint)", "accepted",
                         "authorized: the tunnel is open"]


async def test_a_key_without_user_verification_is_refused(gw: Harness) -> None:  # noqa: F811
    auth = SoftAuthenticator()
    await quarantined(gw, secret=None, replace_device_credentials=True, device_credentials=[
        control_pb2.DeviceCredential(credential_id=auth.credential_id, cose_public_key=auth.cose_public_key,
                                     sign_count=auth.sign_count, user_handle=auth.user_handle)])

    class NoUv:
        def __init__(self) -> None:
            self.calls = 0

        def sign(self, nonce: bytes) -> Signed:
            self.calls += 1
            if self.calls > 1:
                raise Done  # the test's way out after the first refusal
            a = auth.assert_(nonce, flags=0x01)  # presence only
            return Signed(a.credential_id, a.authenticator_data, a.client_data_json, a.signature, a.user_handle)

    user = Script()
    signer = NoUv()
    try:
        await run_client(gw, user, signer)
    except Done:
        pass
    assert user.said[1] == "refused: 9 attempts left" and signer.calls == 2


async def test_the_app_waits_out_the_gateways_call_rate(tmp_path: Path) -> None:
    """A gateway that allows this address 2 calls at once and 5 a second: the app's stream and status read
    take the burst, its submission is refused as over the rate; it says so, waits the time the gateway gives
    and asks again, and the next code opens the tunnel."""
    ca = Authority("ca")
    config = config_for(tmp_path, ca)
    h = await start(tmp_path, ca, config=replace(config, challenge=replace(config.challenge, calls_per_second=5.0,
                                                                          calls_burst=2)))
    try:
        await quarantined(h)
        user = Script(wrong(h), h.code())
        assert await run_client(h, user) == Exit.AUTHORIZED
        assert user.said[0].startswith("the gateway asks to slow down: too many calls from this address")
        assert user.said[-2:] == ["accepted", "authorized: the tunnel is open"]
        assert "(10 attempts left)" in user.prompts[1]  # the call refused for its rate cost no attempt
    finally:
        await stop(h)
