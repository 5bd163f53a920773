"""Domain types shared by the core and everything around it."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class Scope(enum.Enum):
    CONTROL_PANEL = "control_panel"
    CLIENT_APP = "client_app"
    BOTH = "both"


class Roles(enum.Enum):
    ADMINS = "admins"
    MEMBERS = "members"
    ALL = "all"


class Role(enum.Enum):
    ADMIN = "admin"
    MEMBER = "member"


class PeerState(enum.Enum):
    AUTHORIZED = "authorized"
    QUARANTINED = "quarantined"
    LOCKED = "locked"


class ProofKind(enum.Enum):
    OTP = "otp"
    """A TOTP code or a backup code."""
    DEVICE = "device"
    """A user-verified device-key assertion."""


_PROOF_SETS: dict[frozenset[ProofKind], frozenset[ProofKind]] = {}


def proof_set(kinds: Iterable[ProofKind]) -> frozenset[ProofKind]:
    """The one shared object for a set of proof kinds (there are four): what peers owe is kept per peer, and
    at 100,000 peers a frozenset each was 22 MB."""
    key = frozenset(kinds)
    return _PROOF_SETS.setdefault(key, key)


class Factor(enum.Enum):
    TOTP = "totp"
    BACKUP_CODE = "backup_code"
    DEVICE = "device"


FACTOR_PROVES: dict[Factor, ProofKind] = {
    Factor.TOTP: ProofKind.OTP,
    Factor.BACKUP_CODE: ProofKind.OTP,
    Factor.DEVICE: ProofKind.DEVICE,
}


class LockedReason(enum.Enum):
    FACTOR_LOCKED = "factor_locked"
    """Too many consecutive failures; the control plane must unlock or re-enroll."""
    NO_FACTOR = "no_factor"
    """The member has no enrolled factor for what is owed."""
    UNKNOWN_PEER = "unknown_peer"
    """The peer is not mapped to any member."""


@dataclass(frozen=True, kw_only=True)
class TeamPolicy:
    team_id: str
    """Team id."""
    version: int
    """Monotonic policy version."""
    scope: Scope
    """Where Team MFA applies."""
    roles: Roles
    """To whom Team MFA applies."""
    totp_prior_connection: bool = False
    """A new session owes an OTP proof."""
    device_prior_connection: bool = False
    """A new session owes a device proof."""
    reverify_interval: float = 0.0
    """Seconds after which an authorized peer's proof is stale; 0 = never."""

    def applies_to(self, role: Role) -> bool:
        """Whether Team MFA covers client-app connections of a member with this role."""
        if self.scope is Scope.CONTROL_PANEL:
            return False
        if self.roles is Roles.ALL:
            return True
        return (self.roles is Roles.ADMINS) == (role is Role.ADMIN)

    def named_proofs(self) -> frozenset[ProofKind]:
        """The proofs the connection policies name."""
        kinds = set()
        if self.totp_prior_connection:
            kinds.add(ProofKind.OTP)
        if self.device_prior_connection:
            kinds.add(ProofKind.DEVICE)
        return proof_set(kinds)


@dataclass(frozen=True, kw_only=True, slots=True)
class Member:
    member_id: str
    """Member id."""
    team_id: str
    """The member's team."""
    role: Role
    """Role on the team."""
    peers: tuple[str, ...] = ()
    """WireGuard public keys (base64) of the member's devices, sorted, each once. A tuple, not a set: a
    frozenset of one key costs 216 bytes, a tuple 48, and members have a handful of devices at most."""
    factors: frozenset[Factor] = frozenset()
    """Factors the member has enrolled and can use."""
    locked: bool = False
    """Factors locked after too many consecutive failures."""
    means: frozenset[ProofKind] = field(init=False, repr=False, compare=False)
    """The proof kinds the enrolled factors can give (derived)."""

    def __post_init__(self) -> None:
        peers = self.peers
        if type(peers) is not tuple or (len(peers) > 1 and list(peers) != sorted(set(peers))):
            object.__setattr__(self, "peers", tuple(sorted(set(peers))))
        factors = _FACTOR_SETS.setdefault(self.factors, self.factors)
        means = _MEANS.get(factors)
        if means is None:
            means = _MEANS[factors] = frozenset(FACTOR_PROVES[f] for f in factors)
        object.__setattr__(self, "factors", factors)
        object.__setattr__(self, "means", means)


