"""Inputs to the core, named in the past tense. Time is never inside an event: it is passed to `handle`."""

from __future__ import annotations

from dataclasses import dataclass

from gatewayd.core.model import Factor, Member, TeamPolicy


@dataclass(frozen=True, kw_only=True)
class Event:
    """An input to the core."""


@dataclass(frozen=True, kw_only=True)
class PeerConfigured(Event):
    """A peer is on the WireGuard interface (new, or its allowed IPs changed)."""

    public_key: str
    """WireGuard public key."""
    allowed_ips: tuple[str, ...]
    """Tunnel prefixes."""
    endpoint: str | None = None
    """Underlay endpoint, when known."""


@dataclass(frozen=True, kw_only=True)
class PeerUnconfigured(Event):
    """A peer vanished from the WireGuard interface."""

    public_key: str
    """WireGuard public key."""


@dataclass(frozen=True, kw_only=True)
class HandshakeSeen(Event):
    """The peer completed a handshake at `at` (wall clock, as WireGuard reports it)."""

    public_key: str
    """WireGuard public key."""
    at: float
    """Handshake time."""


@dataclass(frozen=True, kw_only=True)
class HandshakeInitiated(Event):
    """A client's handshake initiation for the peer reached the gateway and waits for a verdict (WireGuard has
    not seen it yet). Decrypted with the interface's key, so the peer is certain; the stamp is the initiation's
    TAI64N timestamp, which only grows for a given key (WireGuard refuses a replay)."""

    public_key: str
    """The initiator."""
    endpoint: str
    """Where it came from ("ip:port" / "[ip6]:port")."""
    at: float
    """When it arrived (wall clock)."""
    stamp: bytes
    """TAI64N timestamp from inside the initiation."""
    recent_data: bool
    """The same endpoint sent WireGuard data packets in the last few seconds (nftables saw them): a running
    client rekeys because it sends; a restarted one has no keys to send with."""
    by_gateway: bool = False
    """The gateway's own WireGuard initiated (towards `endpoint`); then there is no stamp (it is sealed with
    keys only WireGuard holds) and nobody outside can replay it."""


@dataclass(frozen=True, kw_only=True)
class EndpointChanged(Event):
    """The peer roamed to another underlay endpoint."""

    public_key: str
    """WireGuard public key."""
    endpoint: str | None
    """New endpoint."""


@dataclass(frozen=True, kw_only=True)
class DisconnectRequested(Event):
    """The control plane asked for a step-up: exactly one of member_id, public_key or team_id is set."""

    member_id: str | None = None
    """All peers of this member."""
    public_key: str | None = None
    """One peer."""
    team_id: str | None = None
    """All peers of all members of this team."""
    reason: str = ""
    """Free text for the event."""


@dataclass(frozen=True, kw_only=True)
class StepUpDemanded(Event):
    """A step-up demand from the fleet ledger (a Disconnect with fleet scope, at this or another gateway): the
    named peers owe a proof verified after `after`. Exactly one of member_id, public_key or team_id is set."""

    member_id: str | None = None
    """All peers of this member."""
    public_key: str | None = None
    """One peer."""
    team_id: str | None = None
    """All peers of all members of this team."""
    after: float
    """When the demand was made (the gateway that recorded it, wall clock): a proof verified since pays it."""
    reason: str = ""
    """Free text for the event."""
    by: str = ""
    """The gateway that recorded it."""


@dataclass(frozen=True, kw_only=True)
class TeamPolicyApplied(Event):
    """A new (already validated, newer) team policy."""

    policy: TeamPolicy
    """The policy."""


@dataclass(frozen=True, kw_only=True)
class MemberUpserted(Event):
    """A member was created or changed (team, role, peers, enrolled factors, lock)."""

    member: Member
    """The member as it is now."""


@dataclass(frozen=True, kw_only=True)
class MemberRemoved(Event):
    """A member and its mapping are gone."""

    member_id: str
    """Member id."""


@dataclass(frozen=True, kw_only=True)
class ProofAccepted(Event):
    """A factor verified for the peer at `verified_at`."""

    public_key: str
    """The peer that proved."""
    factor: Factor
    """The factor used."""
    verified_at: float
    """When the factor was verified; must not be older than the demand."""


@dataclass(frozen=True, kw_only=True)
class ProofRefused(Event):
    """A factor did not verify for the peer."""

    public_key: str
    """The peer that tried."""
    factor: Factor
    """The factor tried."""
    reason: str
    """Why (e.g. "wrong_code", "replayed", "unknown_code")."""
    failures: int
    """The member's consecutive failures after this one."""
