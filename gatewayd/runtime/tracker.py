"""The tracker: the one owner of what WireGuard says about its peers.

It reads the interface (polling, and at once when rtnetlink reports a change), keeps the latest read, turns
the difference with the previous one into core events (fed through the driver), and answers the driver's
question "what is this peer's full configuration?" for session resets, from real reads only.

Reads are background work (gatewayd.scheduling): a read does not start while an RPC or a job runs, and its
answer is decoded and diffed in short slices between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

from gatewayd.core.events import Event
from gatewayd.core.tracking import PeerSnapshot, diff
from gatewayd.ports import PeerSource
from gatewayd.runtime.driver import Batch, Driver
from gatewayd.runtime.observability import Metrics
from gatewayd.scheduling import Pause, Slices, auto_poll_interval

log = logging.getLogger(__name__)


async def diff_in_slices(old: Mapping[str, PeerSnapshot], new: Mapping[str, PeerSnapshot], pause: Pause
                         ) -> list[Event]:
    """`diff`, 64 peers at a time, pausing whenever a slice's time is used up (10,000 peers take ~5 ms)."""
    keys = sorted(old.keys() | new.keys())
    events: list[Event] = []
    slices = Slices(pause)
    for i in range(0, len(keys), 64):
        events += diff(old, new, keys[i:i + 64])
        if slices.due():
            await slices.pause()
    return events


FEED_PEERS = 5_000
"""A read's events go to the driver in jobs of this many peers' events, each its own batch (a SQLite and a
kernel transaction): a read that configures 100,000 peers (the first after a start with a new interface)
neither builds 100,000 peers' commands, records and events at once (memory the allocator then keeps) nor
holds up other calls until the last peer is decided."""


def by_peers(events: list[Event], peers: int) -> Iterator[tuple[Event, ...]]:
    """The events in runs of at most `peers` peers' events; a peer's events (consecutive in a diff) stay
    together and in order."""
    start, count, last = 0, 0, None
    for i, e in enumerate(events):
        key = getattr(e, "public_key", None)
        if key != last:
            if count == peers:
                yield tuple(events[start:i])
                start, count = i, 0
            count, last = count + 1, key
    if start < len(events):
        yield tuple(events[start:])


@dataclass(frozen=True)
class FeedTracking:
    """Job: the events a read of the interface produced."""

    events: tuple[Event, ...]

    async def run(self, b: Batch) -> None:
        for e in self.events:
            b.feed(e)


class Tracker:
    def __init__(self, source: PeerSource, driver: Driver, metrics: Metrics, *, interface: str,
                 poll_interval: Callable[[], float | str], clock: Callable[[], float] = time.time) -> None:
        self.source, self.driver, self.metrics = source, driver, metrics
        self.interface = interface
        self._configured_interval = poll_interval
        self.clock = clock
        self._read: dict[str, PeerSnapshot] | None = None
        self._rebase = False
        """Diff the next read against what the core knows rather than against the previous read."""
        driver.on_core_rebuilt.append(self.rebase)
        self.last_poll: float | None = None
        self.read_seconds = 0.0
        """How long reads of the interface keep it busy, smoothed over the latest reads."""
        self.wake = asyncio.Event()
        """Set to read now (rtnetlink saw the interface change)."""
        self.after_read: list[Callable[[], Awaitable[None]]] = []
        """Called after each successful read (e.g. to follow the interface's key and port)."""

    def rebase(self) -> None:
        """Compare the next read with what the core knows (at start-up: what the store says was on the interface,
        so that peers gone meanwhile are unconfigured; after the core was rebuilt from the store: the same).
        The baseline is taken when that read arrives; it is never used as a peer's configuration."""
        self._rebase = True

    async def _core_baseline(self, pause: Pause) -> dict[str, PeerSnapshot]:
        """The configured peers as the core knows them, built in slices (100,000 peers take ~0.5 s)."""
        baseline: dict[str, PeerSnapshot] = {}
        slices = Slices(pause)
        for count, (key, peer) in enumerate(list(self.driver.core.peers.items()), 1):
            if peer.present:
                baseline[key] = PeerSnapshot(public_key=key, endpoint=peer.endpoint, allowed_ips=peer.allowed_ips,
                                             last_handshake=peer.last_handshake, keepalive=0)
            if count & 63 == 0 and slices.due():
                await slices.pause()
        return baseline

    @property
    def has_read(self) -> bool:
        return self._read is not None

    def spec(self, public_key: str) -> PeerSnapshot | None:
        return self._read.get(public_key) if self._read is not None else None

    def poll_interval(self) -> float:
        configured = self._configured_interval()
        return auto_poll_interval(self.read_seconds) if configured == "auto" else float(configured)

    async def poll_once(self) -> None:
        started = time.perf_counter()
        quiet = self.driver.foreground.quiet
        snapshot = await self.source.read(quiet)
        latest = self.source.read_seconds
        self.read_seconds = latest if not self.read_seconds else 0.7 * self.read_seconds + 0.3 * latest
        read_before, rebase = self._read, self._rebase or self._read is None
        old = await self._core_baseline(quiet) if rebase else read_before or {}
        events = await diff_in_slices(old, snapshot, quiet)
        first = read_before is None
        self._read, self._rebase = dict(snapshot), False
        self.metrics.poll_seconds.observe(time.perf_counter() - started)
        self.last_poll = self.clock()
        if events:
            try:
                for chunk in by_peers(events, FEED_PEERS):
                    await self.driver.submit(FeedTracking(chunk))
            except Exception:
                # Not recorded (e.g. the disk refused it): the next read must produce these events again.
                self._rebase = True
                raise
        if first or self.driver.pending_resets:
            async with self.driver.between_batches():
                await self.driver.reset_pending()
        for hook in self.after_read:
            await hook()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.poll_interval())
            self.wake.clear()
            await self.poll_logged()

    async def poll_logged(self) -> bool:
        """One read; a failure is counted and logged (the interface may come back). True if it worked."""
        try:
            await self.poll_once()
        except (OSError, ConnectionError) as exc:
            self.metrics.poll_errors.inc()
            log.warning("reading %s failed: %s", self.interface, exc)
            return False
        return True