_FACTOR_SETS: dict[frozenset[Factor], frozenset[Factor]] = {}
"""One object for each set of factors (at most eight), shared by every member that has it."""
_MEANS: dict[frozenset[Factor], frozenset[ProofKind]] = {}
"""The proof kinds of each set of factors: computed once, shared by every member."""


NO_PROOFS: Mapping[ProofKind, float] = MappingProxyType({})


@dataclass(kw_only=True, slots=True)
class Peer:
    """One WireGuard peer as the core tracks it. Mutated only by `core.state`."""

    public_key: str
    """WireGuard public key, canonical base64."""
    member_id: str | None = None
    """The member the key is mapped to, if any."""
    present: bool = False
    """Configured on the WireGuard interface."""
    allowed_ips: tuple[str, ...] = ()
    """Tunnel prefixes (CIDR)."""
    endpoint: str | None = None
    """Current underlay endpoint."""
    last_handshake: float | None = None
    """Wall-clock time of the latest completed handshake."""
    session_live: bool = False
    """A handshake happened less than WireGuard's reject-after time ago."""
    session_started_at: float | None = None
    """Handshake time that started the current session."""
    state: PeerState | None = None
    """Enforcement state; None until first decided."""
    owes: frozenset[ProofKind] = frozenset()
    """Proofs still owed."""
    owes_since: float | None = None
    """Time of the demand that the owed proofs must be newer than."""
    proven_at: float | None = None
    """Time of the latest accepted proof that released the peer."""
    admitted_at: float | None = None
    """When the peer was last admitted without a proof (nothing owed); a re-verification interval counts from
    it for a peer that never proved."""
    locked_reason: LockedReason | None = None
    """Why the peer is locked."""
    proofs: Mapping[ProofKind, float] = field(default_factory=lambda: NO_PROOFS)
    """Proofs accepted since the current demand (replaced, never changed in place: most peers share the empty
    one)."""
    step_up: bool = False
    """The current demand is a step-up (Disconnect or re-verification), not a connection policy."""
    initiation_stamp: bytes = b""
    """The latest TAI64N timestamp of the peer's handshake initiations (replays are older); not persisted."""
    last_initiation: float | None = None
    """When the latest initiation arrived (not persisted)."""
    keys_at: float | None = None
    """When the handshake that made the current session keys began, as seen by the handshake queue: a newer
    estimate than `last_handshake`, which only a read of the interface updates (not persisted)."""
    rekeying: bool = False
    """The latest initiation was taken as a rekey (its retries are too)."""

    @property
    def session_clock(self) -> float | None:
        """The latest moment session keys were made: the later of the handshake WireGuard reported and the
        initiation the queue saw."""
        if self.keys_at is None:
            return self.last_handshake
        return self.keys_at if self.last_handshake is None else max(self.keys_at, self.last_handshake)

    @property
    def verified_since(self) -> float | None:
        """What a re-verification interval counts from: the latest proof, or the admission of a peer that was
        let in without one."""
        return self.proven_at if self.proven_at is not None else self.admitted_at

    @property
    def enforced(self) -> bool:
        """Whether the peer's tunnel addresses belong in the quarantine sets."""
        return self.state in (PeerState.QUARANTINED, PeerState.LOCKED)


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerRecord:
    """The persisted part of a Peer."""

    public_key: str
    """WireGuard public key."""
    state: PeerState
    """Enforcement state."""
    owes: frozenset[ProofKind]
    """Proofs still owed."""
    owes_since: float | None
    """Time of the demand."""
    proven_at: float | None
    """Latest proof time."""
    locked_reason: LockedReason | None
    """Why locked."""
    allowed_ips: tuple[str, ...]
    """Tunnel prefixes last seen (so enforcement survives a restart before the first poll)."""
    session_started_at: float | None
    """Start of the current session."""
    last_handshake: float | None
    """Latest handshake seen."""
    step_up: bool
    """The demand is a step-up."""
    admitted_at: float | None = None
    """When the peer was admitted without a proof."""
    endpoint: str | None = None
    """Last underlay endpoint seen (so that a restart does not report every peer's endpoint as changed)."""
