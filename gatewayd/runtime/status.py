"""The daemon's own state, as GetStatus and the gauges report it."""

from __future__ import annotations

from dataclasses import dataclass

from gatewayd.core.model import PeerState
from gatewayd.core.state import GatewayState


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
    """The kernel holds the desired enforcement (no change pending a retry, no drift unrepaired)."""
    enforcement_verified_at: float | None
    """When the kernel's table was last found to hold exactly the desired state."""
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


def peer_counts(core: GatewayState) -> tuple[int, dict[PeerState, int]]:
    """(peers on the interface, how many of them are in each state)."""
    counts = {state: 0 for state in PeerState}
    present = 0
    for peer in core.peers.values():
        present += peer.present
        if peer.state is not None and peer.present:
            counts[peer.state] += 1
    return present, counts
