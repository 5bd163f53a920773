"""The operations the APIs ask for, as driver jobs: validation against state, auth, core events, writes.

Every refusal is raised before the job feeds the core, and the driver rolls the job's writes back: a refused
request changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from typing import Any

from gatewayd.auth import backup, device, limits, totp
from gatewayd.core import events as ev
from gatewayd.core import policy
from gatewayd.core.model import Factor, Member, Peer, PeerState, ProofKind, Role, TeamPolicy
from gatewayd.core.session import DisconnectOutcome, PolicyOutcome
from gatewayd.errors import Refused, Status
from gatewayd.runtime.driver import Batch, Job


@dataclass(frozen=True, kw_only=True)
class MemberUpdate:
    """A validated UpsertMember."""

    member_id: str
    """Member id."""
    team_id: str
    """Team id."""
    role: Role
    """Role."""
    peers: frozenset[str]
    """Peer keys."""
    totp: totp.TotpFactor | None
    """New TOTP enrollment."""
    backup: tuple[backup.KdfParams, tuple[bytes, ...]] | None
    """New backup code set."""
    devices: tuple[tuple[bytes, bytes, int, bytes], ...] | None
    """New device credentials (id, COSE key, sign count, user handle), None = keep."""


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


@dataclass(frozen=True, kw_only=True)
class DevicePolicy:
    rp_id: str = "gateway.example.net"
    """Relying-party id."""
    origins: tuple[str, ...] = ("https://gateway.example.net",)
    """Accepted origins."""
    challenge_ttl: float = 120.0
    """Nonce lifetime in seconds."""


@dataclass(frozen=True, kw_only=True)
class StatusSnapshot:
    """The daemon's own state (GetStatus)."""

    gateway_id: str
    """Gateway id."""
    started_at: float | None
    """When it became ready."""
    interface: str
    """WireGuard interface."""
    peers_configured: int
    """Peers on the interface."""
    authorized: int
    """Authorized peers."""
    quarantined: int
    """Quarantined peers."""
    locked: int
    """Locked peers."""
    quarantined_prefixes: int
    """Prefixes in the kernel's quarantine sets."""
    enforcement_healthy: bool
    """No kernel change pending a retry."""
    broker_configured: bool
    """A broker is configured."""
    broker_connected: bool
    """Connected to it."""
    outbox_unpublished: int
    """Events awaiting PUBACK."""
    outbox_oldest_age: float
    """Age of the oldest of them."""
    last_poll: float | None
    """Latest read of the interface."""
    members: int
    """Members known."""
    teams: int
    """Team policies known."""


