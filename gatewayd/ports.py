"""The ports: what the runtime needs from the kernel, as protocols. Adapters implement them."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from gatewayd.core.tracking import PeerSnapshot, Snapshot


class Enforcer(Protocol):
    """The quarantine sets."""

    async def reconcile(self, prefixes: Collection[str]) -> bool:
        """Make enforcement hold exactly `prefixes` (creating what is missing); True if anything changed."""
        ...

    async def apply(self, add: Sequence[str], remove: Sequence[str]) -> None:
        """Add and remove prefixes in one atomic transaction."""
        ...

    def quarantined(self) -> frozenset[str]:
        """The prefixes enforcement holds now, as last written."""
        ...


class PeerSource(Protocol):
    """A WireGuard interface's peers."""

    async def read(self) -> Snapshot:
        """The interface's peers now."""
        ...

    async def reset_sessions(self, peers: Sequence[PeerSnapshot]) -> None:
        """Drop the peers' session keys, keeping their configuration (endpoint, psk, allowed IPs, keepalive)."""
        ...


class FlowTable(Protocol):
    """Connection tracking."""

    async def flush(self, prefixes: Sequence[str]) -> int:
        """Delete entries from or to these prefixes; returns how many."""
        ...
