"""The client apps' requests, as driver jobs: what a peer owes, and the proofs that pay it.

A proof is checked against the member's attempt gate first (locked, or too early after failures), then
verified; a refused proof costs an attempt and is recorded; an accepted one is committed (TOTP step, used
backup code, device sign count) in the same transaction that releases the peer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gatewayd.auth import backup, device, ledger, limits, totp
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


async def _failed(b: Batch, peer: Peer, member: Member, after: limits.AttemptState, factor: Factor,
                  reason: str) -> ProofOutcome:
    """A refused proof: it cost an attempt (`after`: the member's attempt state now), and may have locked the
    member's factors."""
    await b.state.save_attempts(member.member_id, after)
    b.feed(ev.ProofRefused(public_key=peer.public_key, factor=factor, reason=reason, failures=after.failures))
    if after.locked and not member.locked:
        b.publish("factor.locked", f"member/{member.member_id}", failures=after.failures)
        b.feed(ev.MemberUpserted(member=replace(member, locked=True)))
    return ProofOutcome(accepted=False, status=await view(b, peer, after))


async def _accepted(b: Batch, peer: Peer, member: Member, factor: Factor, before: limits.AttemptState,
                    backup_remaining: int = 0) -> ProofOutcome:
    """An accepted proof clears the member's failed attempts (`before`: as this job read them; most members have
    none, and then nothing is written)."""
    if before != limits.RESET:
        await b.state.save_attempts(member.member_id, limits.RESET)
    b.ask(b.core.accept_proof, ev.ProofAccepted(public_key=peer.public_key, factor=factor, verified_at=b.now))
    return ProofOutcome(accepted=True, status=await view(b, peer, limits.RESET), backup_remaining=backup_remaining)


@dataclass(frozen=True, kw_only=True)
class Checked:
    """A proof checked at this gateway (gate and verification), not yet committed: with a fleet, the ledger
    decides it between the check and the commit, outside the driver (an etcd round trip must not hold up
    Disconnects)."""

    public_key: str
    """The calling peer."""
    factor: Factor
    """The factor tried."""
    claim: ledger.Claim
    """What the fleet ledger decides on (also what the local commit needs to know)."""
    slot: str = ""
    """TOTP: "active" or "pending"."""
    backup_params: backup.KdfParams | None = None
    """Backup code: the set the index belongs to."""
    credential_id: bytes = b""
    """Device: the credential used."""
    sign_count: int = 0
    """Device: its new sign count."""
    auth: MemberAuth | None = field(default=None, repr=False)
    """The member's auth state as the check read it (saves reading it again in the same job)."""


def _holding(auth: MemberAuth, factor_id: str | None) -> str | None:
    """Which slot holds the TOTP factor with this ledger id now ("active", "pending"), if any."""
    for slot, f in (("active", auth.totp), ("pending", auth.pending_totp)):
        if f is not None and ledger.totp_factor_id(f.secret) == factor_id:
            return slot
    return None


async def _changed(b: Batch, checked: Checked, auth: MemberAuth) -> bool:
    """The member's factors changed since the check (a re-enrollment, a new backup set): the check's verdict is
    about factors that are gone. (A pending TOTP factor that became the active one meanwhile - the fleet's
    confirmation of this very reset arrived first - is still the same factor.)"""
    claim = checked.claim
    if checked.factor is Factor.TOTP:
        return _holding(auth, claim.totp_id) is None
    if checked.factor is Factor.BACKUP_CODE:
        return await b.state.backup_params(claim.member_id) != checked.backup_params
    return False


async def promote(b: Batch, member: Member, step: int) -> Member:
    """The factor enrolled by an MFA reset was confirmed (here, or at another gateway of the fleet)."""
    await b.state.promote_pending_totp(member.member_id, step)
    await complete_reset(b, member.member_id)
    factors = await b.state.factors(member.member_id)
    if factors != member.factors:
        member = replace(member, factors=factors)
        b.feed(ev.MemberUpserted(member=member))
    return member


async def settle(b: Batch, checked: Checked, decision: ledger.Decision | None, *, same_job: bool = False
                 ) -> ProofOutcome:
    """Commit a checked proof at this gateway: as the fleet ledger decided, or (None) on this gateway's own
    state alone. `same_job`: the check ran in this job (nothing can have changed since)."""
    peer = _peer(b, checked.public_key)
    claim = checked.claim
    member = b.core.members.get(claim.member_id)
    auth = checked.auth if same_job else await b.state.member_auth(claim.member_id)
    if member is None or auth is None or peer.member_id != member.member_id:
        raise Refused(Status.FAILED_PRECONDITION, "this peer is not mapped to the member any more")
    outcome = (decision.outcome if decision is not None
               else ledger.Outcome.ACCEPTED if claim.verified else ledger.Outcome.FAILED)
    if outcome is ledger.Outcome.ACCEPTED and not same_job and await _changed(b, checked, auth):
        raise Refused(Status.ABORTED, "the member's factors were replaced meanwhile; submit again")
    if outcome is not ledger.Outcome.ACCEPTED:
        if outcome is ledger.Outcome.SUPERSEDED and auth.reset_pending and auth.pending_totp is not None:
            assert decision is not None and decision.confirmed_step is not None
            member = await promote(b, member, decision.confirmed_step)
        after = (decision.attempts if decision is not None
                 else limits.after_failure(b.settings.attempts, auth.attempts, b.now))
        reason = claim.reason if outcome is ledger.Outcome.FAILED else outcome.value
        return await _failed(b, peer, member, after, checked.factor, reason)
    if checked.factor is Factor.TOTP:
        assert claim.step is not None
        slot = checked.slot if same_job else _holding(auth, claim.totp_id)
        if slot == "pending":
            member = await promote(b, member, claim.step)
        else:
            await b.state.set_totp_step(member.member_id, "active", claim.step)
        return await _accepted(b, peer, member, Factor.TOTP, auth.attempts)
    if checked.factor is Factor.BACKUP_CODE:
        assert claim.backup_index is not None
        if not await b.state.consume_backup_code(member.member_id, claim.backup_index, b.now):
            after = limits.after_failure(b.settings.attempts, auth.attempts, b.now)
            return await _failed(b, peer, member, after, Factor.BACKUP_CODE, "unknown_code")
        remaining = len(await b.state.unused_backup_codes(member.member_id))
        b.publish("backup_code.used", f"member/{member.member_id}", remaining=remaining,
                  code_id=f"{claim.backup_set}:{claim.backup_index}")
        if remaining == 0:
            b.feed(ev.MemberUpserted(member=replace(member, factors=member.factors - {Factor.BACKUP_CODE})))
        return await _accepted(b, peer, member, Factor.BACKUP_CODE, auth.attempts, backup_remaining=remaining)
    await b.state.set_sign_count(member.member_id, checked.credential_id, checked.sign_count)
    return await _accepted(b, peer, member, Factor.DEVICE, auth.attempts)


class Proof(Protocol):
    """A proof submission: checked in the driver, then settled."""

    async def check(self, b: Batch) -> Checked: ...


@dataclass(frozen=True, kw_only=True)
class Prove:
    """Check and commit a proof in one job, on this gateway's state alone (no fleet)."""

    proof: Proof
    """The submission."""

    async def run(self, b: Batch) -> ProofOutcome:
        return await settle(b, await self.proof.check(b), None, same_job=True)


@dataclass(frozen=True, kw_only=True)
class Check:
    """The first half with a fleet: check the proof; the ledger decides before `Settle`."""

    proof: Proof
    """The submission."""

    async def run(self, b: Batch) -> Checked:
        return await self.proof.check(b)


@dataclass(frozen=True, kw_only=True)
class Settle:
    """The second half with a fleet: commit what the ledger decided."""

    checked: Checked
    """The check."""
    decision: ledger.Decision | None
    """The ledger's decision; None: the ledger was unreachable and the fleet runs in `local` mode."""

    async def run(self, b: Batch) -> ProofOutcome:
        return await settle(b, self.checked, self.decision)


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


def _claim(member: Member, factor: Factor, *, reason: str = "", **verified: Any) -> ledger.Claim:
    """A failed check when `reason` is given, else a verified one with `verified`'s details."""
    return ledger.Claim(member_id=member.member_id, factor=factor.value, verified=not reason, reason=reason,
                        **verified)


@dataclass(frozen=True, kw_only=True)
class SubmitTotp:
    public_key: str
    """The calling peer."""
    code: str
    """The code as typed."""

    async def check(self, b: Batch) -> Checked:
        peer = _peer(b, self.public_key)
        member, auth = await _gate(b, peer, ProofKind.OTP)
        slots = [(s, f) for s, f in (("active", auth.totp), ("pending", auth.pending_totp)) if f]
        if not slots:
            raise Refused(Status.FAILED_PRECONDITION, "the member has no TOTP factor enrolled")
        formed = [(s, f) for s, f in slots if totp.well_formed(self.code, f.digits)]
        if not formed:
            lengths = " or ".join(sorted({str(f.digits) for _, f in slots}))
            raise Refused(Status.INVALID_ARGUMENT, f"must be {lengths} ASCII digits", field="code")
        verdicts = [(s, f, totp.verify(f, self.code, b.now)) for s, f in formed]
        accepted = [(s, f, v) for s, f, v in verdicts if v.outcome is totp.Outcome.ACCEPTED]
        if not accepted:
            replayed = any(v.outcome is totp.Outcome.REPLAYED for _, _, v in verdicts)
            claim = _claim(member, Factor.TOTP, reason="replayed" if replayed else "wrong_code")
            return Checked(public_key=self.public_key, factor=Factor.TOTP, claim=claim, auth=auth)
        slot, factor, verdict = accepted[-1] if accepted[-1][0] == "pending" else accepted[0]
        assert verdict.step is not None
        pending = auth.pending_totp if auth.reset_pending and slot == "active" else None
        claim = _claim(member, Factor.TOTP, totp_id=ledger.totp_factor_id(factor.secret), step=verdict.step,
                       confirms_reset=slot == "pending",
                       pending_id=ledger.totp_factor_id(pending.secret) if pending else None)
        return Checked(public_key=self.public_key, factor=Factor.TOTP, claim=claim, slot=slot, auth=auth)


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

    async def check(self, b: Batch) -> Checked:
        peer = _peer(b, self.public_key)
        member, auth = await _gate(b, peer, ProofKind.OTP)
        current = await b.state.backup_params(member.member_id)
        if current is None:
            raise Refused(Status.FAILED_PRECONDITION, "the member has no backup codes")
        if current != self.params:
            raise Refused(Status.ABORTED, "the backup code set was replaced meanwhile; submit again")
        index = backup.match(self.derived, await b.state.unused_backup_codes(member.member_id))
        claim = (_claim(member, Factor.BACKUP_CODE, reason="unknown_code") if index is None else
                 _claim(member, Factor.BACKUP_CODE, backup_set=ledger.backup_set_id(current.salt),
                        backup_index=index))
        return Checked(public_key=self.public_key, factor=Factor.BACKUP_CODE, claim=claim, backup_params=current,
                       auth=auth)


@dataclass(frozen=True, kw_only=True)
class SubmitDeviceAssertion:
    public_key: str
    """The calling peer."""
    assertion: device.Assertion
    """The authenticator's assertion over the issued nonce."""

    async def check(self, b: Batch) -> Checked:
        peer = _peer(b, self.public_key)
        member, auth = await _gate(b, peer, ProofKind.DEVICE)
        subject = f"member/{member.member_id}"
        assertion = self.assertion

        def failed(reason: str, detail: str) -> Checked:
            b.publish("device.assertion_refused", subject, peer=self.public_key, reason=reason, detail=detail)
            return Checked(public_key=self.public_key, factor=Factor.DEVICE,
                           claim=_claim(member, Factor.DEVICE, reason=reason), auth=auth)

        # The challenge is consumed by any attempt that names it: one try per nonce.
        nonce = device.challenge_of(assertion)
        taken = await b.state.take_nonce(nonce, b.now) if nonce else None
        if taken is None:
            return failed("unknown_or_used_challenge", "the challenge was not issued or is used")
        owner, owner_member, expires = taken
        if owner != self.public_key or owner_member != member.member_id:
            return failed("challenge_of_another_peer", "the challenge was issued to another peer")
        if b.now > expires:
            return failed("expired_challenge", "the challenge expired")
        stored = await b.state.device_credential(member.member_id, assertion.credential_id)
        if stored is None:
            return failed("foreign_credential", "the credential is not the member's")
        if assertion.user_handle and assertion.user_handle != stored.user_handle:
            return failed("wrong_user_handle", "the user handle is not the credential's")
        rules = b.settings.device
        verdict = device.verify(assertion, nonce=nonce or b"", rp_id=rules.rp_id, origins=list(rules.origins),
                                cose_public_key=stored.cose_public_key, stored_sign_count=stored.sign_count)
        if verdict.outcome is device.Outcome.CLONED:
            b.publish("device.possible_clone", subject, peer=self.public_key,
                      credential_id=device.b64url(assertion.credential_id), detail=verdict.detail)
            return failed(verdict.outcome.value, verdict.detail)
        if verdict.outcome is not device.Outcome.ACCEPTED:
            return failed(verdict.outcome.value, verdict.detail)
        return Checked(public_key=self.public_key, factor=Factor.DEVICE, claim=_claim(member, Factor.DEVICE),
                       credential_id=assertion.credential_id, sign_count=verdict.new_sign_count, auth=auth)
