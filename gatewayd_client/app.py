"""The reconnect flow, as a client app must run it (README, "Client apps"):

    WatchStatus -> (quarantined, owes OTP)    -> SubmitTotp / SubmitBackupCode -> ... -> authorized
                -> (quarantined, owes DEVICE) -> GetChallenge (nonce) -> sign -> SubmitDeviceAssertion
                -> locked                     -> tell the user; only the control plane can unlock

The terminal (or a test) is behind `Prompter`, the authenticator behind `Signer`; the gateway behind the
generated ChallengeService stub.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from gatewayd.v1 import challenge_pb2, types_pb2

TOTP_CODE = re.compile(r"[0-9]{6}|[0-9]{8}")


class Prompter(Protocol):
    def code(self, prompt: str) -> str | None:
        """A TOTP or backup code from the user; None: the user gave up."""
        ...

    def say(self, text: str) -> None: ...


@dataclass(frozen=True)
class Signed:
    """A WebAuthn assertion over the gateway's nonce."""

    credential_id: bytes
    authenticator_data: bytes
    client_data_json: bytes
    signature: bytes
    user_handle: bytes = b""


class Signer(Protocol):
    def sign(self, nonce: bytes) -> Signed:
        """Ask the authenticator (PIN/biometric unlocked) to sign the nonce."""
        ...


class Exit:
    AUTHORIZED = 0
    LOCKED = 3
    GAVE_UP = 4
    NO_SIGNER = 5


def owes(status: challenge_pb2.Challenge) -> set[int]:
    return set(status.owes)


class ClientApp:
    def __init__(self, stub: Any, prompter: Prompter, signer: Signer | None = None, *,
                 retry_seconds: float = 2.0) -> None:
        self.stub, self.prompter, self.signer, self.retry_seconds = stub, prompter, signer, retry_seconds

    def statuses(self) -> Iterator[challenge_pb2.Challenge]:
        """The peer's status, now and at every change; reconnects while the tunnel or the gateway is away
        (a client that just reconnected may reach the gateway a moment after its handshake)."""
        while True:
            try:
                yield from self.stub.WatchStatus(challenge_pb2.WatchStatusRequest())
            except grpc.RpcError as exc:
                # The gateway's call rate for this address, or a newer stream of this peer closed this one.
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self._wait_as_told(exc.details() or "")
                    continue
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
            time.sleep(self.retry_seconds)

    def run(self, *, once: bool = False) -> int:
        """Follow the status and prove whenever something is owed. With `once`, return as soon as the peer is
        authorized."""
        for status in self.statuses():
            if status.state == types_pb2.PEER_STATE_AUTHORIZED:
                self.prompter.say("authorized: the tunnel is open")
                if once:
                    return Exit.AUTHORIZED
            elif status.state == types_pb2.PEER_STATE_LOCKED:
                self.prompter.say(f"locked at the gateway ({status.locked_reason or 'no reason given'}): "
                                  "ask your administrator to unlock or re-enroll your factors")
                return Exit.LOCKED
            elif status.state == types_pb2.PEER_STATE_QUARANTINED:
                # The stream also replays changes this app caused itself (each refusal changes the attempts
                # left): what counts is the status now.
                current = self._challenge()
                if current.state == types_pb2.PEER_STATE_AUTHORIZED:
                    continue  # the stream's next message says so
                outcome = self.prove(current)
                if outcome is not None:
                    return outcome
        raise AssertionError("the status stream does not end")

    def prove(self, status: challenge_pb2.Challenge) -> int | None:
        """Pay what is owed, one proof after the other, until nothing is (None) or the user gives up."""
        while status.state == types_pb2.PEER_STATE_QUARANTINED and owes(status):
            if types_pb2.PROOF_KIND_DEVICE in owes(status):
                if self.signer is None:
                    self.prompter.say("the gateway asks for your security key (PIN & biometrics), and none is "
                                      "configured")
                    return Exit.NO_SIGNER
                answer = self._submit(self._device)
            else:
                factors = set(status.accepted_factors)
                kinds = [n for f, n in ((types_pb2.FACTOR_TOTP, "authenticator code"),
                                        (types_pb2.FACTOR_BACKUP_CODE, "backup code")) if f in factors]
                code = self.prompter.code(f"{' or '.join(kinds) or 'code'} "
                                          f"({status.attempts_left} attempts left): ")
                if code is None:
                    return Exit.GAVE_UP
                answer = self._submit(functools.partial(self._code, code.strip()))
            if answer is None:
                continue
            if answer.state == types_pb2.PEER_STATE_LOCKED:
                return None  # the stream says so next
            status = answer
        return None

    def _code(self, code: str) -> challenge_pb2.ProofResult:
        result: challenge_pb2.ProofResult
        if TOTP_CODE.fullmatch(code):
            result = self.stub.SubmitTotp(challenge_pb2.SubmitTotpRequest(code=code), timeout=30)
        else:
            result = self.stub.SubmitBackupCode(challenge_pb2.SubmitBackupCodeRequest(code=code), timeout=30)
        return result

    def _device(self) -> challenge_pb2.ProofResult:
        assert self.signer is not None
        challenge = self.stub.GetChallenge(challenge_pb2.GetChallengeRequest(), timeout=30)
        if not challenge.device_nonce:
            return challenge_pb2.ProofResult(accepted=False, status=challenge)
        self.prompter.say("confirm with your security key (PIN or fingerprint)")
        s = self.signer.sign(challenge.device_nonce)
        result: challenge_pb2.ProofResult = self.stub.SubmitDeviceAssertion(
            challenge_pb2.SubmitDeviceAssertionRequest(
                credential_id=s.credential_id, authenticator_data=s.authenticator_data,
                client_data_json=s.client_data_json, signature=s.signature, user_handle=s.user_handle), timeout=30)
        return result

    def _challenge(self) -> challenge_pb2.Challenge:
        """GetChallenge, waiting out the gateway's call rate for this address if it is reached."""
        while True:
            try:
                current: challenge_pb2.Challenge = self.stub.GetChallenge(challenge_pb2.GetChallengeRequest(),
                                                                          timeout=30)
                return current
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                self._wait_as_told(exc.details() or "")

    def _wait_as_told(self, details: str) -> None:
        """Sleep for the time a RESOURCE_EXHAUSTED answer gives ("retry in N s"), or the default retry delay."""
        time.sleep(_seconds_in(details, default=self.retry_seconds))

    def _submit(self, call: Any) -> challenge_pb2.Challenge | None:
        """One submission; the status after it, or None to look again (a wait, a race)."""
        try:
            result: challenge_pb2.ProofResult = call()
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                calls = "too many calls" in details  # the address's call rate, not the member's failures
                self.prompter.say(f"{'the gateway asks to slow down' if calls else 'too many failed attempts'}: "
                                  f"{details}")
                self._wait_as_told(details)
                return None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                self.prompter.say(f"not a valid code: {details}")
                return None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
                self.prompter.say(f"the gateway could not take it now ({details}); trying again")
                time.sleep(self.retry_seconds)
                return None
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                return None  # nothing owed any more (proven meanwhile): the stream tells what is next
            raise
        if result.accepted:
            left = f" ({result.backup_codes_remaining} backup codes left)" if result.backup_codes_remaining else ""
            self.prompter.say(f"accepted{left}")
        else:
            self.prompter.say(f"refused: {result.status.attempts_left} attempts left")
        status: challenge_pb2.Challenge = result.status
        return status


def _seconds_in(details: str, default: float) -> float:
    match = re.search(r"retry in ([0-9.]+) s", details)
    return float(match.group(1)) + 0.1 if match else default
