"""The fleet ledger's decisions: what a proof must compare and write in etcd so that the whole fleet decides it
once. Pure: the ledger entries (as read, with their revisions) and `now` come in, a Decision goes out; the
runtime turns it into one etcd transaction and, when another gateway wrote first, decides again on fresh entries.

What is shared, per member (README, "Fleet"); the keys that other gateways must act on live under `w/` (watched),
the spends under `s/` (read by the transactions that need them, not sent to every gateway at every proof):
- `attempts`: consecutive failures and the lock (absent: none). Every proof compares it, so a proof is gated on
  exactly the state it commits against: N gateways do not give N x max_failures guesses.
- `totp/<factor id>`: the last accepted TOTP step of that secret (a code is spent fleet-wide before success is
  reported; an older or equal step is a replay). Kept for the TOTP window only (a short lease).
- `backup/<set id>`: the spent indices of a backup code set (create-if-absent per code, as one key per set).
- `reset/<factor id>`: an MFA reset confirmed with that new TOTP factor; the old factor is then invalid everywhere.
Secrets never go to the ledger: a factor or set id is a one-way digest.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from gatewayd.auth import limits

Entries = Mapping[str, tuple[dict[str, Any], int]]
"""Ledger key (relative to the fleet prefix) -> (value, mod_revision); an absent key is not in the mapping."""


def totp_factor_id(secret: bytes) -> str:
    """A TOTP secret's id in the ledger: a one-way digest (a secret has at least 128 bits)."""
    return hashlib.sha256(b"gatewayd totp factor\0" + secret).hexdigest()[:32]


def backup_set_id(salt: bytes) -> str:
    """A backup code set's id: a digest of the set's salt (every set has a fresh one)."""
    return hashlib.sha256(b"gatewayd backup set\0" + salt).hexdigest()[:16]


def member_prefix(member_id: str) -> str:
    """The member's watched keys (attempts, confirmed resets)."""
    return f"w/m/{quote(member_id, safe='')}/"


def spends_prefix(member_id: str) -> str:
    """The member's spends (TOTP steps, backup codes): no other gateway acts on them when they change."""
    return f"s/{quote(member_id, safe='')}/"


WATCHED = "w/"
"""What every gateway follows: demands, attempts, confirmed resets."""


def attempts_key(member_id: str) -> str:
    return member_prefix(member_id) + "attempts"


def totp_key(member_id: str, factor_id: str) -> str:
    return spends_prefix(member_id) + f"totp/{factor_id}"


def backup_key(member_id: str, set_id: str) -> str:
    return spends_prefix(member_id) + f"backup/{set_id}"


def reset_key(member_id: str, factor_id: str) -> str:
    return member_prefix(member_id) + f"reset/{factor_id}"


class Target(enum.Enum):
    """What a fleet step-up demand names."""

    MEMBER = "member"
    PEER = "peer"
    TEAM = "team"


def demand_key(target: Target, ident: str) -> str:
    return f"w/d/{target.value}/{quote(ident, safe='')}"


