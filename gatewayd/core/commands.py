"""Outputs of the core, named in the imperative. The runtime executes them in batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gatewayd.core.model import PeerRecord


@dataclass(frozen=True, kw_only=True)
class Command:
    pass


@dataclass(frozen=True, kw_only=True)
class Quarantine(Command):
    """Put these prefixes into the quarantine sets."""

    prefixes: tuple[str, ...]
    """Tunnel prefixes (CIDR)."""


@dataclass(frozen=True, kw_only=True)
class Release(Command):
    """Take these prefixes out of the quarantine sets."""

    prefixes: tuple[str, ...]
    """Tunnel prefixes (CIDR)."""


@dataclass(frozen=True, kw_only=True)
class Track(Command):
    """These prefixes belong to a decided peer: the kernel may let tunnel traffic from them through the
    tracked-source check (quarantine still applies)."""

    prefixes: tuple[str, ...]
    """Tunnel prefixes (CIDR)."""


@dataclass(frozen=True, kw_only=True)
class Untrack(Command):
    """No configured peer lists these prefixes any more: tunnel traffic from them is refused."""

    prefixes: tuple[str, ...]
    """Tunnel prefixes (CIDR)."""


@dataclass(frozen=True, kw_only=True)
class ResetPeerSession(Command):
    """Drop the peer's WireGuard session keys so that its next packet needs a fresh handshake."""

    public_key: str
    """WireGuard public key."""


@dataclass(frozen=True, kw_only=True)
class FlushFlows(Command):
    """Delete conntrack entries from or to these prefixes."""

    prefixes: tuple[str, ...]
    """Tunnel prefixes (CIDR)."""


@dataclass(frozen=True, kw_only=True)
class SavePeer(Command):
    """Persist a peer's state."""

    record: PeerRecord
    """The state to persist."""


@dataclass(frozen=True, kw_only=True)
class ForgetPeer(Command):
    """Delete a peer's persisted state."""

    public_key: str
    """WireGuard public key."""


@dataclass(frozen=True, kw_only=True)
class Publish(Command):
    """Record a security event (outbox, WatchEvents, MQTT)."""

    type: str
    """Dotted event type."""
    subject: str
    """"member/<id>", "peer/<key>" or "team/<id>"."""
    data: dict[str, Any]
    """JSON-serialisable details; never secrets."""
