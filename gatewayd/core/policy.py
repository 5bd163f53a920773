"""Policy decisions: what proof does a peer owe, and when. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

from gatewayd.core.model import FACTOR_PROVES, Factor, LockedReason, Member, ProofKind, TeamPolicy, proof_set


@dataclass(frozen=True, kw_only=True)
class Demand:
    """What a peer owes, or why it cannot pay."""

    owes: frozenset[ProofKind]
    """Proofs owed; empty = nothing owed."""
    locked: LockedReason | None = None
    """Set when the peer owes a proof it cannot give."""

    @property
    def nothing(self) -> bool:
        """Nothing is owed and nothing holds the peer."""
        return not self.owes and self.locked is None


NONE, OTP, DEVICE = proof_set(()), proof_set({ProofKind.OTP}), proof_set({ProofKind.DEVICE})
NOTHING = Demand(owes=NONE)


def provable(member: Member) -> frozenset[ProofKind]:
    """The proof kinds the member's enrolled factors can give."""
    return member.means


def lock_reason(member: Member, owes: frozenset[ProofKind]) -> LockedReason | None:
    """Why the member cannot pay `owes` now, or None when it can."""
    if member.locked:
        return LockedReason.FACTOR_LOCKED
    if not owes <= provable(member):
        return LockedReason.NO_FACTOR
    return None


def _with_means(member: Member, owes: frozenset[ProofKind]) -> Demand:
    return Demand(owes=owes, locked=lock_reason(member, owes))


def for_new_session(policy: TeamPolicy | None, member: Member | None, *, quarantine_unknown: bool) -> Demand:
    """What a peer owes when a new session starts (or the peer first appears)."""
    if member is None:
        if quarantine_unknown:
            # Locked, but owing nothing: mapping it to a member decides afresh.
            return Demand(owes=NONE, locked=LockedReason.UNKNOWN_PEER)
        return NOTHING
    if policy is None or not policy.applies_to(member.role):
        return NOTHING
    owes = policy.named_proofs()
    if not owes:
        return NOTHING
    return _with_means(member, owes)


def for_step_up(policy: TeamPolicy | None, member: Member | None) -> Demand:
    """What a peer owes after a Disconnect or when its proof went stale.

    The proofs the team's connection policies name; when they name none, a TOTP (or backup code) proof if
    the member can give one, else a device proof. A Disconnect always demands a proof here, even where the
    vendor's client app would have reconnected silently.
    """
    if member is None:
        return Demand(owes=OTP, locked=LockedReason.UNKNOWN_PEER)
    named = policy.named_proofs() if policy is not None else NONE
    if named:
        return _with_means(member, named)
    means = provable(member)
    if ProofKind.OTP in means:
        return _with_means(member, OTP)
    if ProofKind.DEVICE in means:
        return _with_means(member, DEVICE)
    return Demand(owes=OTP, locked=LockedReason.NO_FACTOR)


def accepted_factors(member: Member | None, owes: frozenset[ProofKind]) -> frozenset[Factor]:
    """Factors the member can use now toward what is owed."""
    if member is None or member.locked:
        return frozenset()
    return frozenset(f for f in member.factors if FACTOR_PROVES[f] in owes)
