"""The client apps' requests, as driver jobs: what a peer owes, and the proofs that pay it.

A proof is checked against the member's attempt gate first (locked, or too early after failures), then
verified; a refused proof costs an attempt and is recorded; an accepted one is committed (TOTP step, used
backup code, device sign count) in the same transaction that releases the peer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from gatewayd.auth import backup, device, limits, totp
from gatewayd.core import events as ev
from gatewayd.core import policy
from gatewayd.core.model import Factor, Member, Peer, PeerState, ProofKind
from gatewayd.errors import Refused, Status
from gatewayd.ports import MemberAuth
from gatewayd.runtime.control import complete_reset
from gatewayd.runtime.driver import Batch


@dataclass(frozen=True, kw_only=True)
class ChallengeView:
    """What a peer owes and how it may pay (ChallengeService.Challenge)."""

    state: PeerState
    """State."""
    owes: frozenset[ProofKind]
    """Owed proofs."""
    accepted: frozenset[Factor]
    """Usable factors."""
    attempts_left: int
    """Failures left before lock."""
    locked_reason: str | None
    """Why locked."""
    retry_not_before: float | None
    """Earliest next attempt."""
    device_nonce: bytes = b""
    """A fresh single-use nonce for a device assertion, when one is owed."""
    device_nonce_expires: float | None = None
    """When device_nonce expires."""


@dataclass(frozen=True, kw_only=True)
class ProofOutcome:
    accepted: bool
    """Accepted."""
    status: ChallengeView
    """Status after."""
    backup_remaining: int = 0
    """Unused backup codes left (backup code proofs)."""


def _peer(b: Batch, public_key: str) -> Peer:
    peer = b.core.peers.get(public_key)
    if peer is None or not peer.present:
        raise Refused(Status.PERMISSION_DENIED, "not a tracked peer")
    return peer


async def view(b: Batch, peer: Peer, attempts: limits.AttemptState | None = None) -> ChallengeView:
    """The peer's status as its client app sees it; `attempts`: the member's attempt state when the caller
    has just written it (saves reading it back)."""
    member = b.core.member_of(peer)
    state = peer.state or PeerState.LOCKED
    if attempts is None:
        attempts = limits.RESET
        if member is not None:
            auth = await b.state.member_auth(member.member_id)
            if auth is not None:
                attempts = auth.attempts
    rules = b.settings.attempts
    return ChallengeView(
        state=state, owes=peer.owes,
        accepted=policy.accepted_factors(member, peer.owes) if state is PeerState.QUARANTINED else frozenset(),
        attempts_left=limits.attempts_left(rules, attempts) if member else 0,
        locked_reason=peer.locked_reason.value if peer.locked_reason else None,
        retry_not_before=limits.retry_not_before(rules, attempts),
    )


async def _gate(b: Batch, peer: Peer, kind: ProofKind) -> tuple[Member, MemberAuth]:
    """The member and its auth state, if a proof of `kind` may be tried now; otherwise the refusal."""
    member = b.core.member_of(peer)
    if member is None:
        raise Refused(Status.FAILED_PRECONDITION, "this peer is not mapped to a member")
    auth = await b.state.member_auth(member.member_id)
    assert auth is not None
    rules = b.settings.attempts
    gate = limits.gate(rules, auth.attempts, b.now)
    if gate is limits.Gate.LOCKED:
        raise Refused(Status.PERMISSION_DENIED,
                      "factors are locked after too many failed attempts; the control plane must unlock "
                      "or re-enroll them")
    if gate is limits.Gate.TOO_EARLY:
        wait = (limits.retry_not_before(rules, auth.attempts) or b.now) - b.now
        raise Refused(Status.RESOURCE_EXHAUSTED, f"too many failed attempts: retry in {wait:.1f} s")
    if peer.state is not PeerState.QUARANTINED or kind not in peer.owes:
        raise Refused(Status.FAILED_PRECONDITION, f"this peer owes no {kind.value} proof now")
    return member, auth


async def _failed(b: Batch, peer: Peer, member: Member, attempts: limits.AttemptState, factor: Factor,
                  reason: str) -> ProofOutcome:
    """A refused proof: it costs an attempt (and may lock the member's factors)."""
    after = limits.after_failure(b.settings.attempts, attempts, b.now)
    await b.state.save_attempts(member.member_id, after)
    b.feed(ev.ProofRefused(public_key=peer.public_key, factor=factor, reason=reason, failures=after.failures))
    if after.locked:
        b.publish("factor.locked", f"member/{member.member_id}", failures=after.failures)
        b.feed(ev.MemberUpserted(member=replace(member, locked=True)))
    return ProofOutcome(accepted=False, status=await view(b, peer, after))


async def _accepted(b: Batch, peer: Peer, member: Member, factor: Factor, backup_remaining: int = 0
                    ) -> ProofOutcome:
    await b.state.save_attempts(member.member_id, limits.RESET)
    b.ask(b.core.accept_proof, ev.ProofAccepted(public_key=peer.public_key, factor=factor, verified_at=b.now))
    return ProofOutcome(accepted=True, status=await view(b, peer, limits.RESET), backup_remaining=backup_remaining)


@dataclass(frozen=True, kw_only=True)
class GetChallenge:
    """What the peer owes; with a fresh device nonce when it owes a device proof it can give."""

    public_key: str
    """The calling peer."""
    issue_nonce: bool = True
    """Issue a device nonce if one is usable (WatchStatus does not)."""

    async def run(self, b: Batch) -> ChallengeView:
        peer = _peer(b, self.public_key)
        status = await view(b, peer)
        member = b.core.member_of(peer)
        if self.issue_nonce and member is not None and Factor.DEVICE in status.accepted:
            ttl = b.settings.device.challenge_ttl
            nonce = os.urandom(device.NONCE_BYTES)
            await b.state.issue_nonce(nonce, self.public_key, member.member_id, b.now, ttl)
            status = replace(status, device_nonce=nonce, device_nonce_expires=b.now + ttl)
        return status


@dataclass(frozen=True, kw_only=True)
class SubmitTotp:
    public_key: str
    """The calling peer."""
    code: str
    """The code as typed."""

    async def run(self, b: Batch) -> ProofOutcome:
        peer = _peer(b, self.public_key)
        member, auth = await _gate(b, peer, ProofKind.OTP)
        slots = [(s, f) for s, f in (("active", auth.totp), ("pending", auth.pending_totp)) if f]
        if not slots:
            raise Refused(Status.FAILED_PRECONDITION, "the member has no TOTP factor enrolled")
        formed = [(s, f) for s, f in slots if totp.well_formed(self.code, f.digits)]
        if not formed:
            lengths = " or ".join(sorted({str(f.digits) for _, f in slots}))
            raise Refused(Status.INVALID_ARGUMENT, f"must be {lengths} ASCII digits", field="code")
        verdicts = [(s, totp.verify(f, self.code, b.now)) for s, f in formed]
        accepted = [(s, v) for s, v in verdicts if v.outcome is totp.Outcome.ACCEPTED]
        if not accepted:
            replayed = any(v.outcome is totp.Outcome.REPLAYED for _, v in verdicts)
            return await _failed(b, peer, member, auth.attempts, Factor.TOTP, "replayed" if replayed else "wrong_code")
        slot, verdict = accepted[-1] if accepted[-1][0] == "pending" else accepted[0]
        assert verdict.step is not None
        if slot == "pending":
            await b.state.promote_pending_totp(member.member_id, verdict.step)
            await complete_reset(b, member.member_id)
            factors = await b.state.factors(member.member_id)
            if factors != member.factors:
                member = replace(member, factors=factors)
                b.feed(ev.MemberUpserted(member=member))
        else:
            await b.state.set_totp_step(member.member_id, slot, verdict.step)
        return await _accepted(b, peer, member, Factor.TOTP)


@dataclass(frozen=True, kw_only=True)
class BackupPrecheck:
    """The member's KDF parameters, after the same gate as a submission (no KDF spent on a refusal)."""

    public_key: str
    """The calling peer."""

    async def run(self, b: Batch) -> backup.KdfParams:
        peer = _peer(b, self.public_key)
        member, _ = await _gate(b, peer, ProofKind.OTP)
        params = await b.state.backup_params(member.member_id)
        if params is None or not await b.state.unused_backup_codes(member.member_id):
            raise Refused(Status.FAILED_PRECONDITION, "the member has no unused backup codes")
        return params


@dataclass(frozen=True, kw_only=True)
class SubmitBackupCode:
    """`derived` is the KDF of the submitted code under `params`, computed off the event loop."""

    public_key: str
    """The calling peer."""
    derived: bytes
    """The submitted code's KDF output."""
    params: backup.KdfParams
    """The parameters it was derived under (the set may have been replaced meanwhile)."""

    async def run(self, b: Batch) -> ProofOutcome:
        peer = _peer(b, self.public_key)
        member, auth = await _gate(b, peer, ProofKind.OTP)
        current = await b.state.backup_params(member.member_id)
        if current is None:
            raise Refused(Status.FAILED_PRECONDITION, "the member has no backup codes")
        if current != self.params:
            raise Refused(Status.ABORTED, "the backup code set was replaced meanwhile; submit again")
        index = backup.match(self.derived, await b.state.unused_backup_codes(member.member_id))
        if index is None or not await b.state.consume_backup_code(member.member_id, index, b.now):
            return await _failed(b, peer, member, auth.attempts, Factor.BACKUP_CODE, "unknown_code")
        remaining = len(await b.state.unused_backup_codes(member.member_id))
        b.publish("backup_code.used", f"member/{member.member_id}", remaining=remaining)
        if remaining == 0:
            b.feed(ev.MemberUpserted(member=replace(member, factors=member.factors - {Factor.BACKUP_CODE})))
        return await _accepted(b, peer, member, Factor.BACKUP_CODE, backup_remaining=remaining)


@dataclass(frozen=True, kw_only=True)
class SubmitDeviceAssertion:
    public_key: str
    """The calling peer."""
    assertion: device.Assertion
    """The authenticator's assertion over the issued nonce."""

    async def run(self, b: Batch) -> ProofOutcome:
        peer = _peer(b, self.public_key)
        member, auth = await _gate(b, peer, ProofKind.DEVICE)
        subject = f"member/{member.member_id}"
        assertion = self.assertion

        async def failed(reason: str, detail: str) -> ProofOutcome:
            b.publish("device.assertion_refused", subject, peer=self.public_key, reason=reason, detail=detail)
            return await _failed(b, peer, member, auth.attempts, Factor.DEVICE, reason)

        # The challenge is consumed by any attempt that names it: one try per nonce.
        nonce = device.challenge_of(assertion)
        taken = await b.state.take_nonce(nonce, b.now) if nonce else None
        if taken is None:
            return await failed("unknown_or_used_challenge", "the challenge was not issued or is used")
        owner, owner_member, expires = taken
        if owner != self.public_key or owner_member != member.member_id:
            return await failed("challenge_of_another_peer", "the challenge was issued to another peer")
        if b.now > expires:
            return await failed("expired_challenge", "the challenge expired")
        stored = await b.state.device_credential(member.member_id, assertion.credential_id)
        if stored is None:
            return await failed("foreign_credential", "the credential is not the member's")
        if assertion.user_handle and assertion.user_handle != stored.user_handle:
            return await failed("wrong_user_handle", "the user handle is not the credential's")
        rules = b.settings.device
        verdict = device.verify(assertion, nonce=nonce or b"", rp_id=rules.rp_id, origins=list(rules.origins),
                                cose_public_key=stored.cose_public_key, stored_sign_count=stored.sign_count)
        if verdict.outcome is device.Outcome.CLONED:
            b.publish("device.possible_clone", subject, peer=self.public_key,
                      credential_id=device.b64url(assertion.credential_id), detail=verdict.detail)
            return await failed(verdict.outcome.value, verdict.detail)
        if verdict.outcome is not device.Outcome.ACCEPTED:
            return await failed(verdict.outcome.value, verdict.detail)
        await b.state.set_sign_count(member.member_id, assertion.credential_id, verdict.new_sign_count)
        return await _accepted(b, peer, member, Factor.DEVICE)