class Lifetime(enum.Enum):
    """How long a written key lives in etcd."""

    KEEP = "keep"
    """Until overwritten or deleted (bounded by members and sets)."""
    WINDOW = "window"
    """Past the TOTP window (a short lease)."""
    RETAIN = "retain"
    """The fleet's retention (a long lease)."""


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    FAILED = "failed"
    """Locally refused (wrong code, bad assertion): one failure more."""
    REPLAYED = "replayed"
    """The TOTP step was accepted before, at this or another gateway."""
    USED = "used"
    """The backup code was spent before, at this or another gateway."""
    SUPERSEDED = "superseded"
    """The factor was replaced by an MFA reset confirmed at another gateway."""
    LOCKED = "locked"
    """The member's factors are locked fleet-wide (nothing written)."""
    TOO_EARLY = "too_early"
    """Too soon after the latest failure fleet-wide (nothing written)."""


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A proof checked at this gateway, waiting to be decided fleet-wide."""

    member_id: str
    """The member."""
    factor: str
    """"totp", "backup_code" or "device"."""
    verified: bool
    """It checked out locally (otherwise it is a failure to count)."""
    reason: str = ""
    """Why it did not check out (for the failure's event)."""
    totp_id: str | None = None
    """The TOTP factor used."""
    step: int | None = None
    """Its time step."""
    confirms_reset: bool = False
    """The factor used is the one enrolled by an MFA reset: using it confirms the reset."""
    pending_id: str | None = None
    """The member's factor awaiting a reset's confirmation, while an old factor is used."""
    backup_set: str | None = None
    """The backup code's set."""
    backup_index: int | None = None
    """The backup code's index in its set."""


@dataclass(frozen=True, kw_only=True)
class Decision:
    outcome: Outcome
    """What the fleet decides, if the transaction commits."""
    attempts: limits.AttemptState
    """The member's attempt state after it."""
    compares: dict[str, int] = field(default_factory=dict)
    """Key -> mod_revision it must still have (0: absent) for the decision to hold."""
    writes: dict[str, tuple[dict[str, Any] | None, Lifetime]] = field(default_factory=dict)
    """Key -> (value, lifetime); None deletes the key."""
    confirmed_step: int | None = None
    """SUPERSEDED: the step at which the new factor was confirmed (this gateway promotes it with that mark)."""


def attempts_of(entries: Entries, member_id: str) -> tuple[limits.AttemptState, int]:
    value, revision = entries.get(attempts_key(member_id), ({}, 0))
    if not value:
        return limits.RESET, revision
    return limits.AttemptState(failures=int(value.get("failures", 0)), last_failure_at=value.get("last"),
                               locked=bool(value.get("locked", False))), revision


def attempts_value(state: limits.AttemptState, gateway: str) -> dict[str, Any] | None:
    if state == limits.RESET:
        return None
    return {"failures": state.failures, "last": state.last_failure_at, "locked": state.locked, "by": gateway}


def decide(claim: Claim, entries: Entries, policy: limits.AttemptPolicy, now: float, gateway: str) -> Decision:
    member = claim.member_id
    attempts, revision = attempts_of(entries, member)
    compares = {attempts_key(member): revision}
    gate = limits.gate(policy, attempts, now)
    if gate is limits.Gate.LOCKED:
        return Decision(outcome=Outcome.LOCKED, attempts=attempts, compares=compares)
    if gate is limits.Gate.TOO_EARLY:
        return Decision(outcome=Outcome.TOO_EARLY, attempts=attempts, compares=compares)

    outcome = Outcome.ACCEPTED if claim.verified else Outcome.FAILED
    writes: dict[str, tuple[dict[str, Any] | None, Lifetime]] = {}
    confirmed: int | None = None
    if claim.verified and claim.factor == "totp":
        assert claim.totp_id is not None and claim.step is not None
        if claim.pending_id is not None and not claim.confirms_reset:
            rkey = reset_key(member, claim.pending_id)
            reset, compares[rkey] = entries.get(rkey, ({}, 0))
            if reset:
                outcome, confirmed = Outcome.SUPERSEDED, int(reset["step"])
        tkey = totp_key(member, claim.totp_id)
        spent, compares[tkey] = entries.get(tkey, ({}, 0))
        if outcome is Outcome.ACCEPTED and spent and int(spent["step"]) >= claim.step:
            outcome = Outcome.REPLAYED
        if outcome is Outcome.ACCEPTED:
            writes[tkey] = ({"step": claim.step, "by": gateway}, Lifetime.WINDOW)
            if claim.confirms_reset:
                writes[reset_key(member, claim.totp_id)] = ({"step": claim.step, "at": now, "by": gateway},
                                                             Lifetime.RETAIN)
    elif claim.verified and claim.factor == "backup_code":
        assert claim.backup_set is not None and claim.backup_index is not None
        bkey = backup_key(member, claim.backup_set)
        value, compares[bkey] = entries.get(bkey, ({}, 0))
        spent_indices = [int(i) for i in value.get("spent", [])]
        if claim.backup_index in spent_indices:
            outcome = Outcome.USED
        else:
            writes[bkey] = ({"spent": sorted([*spent_indices, claim.backup_index]), "by": gateway}, Lifetime.KEEP)

    after = limits.RESET if outcome is Outcome.ACCEPTED else limits.after_failure(policy, attempts, now)
    if after != attempts:
        writes[attempts_key(member)] = (attempts_value(after, gateway), Lifetime.KEEP)
    return Decision(outcome=outcome, attempts=after, compares=compares, writes=writes, confirmed_step=confirmed)
