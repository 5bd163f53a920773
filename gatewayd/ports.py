"""The ports: what the runtime needs from the kernel, as protocols. Adapters implement them."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from gatewayd.core.tracking import PeerSnapshot, Snapshot
from gatewayd.scheduling import Pause, no_pause


@dataclass(frozen=True, kw_only=True)
class SetChange:
    """One atomic change of the enforcement sets."""

    quarantine: Sequence[str] = ()
    """Prefixes that enter quarantine."""
    release: Sequence[str] = ()
    """Prefixes that leave quarantine."""
    track: Sequence[str] = ()
    """Prefixes of decided peers: tunnel traffic from them passes the tracked-source check."""
    untrack: Sequence[str] = ()
    """Prefixes no decided peer holds: tunnel traffic from them is refused."""

    def __bool__(self) -> bool:
        return bool(self.quarantine or self.release or self.track or self.untrack)


class Enforcer(Protocol):
    """The kernel's enforcement: quarantine sets and tracked-source sets."""

    async def reconcile(self, quarantined: Collection[str], tracked: Collection[str]) -> bool:
        """Make enforcement hold exactly these sets (creating what is missing); True if anything changed."""
        ...

    async def apply(self, change: SetChange) -> None:
        """Apply one change in one atomic transaction."""
        ...

    def quarantined(self) -> AbstractSet[str]:
        """The quarantined prefixes, as last written (a read-only view)."""
        ...

    def tracked(self) -> AbstractSet[str]:
        """The tracked prefixes, as last written (a read-only view)."""
        ...


class PeerSource(Protocol):
    """A WireGuard interface's peers."""

    read_seconds: float
    """How long the latest read kept the interface busy: for a userspace implementation, from the request to
    the end of its answer (its configuration lock is held meanwhile); for the kernel, the dump."""

    async def read(self, pause: Pause = no_pause) -> Snapshot:
        """The interface's peers now. `pause` is awaited before the interface is asked (a userspace
        implementation's configuration lock is held while it answers) and between slices of decoding."""
        ...

    async def reset_sessions(self, peers: Sequence[PeerSnapshot]) -> None:
        """Drop the peers' session keys, keeping their configuration (endpoint, psk, allowed IPs, keepalive)."""
        ...


class FlowTable(Protocol):
    """Connection tracking."""

    async def start(self) -> None:
        """Begin following the flow table (before the first flush)."""
        ...

    async def close(self) -> None:
        """Stop following it."""
        ...

    async def flush(self, prefixes: Sequence[str]) -> int:
        """Delete entries from or to these prefixes; returns how many."""
        ...