class Operations:
    def __init__(self, attempts: limits.AttemptPolicy, device: DevicePolicy | None = None) -> None:
        self.attempts = attempts
        self.device = device or DevicePolicy()

    # ---- control ----------------------------------------------------------------------------------

    def apply_team_policy(self, team: TeamPolicy) -> Job:
        async def job(b: Batch) -> PolicyOutcome:
            current = await b.store.team_version(team.team_id)
            if current is not None and team.version <= current:
                raise Refused(Status.FAILED_PRECONDITION,
                              f"policy version {team.version} is not newer than the stored version {current}")
            await b.store.save_team(team)
            outcome: PolicyOutcome = b.feed(ev.TeamPolicyApplied(policy=team))
            return outcome
        return job

    def upsert_member(self, u: MemberUpdate) -> Job:
        async def job(b: Batch) -> dict[str, bool]:
            owners = await b.store.owners(u.peers)
            taken = sorted(k for k, m in owners.items() if m != u.member_id)
            if taken:
                raise Refused(Status.FAILED_PRECONDITION, f"peer {taken[0]} belongs to another member",
                              field="peer_public_keys")
            created = not await b.store.member_exists(u.member_id)
            await b.store.save_member(u.member_id, u.team_id, u.role, sorted(u.peers))
            auth = await b.store.member_auth(u.member_id)
            assert auth is not None
            attempts = auth.attempts
            pending = False
            subject = f"member/{u.member_id}"
            if u.totp is not None:
                pending = auth.reset_pending and auth.totp is not None
                await b.store.save_totp(u.member_id, "pending" if pending else "active", u.totp)
                # A new factor clears the lock: re-enrollment is one way the control plane unlocks.
                attempts = limits.RESET
                await b.store.save_attempts(u.member_id, attempts)
                if pending:
                    b.publish("mfa_reset.enrolled", subject, factor="totp")
                elif auth.reset_pending:
                    await b.store.set_reset_pending(u.member_id, False)
                    b.publish("mfa_reset.completed", subject, factor="totp")
                else:
                    b.publish("factor.enrolled", subject, factor="totp")
            if u.backup is not None:
                params, hashes = u.backup
                await b.store.replace_backup_set(u.member_id, params, hashes)
                b.publish("backup_codes.replaced", subject, count=len(hashes))
            if u.devices is not None:
                await b.store.replace_device_credentials(u.member_id, u.devices)
                b.publish("factor.enrolled", subject, factor="device", count=len(u.devices))
            member = Member(member_id=u.member_id, team_id=u.team_id, role=u.role, peers=u.peers,
                            factors=await b.store.factors(u.member_id), locked=attempts.locked)
            b.feed(ev.MemberUpserted(member=member))
            return {"created": created, "totp_pending": pending}
        return job

    def remove_member(self, member_id: str) -> Job:
        async def job(b: Batch) -> int:
            member = b.core.members.get(member_id)
            if member is None:
                raise Refused(Status.NOT_FOUND, f"member {member_id!r} is not known", field="member_id")
            await b.store.delete_member(member_id)
            b.feed(ev.MemberRemoved(member_id=member_id))
            return len(member.peers)
        return job

    def reset_mfa(self, member_id: str) -> Job:
        async def job(b: Batch) -> None:
            if b.core.members.get(member_id) is None:
                raise Refused(Status.NOT_FOUND, f"member {member_id!r} is not known", field="member_id")
            await b.store.set_reset_pending(member_id, True)
            await b.store.db.execute("DELETE FROM totp WHERE member_id=? AND slot='pending'", (member_id,))
            b.publish("mfa_reset.requested", f"member/{member_id}")
        return job

    def unlock_mfa(self, member_id: str) -> Job:
        async def job(b: Batch) -> None:
            member = b.core.members.get(member_id)
            if member is None:
                raise Refused(Status.NOT_FOUND, f"member {member_id!r} is not known", field="member_id")
            await b.store.save_attempts(member_id, limits.RESET)
            b.publish("factor.unlocked", f"member/{member_id}")
            b.feed(ev.MemberUpserted(member=replace(member, locked=False)))
        return job

    def disconnect(self, *, member_id: str | None, public_key: str | None, reason: str,
                   idempotency_key: str, team_id: str | None = None) -> Job:
        fingerprint = hashlib.sha256(json.dumps([member_id, public_key, team_id, reason]).encode()).hexdigest()

        async def job(b: Batch) -> tuple[DisconnectOutcome, bool]:
            seen = await b.store.idempotent_response(idempotency_key)
            if seen is not None:
                if seen["fingerprint"] != fingerprint:
                    raise Refused(Status.FAILED_PRECONDITION,
                                  "idempotency key was used for a different request", field="idempotency_key")
                o = seen["outcome"]
                return DisconnectOutcome(sessions_cut=o["sessions_cut"], peers_quarantined=o["peers_quarantined"],
                                         cause=o["cause"], warnings=tuple(o["warnings"])), True
            outcome: DisconnectOutcome = b.feed(ev.DisconnectRequested(
                member_id=member_id, public_key=public_key, team_id=team_id, reason=reason))
            await b.store.save_idempotent_response(idempotency_key, {
                "fingerprint": fingerprint,
                "outcome": {"sessions_cut": outcome.sessions_cut, "peers_quarantined": outcome.peers_quarantined,
                            "cause": outcome.cause, "warnings": list(outcome.warnings)},
            }, b.now)
            return outcome, False
        return job

    def note(self, type_: str, subject: str, data: dict[str, Any]) -> Job:
        """Record an event that changes no state (e.g. the interface went down)."""
        async def job(b: Batch) -> None:
            b.publish(type_, subject, **data)
        return job

    def heartbeat(self) -> Job:
        """Nothing: proof that the driver takes jobs (the watchdog's test)."""
        async def job(b: Batch) -> None:
            return None
        return job

    def mark_published(self, cursors: list[int]) -> Job:
        """The broker acknowledged these events."""
        async def job(b: Batch) -> None:
            await b.store.mark_published(cursors)
        return job

    def feed(self, events: list[ev.Event]) -> Job:
        """Tracking events (from the WireGuard poll)."""
        async def job(b: Batch) -> None:
            for e in events:
                b.feed(e)
        return job

    # ---- challenge --------------------------------------------------------------------------------

    async def view(self, b: Batch, peer: Peer) -> ChallengeView:
        member = b.core.member_of(peer)
        state = peer.state or PeerState.LOCKED
        attempts = limits.RESET
        if member is not None:
            auth = await b.store.member_auth(member.member_id)
            if auth is not None:
                attempts = auth.attempts
        return ChallengeView(
            state=state, owes=peer.owes,
            accepted=policy.accepted_factors(member, peer.owes) if state is PeerState.QUARANTINED else frozenset(),
            attempts_left=limits.attempts_left(self.attempts, attempts) if member else 0,
            locked_reason=peer.locked_reason.value if peer.locked_reason else None,
            retry_not_before=limits.retry_not_before(self.attempts, attempts),
        )

    def challenge(self, public_key: str, *, issue_nonce: bool = True) -> Job:
        """What the peer owes; with a fresh device nonce when it owes a device proof it can give."""
        async def job(b: Batch) -> ChallengeView:
            peer = _peer(b, public_key)
            view = await self.view(b, peer)
            member = b.core.member_of(peer)
            if issue_nonce and member is not None and Factor.DEVICE in view.accepted:
                nonce = os.urandom(device.NONCE_BYTES)
                await b.store.issue_nonce(nonce, public_key, member.member_id, b.now, self.device.challenge_ttl)
                view = replace(view, device_nonce=nonce, device_nonce_expires=b.now + self.device.challenge_ttl)
            return view
        return job

    def submit_device_assertion(self, public_key: str, assertion: device.Assertion) -> Job:
        async def job(b: Batch) -> ProofOutcome:
            peer = _peer(b, public_key)
            member, auth = await self._gate(b, peer, ProofKind.DEVICE)
            subject = f"member/{member.member_id}"

            async def failed(reason: str, detail: str) -> ProofOutcome:
                b.publish("device.assertion_refused", subject, peer=public_key, reason=reason, detail=detail)
                return await self._failed(b, peer, member, auth.attempts, Factor.DEVICE, reason)

            # The challenge is consumed by any attempt that names it: one try per nonce.
            nonce = device.challenge_of(assertion)
            taken = await b.store.take_nonce(nonce, b.now) if nonce else None
            if taken is None:
                return await failed("unknown_or_used_challenge", "the challenge was not issued or is used")
            owner, owner_member, expires = taken
            if owner != public_key or owner_member != member.member_id:
                return await failed("challenge_of_another_peer", "the challenge was issued to another peer")
            if b.now > expires:
                return await failed("expired_challenge", "the challenge expired")
            stored = await b.store.device_credential(member.member_id, assertion.credential_id)
            if stored is None:
                return await failed("foreign_credential", "the credential is not the member's")
            cose, sign_count, user_handle = stored
            if assertion.user_handle and assertion.user_handle != user_handle:
                return await failed("wrong_user_handle", "the user handle is not the credential's")
            verdict = device.verify(assertion, nonce=nonce or b"", rp_id=self.device.rp_id,
                                    origins=list(self.device.origins), cose_public_key=cose,
                                    stored_sign_count=sign_count)
            if verdict.outcome is device.Outcome.CLONED:
                b.publish("device.possible_clone", subject, peer=public_key,
                          credential_id=device.b64url(assertion.credential_id), detail=verdict.detail)
                return await failed(verdict.outcome.value, verdict.detail)
            if verdict.outcome is not device.Outcome.ACCEPTED:
                return await failed(verdict.outcome.value, verdict.detail)
            await b.store.set_sign_count(member.member_id, assertion.credential_id, verdict.new_sign_count)
            await b.store.save_attempts(member.member_id, limits.RESET)
            b.feed(ev.ProofAccepted(public_key=public_key, factor=Factor.DEVICE, verified_at=b.now))
            return ProofOutcome(accepted=True, status=await self.view(b, peer))
        return job

    async def _gate(self, b: Batch, peer: Peer, kind: ProofKind) -> tuple[Member, Any]:
        member = b.core.member_of(peer)
        if member is None:
            raise Refused(Status.FAILED_PRECONDITION, "this peer is not mapped to a member")
        auth = await b.store.member_auth(member.member_id)
        assert auth is not None
        gate = limits.gate(self.attempts, auth.attempts, b.now)
        if gate is limits.Gate.LOCKED:
            raise Refused(Status.PERMISSION_DENIED,
                          "factors are locked after too many failed attempts; the control plane must unlock "
                          "or re-enroll them")
        if gate is limits.Gate.TOO_EARLY:
            wait = (limits.retry_not_before(self.attempts, auth.attempts) or b.now) - b.now
            raise Refused(Status.RESOURCE_EXHAUSTED, f"too many failed attempts: retry in {wait:.1f} s")
        if peer.state is not PeerState.QUARANTINED or kind not in peer.owes:
            raise Refused(Status.FAILED_PRECONDITION, f"this peer owes no {kind.value} proof now")
        return member, auth

    async def _failed(self, b: Batch, peer: Peer, member: Member, attempts: limits.AttemptState,
                      factor: Factor, reason: str) -> ProofOutcome:
        after = limits.after_failure(self.attempts, attempts, b.now)
        await b.store.save_attempts(member.member_id, after)
        b.feed(ev.ProofRefused(public_key=peer.public_key, factor=factor, reason=reason, failures=after.failures))
        if after.locked:
            b.publish("factor.locked", f"member/{member.member_id}", failures=after.failures)
            b.feed(ev.MemberUpserted(member=replace(member, locked=True)))
        return ProofOutcome(accepted=False, status=await self.view(b, peer))

    def submit_totp(self, public_key: str, code: str) -> Job:
        async def job(b: Batch) -> ProofOutcome:
            peer = _peer(b, public_key)
            member, auth = await self._gate(b, peer, ProofKind.OTP)
            slots = [(s, f) for s, f in (("active", auth.totp), ("pending", auth.pending_totp)) if f]
            if not slots:
                raise Refused(Status.FAILED_PRECONDITION, "the member has no TOTP factor enrolled")
            formed = [(s, f) for s, f in slots if totp.well_formed(code, f.digits)]
            if not formed:
                lengths = " or ".join(sorted({str(f.digits) for _, f in slots}))
                raise Refused(Status.INVALID_ARGUMENT, f"must be {lengths} ASCII digits", field="code")
            verdicts = [(s, totp.verify(f, code, b.now)) for s, f in formed]
            accepted = [(s, v) for s, v in verdicts if v.outcome is totp.Outcome.ACCEPTED]
            if not accepted:
                replayed = any(v.outcome is totp.Outcome.REPLAYED for _, v in verdicts)
                return await self._failed(b, peer, member, auth.attempts, Factor.TOTP,
                                          "replayed" if replayed else "wrong_code")
            slot, verdict = accepted[-1] if accepted[-1][0] == "pending" else accepted[0]
            assert verdict.step is not None
            subject = f"member/{member.member_id}"
            if slot == "pending":
                await b.store.promote_pending_totp(member.member_id, verdict.step)
                await b.store.set_reset_pending(member.member_id, False)
                b.publish("mfa_reset.completed", subject, factor="totp")
            else:
                await b.store.set_totp_step(member.member_id, slot, verdict.step)
            await b.store.save_attempts(member.member_id, limits.RESET)
            b.feed(ev.ProofAccepted(public_key=public_key, factor=Factor.TOTP, verified_at=b.now))
            return ProofOutcome(accepted=True, status=await self.view(b, peer))
        return job

    def backup_precheck(self, public_key: str) -> Job:
        """The member's KDF parameters, after the same gate as a submission (no KDF spent on a refusal)."""
        async def job(b: Batch) -> backup.KdfParams:
            peer = _peer(b, public_key)
            member, _ = await self._gate(b, peer, ProofKind.OTP)
            params = await b.store.backup_params(member.member_id)
            if params is None or not await b.store.unused_backup_codes(member.member_id):
                raise Refused(Status.FAILED_PRECONDITION, "the member has no unused backup codes")
            return params
        return job

    def submit_backup_code(self, public_key: str, derived: bytes, params: backup.KdfParams) -> Job:
        """`derived` is the KDF of the submitted code under `params`, computed off the event loop."""
        async def job(b: Batch) -> ProofOutcome:
            peer = _peer(b, public_key)
            member, auth = await self._gate(b, peer, ProofKind.OTP)
            current = await b.store.backup_params(member.member_id)
            if current is None:
                raise Refused(Status.FAILED_PRECONDITION, "the member has no backup codes")
            if current != params:
                raise Refused(Status.ABORTED, "the backup code set was replaced meanwhile; submit again")
            index = backup.match(derived, await b.store.unused_backup_codes(member.member_id))
            if index is None or not await b.store.consume_backup_code(member.member_id, index, b.now):
                return await self._failed(b, peer, member, auth.attempts, Factor.BACKUP_CODE, "unknown_code")
            remaining = len(await b.store.unused_backup_codes(member.member_id))
            await b.store.save_attempts(member.member_id, limits.RESET)
            b.publish("backup_code.used", f"member/{member.member_id}", remaining=remaining)
            if remaining == 0:
                b.feed(ev.MemberUpserted(member=replace(member, factors=member.factors - {Factor.BACKUP_CODE})))
            b.feed(ev.ProofAccepted(public_key=public_key, factor=Factor.BACKUP_CODE, verified_at=b.now))
            return ProofOutcome(accepted=True, status=await self.view(b, peer), backup_remaining=remaining)
        return job


def _peer(b: Batch, public_key: str) -> Peer:
    peer = b.core.peers.get(public_key)
    if peer is None or not peer.present:
        raise Refused(Status.PERMISSION_DENIED, "not a tracked peer")
    return peer
