"""The control plane's writes, as driver jobs: validation against state, core events, writes.

Every refusal is raised before the job feeds the core, and the driver rolls the job's writes back: a refused
request changes nothing. Each job is a validated request (built by gatewayd.api.convert) with `run`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from gatewayd.auth import backup, limits, totp
from gatewayd.auth.ledger import Target
from gatewayd.core import events as ev
from gatewayd.core.model import Member, Role, TeamPolicy
from gatewayd.core.state import DisconnectOutcome, PolicyOutcome
from gatewayd.errors import Refused, Status
from gatewayd.ports import DeviceCredential, MemberAuth
from gatewayd.runtime.driver import Batch


def _known_member(b: Batch, member_id: str) -> Member:
    member = b.core.members.get(member_id)
    if member is None:
        raise Refused(Status.NOT_FOUND, f"member {member_id!r} is not known", field="member_id")
    return member


@dataclass(frozen=True, kw_only=True)
class ApplyTeamPolicy:
    policy: TeamPolicy
    """The new policy; its version must be newer than the stored one."""

    async def run(self, b: Batch) -> PolicyOutcome:
        team = self.policy
        current = await b.state.team_version(team.team_id)
        if current is not None and team.version <= current:
            raise Refused(Status.FAILED_PRECONDITION,
                          f"policy version {team.version} is not newer than the stored version {current}")
        await b.state.save_team(team)
        return b.ask(b.core.apply_policy, ev.TeamPolicyApplied(policy=team))


@dataclass(frozen=True, kw_only=True)
class UpsertResult:
    created: bool
    """The member did not exist before."""
    totp_pending: bool
    """The TOTP enrollment waits for its first use to complete an MFA reset."""


@dataclass(frozen=True, kw_only=True)
class UpsertMember:
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
    devices: tuple[DeviceCredential, ...] | None
    """New device credentials, None = keep."""

    async def run(self, b: Batch) -> UpsertResult:
        owners = await b.state.owners(self.peers)
        taken = sorted(k for k, m in owners.items() if m != self.member_id)
        if taken:
            raise Refused(Status.FAILED_PRECONDITION, f"peer {taken[0]} belongs to another member",
                          field="peer_public_keys")
        created = not await b.state.member_exists(self.member_id)
        await b.state.save_member(self.member_id, self.team_id, self.role, sorted(self.peers))
        auth = await b.state.member_auth(self.member_id)
        assert auth is not None
        attempts = auth.attempts
        pending = False
        subject = f"member/{self.member_id}"
        if self.totp is not None:
            pending = auth.reset_pending and auth.totp is not None
            await b.state.save_totp(self.member_id, "pending" if pending else "active",
                                    _keep_replay_mark(self.totp, auth))
            # A new factor clears the lock: re-enrollment is one way the control plane unlocks.
            attempts = limits.RESET
            await b.state.save_attempts(self.member_id, attempts)
            if pending:
                b.publish("mfa_reset.enrolled", subject, factor="totp")
            elif auth.reset_pending:
                await complete_reset(b, self.member_id)
            else:
                b.publish("factor.enrolled", subject, factor="totp")
        if self.backup is not None:
            params, hashes = self.backup
            await b.state.replace_backup_set(self.member_id, params, hashes)
            b.publish("backup_codes.replaced", subject, count=len(hashes))
        if self.devices is not None:
            await b.state.replace_device_credentials(self.member_id, self.devices)
            b.publish("factor.enrolled", subject, factor="device", count=len(self.devices))
        member = Member(member_id=self.member_id, team_id=self.team_id, role=self.role, peers=tuple(sorted(self.peers)),
                        factors=await b.state.factors(self.member_id), locked=attempts.locked)
        b.feed(ev.MemberUpserted(member=member))
        return UpsertResult(created=created, totp_pending=pending)


@dataclass(frozen=True, kw_only=True)
class RemoveMember:
    member_id: str
    """The member to remove."""

    async def run(self, b: Batch) -> int:
        """Returns how many peers lost their member."""
        member = _known_member(b, self.member_id)
        await b.state.delete_member(self.member_id)
        b.feed(ev.MemberRemoved(member_id=self.member_id))
        return len(member.peers)


@dataclass(frozen=True, kw_only=True)
class ResetMfa:
    member_id: str
    """The member whose MFA is reset."""

    async def run(self, b: Batch) -> None:
        _known_member(b, self.member_id)
        await b.state.set_reset_pending(self.member_id, True)
        await b.state.drop_pending_totp(self.member_id)
        await b.state.mark_backup_set_before_reset(self.member_id)
        b.publish("mfa_reset.requested", f"member/{self.member_id}")


@dataclass(frozen=True, kw_only=True)
class UnlockMfa:
    member_id: str
    """The member whose factors are unlocked."""

    async def run(self, b: Batch) -> None:
        member = _known_member(b, self.member_id)
        await b.state.save_attempts(self.member_id, limits.RESET)
        b.publish("factor.unlocked", f"member/{self.member_id}")
        b.feed(ev.MemberUpserted(member=replace(member, locked=False)))


@dataclass(frozen=True, kw_only=True)
class DisconnectResult:
    outcome: DisconnectOutcome
    """What was done (or, for a replay, what was done the first time)."""
    replayed: bool
    """The idempotency key was seen before: nothing was done now."""
    pending: tuple[str, ...] = ()
    """Parts not done yet (the quarantine itself holds): e.g. session keys while WireGuard does not answer."""
    at: float = 0.0
    """When the Disconnect was carried out (the first time, for a replay): a fleet demand is for proofs since."""
    fleet_recorded: bool = False
    """Fleet scope: the demand is in the fleet ledger."""

    def with_pending(self, notes: tuple[str, ...]) -> DisconnectResult:
        return replace(self, pending=self.pending + notes)


@dataclass(frozen=True, kw_only=True)
class Disconnect:
    """Step-up: exactly one of member_id, public_key or team_id is set."""

    member_id: str | None = None
    """All peers of this member."""
    public_key: str | None = None
    """One peer."""
    team_id: str | None = None
    """All peers of all members of this team."""
    reason: str = ""
    """Free text for the event."""
    idempotency_key: str
    """The caller's key: a retry with the same key and request answers the first outcome."""
    fleet: bool = False
    """Fleet scope: the demand also goes to the fleet ledger (by the caller, after this job)."""

    def fleet_target(self) -> tuple[Target, str]:
        """What the fleet demand names."""
        if self.member_id is not None:
            return Target.MEMBER, self.member_id
        if self.team_id is not None:
            return Target.TEAM, self.team_id
        assert self.public_key is not None
        return Target.PEER, self.public_key

    def fingerprint(self) -> str:
        fields: list[object] = [self.member_id, self.public_key, self.team_id, self.reason]
        if self.fleet:
            fields.append("fleet")
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()

    async def run(self, b: Batch) -> DisconnectResult:
        seen = await b.state.idempotent_response(self.idempotency_key)
        if seen is not None:
            if seen["fingerprint"] != self.fingerprint():
                raise Refused(Status.FAILED_PRECONDITION,
                              "idempotency key was used for a different request", field="idempotency_key")
            return DisconnectResult(outcome=_outcome_from_json(seen["outcome"]), replayed=True,
                                    at=float(seen.get("at", b.now)))
        if self.team_id is not None:
            # A whole team: its prefixes go into nftables first, the per-peer bookkeeping follows.
            await b.quarantine_now(b.core.team_prefixes(self.team_id))
        outcome = b.ask(b.core.disconnect, ev.DisconnectRequested(
            member_id=self.member_id, public_key=self.public_key, team_id=self.team_id, reason=self.reason))
        await b.state.save_idempotent_response(self.idempotency_key, {
            "fingerprint": self.fingerprint(),
            "outcome": {"sessions_cut": outcome.sessions_cut, "peers_quarantined": outcome.peers_quarantined,
                        "cause": outcome.cause, "warnings": list(outcome.warnings)},
            "at": b.now,
        }, b.now)
        return DisconnectResult(outcome=outcome, replayed=False, at=b.now)


