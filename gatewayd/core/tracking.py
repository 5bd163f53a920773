"""WireGuard interface snapshots and the events that tell one snapshot from the next. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gatewayd.core import events as ev


class Traffic:
    """A peer's byte counters. Unlike the rest of a snapshot they change all the time on a busy gateway and
    mean nothing to enforcement: a source may update them in place, keeping the snapshot object (a diff then
    skips the peer by identity)."""

    __slots__ = ("rx_bytes", "tx_bytes")

    def __init__(self, rx_bytes: int = 0, tx_bytes: int = 0) -> None:
        self.rx_bytes, self.tx_bytes = rx_bytes, tx_bytes

    def __repr__(self) -> str:
        return f"Traffic(rx_bytes={self.rx_bytes}, tx_bytes={self.tx_bytes})"


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerSnapshot:
    public_key: str
    """WireGuard public key, canonical base64."""
    endpoint: str | None
    """Underlay endpoint "ip:port" / "[ip6]:port", None if unknown."""
    allowed_ips: tuple[str, ...]
    """Allowed IPs, CIDR."""
    last_handshake: float | None
    """Wall-clock time of the latest handshake, None if never."""
    keepalive: int
    """Persistent keepalive interval in seconds, 0 = off."""
    preshared_key: bytes | None = None
    """Preshared key, kept only to restore the peer after a session reset; never logged or persisted."""
    traffic: Traffic = field(default_factory=Traffic, compare=False)
    """Bytes received and sent (live: see Traffic)."""

    @property
    def rx_bytes(self) -> int:
        return self.traffic.rx_bytes

    @property
    def tx_bytes(self) -> int:
        return self.traffic.tx_bytes

    def __repr__(self) -> str:
        return (f"PeerSnapshot({self.public_key}, endpoint={self.endpoint}, allowed_ips={self.allowed_ips}, "
                f"last_handshake={self.last_handshake})")


Snapshot = Mapping[str, PeerSnapshot]


def diff(old: Snapshot, new: Snapshot, keys: Iterable[str] | None = None) -> list[ev.Event]:
    """Events that turn `old` into `new` (for `keys` only, if given): peers added or removed, allowed IPs,
    endpoints, handshakes."""
    out: list[ev.Event] = []
    for key in sorted(old.keys() - new.keys()) if keys is None else [k for k in keys if k not in new]:
        if key in old:
            out.append(ev.PeerUnconfigured(public_key=key))
    for key in sorted(new) if keys is None else [k for k in keys if k in new]:
        cur, prev = new[key], old.get(key)
        if cur is prev:
            continue
        if prev is None or prev.allowed_ips != cur.allowed_ips:
            out.append(ev.PeerConfigured(public_key=key, allowed_ips=cur.allowed_ips, endpoint=cur.endpoint))
        elif prev.endpoint != cur.endpoint:
            out.append(ev.EndpointChanged(public_key=key, endpoint=cur.endpoint))
        if cur.last_handshake is not None and (
            prev is None or prev.last_handshake is None or cur.last_handshake > prev.last_handshake
        ):
            out.append(ev.HandshakeSeen(public_key=key, at=cur.last_handshake))
    return out
