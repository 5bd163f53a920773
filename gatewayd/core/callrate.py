"""Calls a second per caller on the challenge API (a peer, or a source address that is no peer's): a token
bucket each. Pure: time is passed in.

Every challenge call from the tunnel costs the daemon CPU (gRPC, then a driver job for a proof, answered in
batch order with everyone's Disconnects), so one caller - a client app stuck in a retry loop, or a peer bent on
slowing the gateway - must not be able to take it all. A client app makes a handful of calls per reconnect; a
caller over its rate is refused (RESOURCE_EXHAUSTED, with when to retry) before any work is done for it.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SOURCES = 100_000
"""Buckets kept at most. Past that, the buckets that have refilled (their sources idle) are dropped; if the
table is still full, all are (a flood from that many addresses is not a per-source problem)."""


@dataclass
class _Bucket:
    tokens: float
    at: float


class CallRate:
    def __init__(self, rate: float, burst: int, max_sources: int = MAX_SOURCES) -> None:
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._buckets: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: str, now: float) -> float | None:
        """Count one call from `source` (a peer's key or an address) at `now` (monotonic seconds): None if it
        may go on, else the seconds until it may."""
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._prune(now)
            self._buckets[source] = _Bucket(tokens=self.burst - 1, at=now)
            return None
        # A clock that went back refills nothing (and takes nothing away).
        tokens = min(float(self.burst), bucket.tokens + max(0.0, now - bucket.at) * self.rate)
        bucket.at = max(bucket.at, now)
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return None
        bucket.tokens = tokens
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [s for s, b in self._buckets.items() if b.tokens + max(0.0, now - b.at) * self.rate >= self.burst]
        for source in full:
            del self._buckets[source]
        if len(self._buckets) >= self.max_sources:
            self._buckets.clear()