async def complete_reset(b: Batch, member_id: str) -> None:
    """The new TOTP is set up: the reset is complete, and the old MFA is invalid - the old TOTP secret (replaced
    by the caller) and the backup codes that existed when the reset was requested (a set pushed since stays).
    Device credentials are managed on their own (replace_device_credentials) and are not touched."""
    await b.state.set_reset_pending(member_id, False)
    dropped = await b.state.drop_backup_set_before_reset(member_id)
    b.publish("mfa_reset.completed", f"member/{member_id}", factor="totp", backup_codes_invalidated=dropped)


def _keep_replay_mark(new: totp.TotpFactor, auth: MemberAuth) -> totp.TotpFactor:
    """Re-sending an enrollment the member already has (e.g. an UpsertMember that only moves the member to
    another team) must not lower the replay mark: a code used once stays used for that secret."""
    marks = [f.last_step for f in (auth.totp, auth.pending_totp)
             if f is not None and hmac.compare_digest(f.secret, new.secret)]
    return replace(new, last_step=max([new.last_step, *marks]))


def _outcome_from_json(o: Mapping[str, Any]) -> DisconnectOutcome:
    return DisconnectOutcome(sessions_cut=o["sessions_cut"], peers_quarantined=o["peers_quarantined"],
                             cause=o["cause"], warnings=tuple(o["warnings"]))


# ---- the daemon's own jobs ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Note:
    """Record an event that changes no state (e.g. the interface went down, a reload was refused)."""

    type: str
    """Dotted event type."""
    subject: str
    """Subject."""
    data: Mapping[str, Any]
    """Details."""

    async def run(self, b: Batch) -> None:
        b.publish(self.type, self.subject, **self.data)


@dataclass(frozen=True)
class Heartbeat:
    """Nothing: proof that the driver takes jobs (the watchdog's test)."""

    async def run(self, b: Batch) -> None:
        return None


@dataclass(frozen=True)
class MarkPublished:
    """The broker acknowledged these events."""

    cursors: tuple[int, ...]

    async def run(self, b: Batch) -> None:
        await b.outbox.mark_published(self.cursors)
