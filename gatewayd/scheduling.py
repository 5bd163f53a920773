"""Foreground and background work on the one event loop.

Foreground work is what someone is waiting for: a unary RPC being served, a job submitted to the driver.
Background work (a poll of the WireGuard interface: reading, decoding, diffing thousands of peers) runs in
slices and awaits a `Pause` between them; `Foreground.quiet` is that pause: it returns only while no
foreground work is running. A Disconnect is thus never stretched by a poll's slices, and a poll never asks
wireguard-go for its peers (which holds the device's configuration lock) while a Disconnect is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

Pause = Callable[[], Awaitable[None]]
"""Awaited by background work between its slices."""

SLICE_SECONDS = 0.0002
"""How long background work runs between two pauses. An RPC takes a dozen turns of the event loop between
its arrival and its handler and again after it; a slice may run in each of them."""


AUTO_POLL_SHARE = 0.01
"""poll_interval = "auto": polls keep the interface busy at most this share of the time..."""
AUTO_POLL_MIN = 1.0
"""...polling as often as every second (small gateways, and the kernel's chunked dumps)..."""
AUTO_POLL_MAX = 5.0
"""...and at least every 5 s, whatever a read costs."""


def auto_poll_interval(read_seconds: float) -> float:
    """Seconds between polls for a read that keeps the interface busy `read_seconds`.

    wireguard-go holds its configuration lock while it answers a read (~30-60 ms at 10,000 peers on the test
    machines), and a Disconnect's key reset needs that lock: with reads at most 1% of the time, at most ~1%
    of calls arriving at random can meet one. The price: a restarted client is noticed later (README)."""
    return min(max(read_seconds / AUTO_POLL_SHARE, AUTO_POLL_MIN), AUTO_POLL_MAX)


async def no_pause() -> None:
    await asyncio.sleep(0)


class Foreground:
    def __init__(self) -> None:
        self._running = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Marks foreground work for the duration of the block."""
        self._running += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._quiet.set()

    @property
    def busy(self) -> bool:
        return self._running > 0

    async def quiet(self) -> None:
        """Return once no foreground work is running (after one turn of the loop if none is)."""
        await asyncio.sleep(0)
        while self._running:
            await self._quiet.wait()


class Slices:
    """Time-boxed slices of a loop: `due()` is cheap enough to ask every few items."""

    def __init__(self, pause: Pause, seconds: float = SLICE_SECONDS) -> None:
        self._pause, self._seconds = pause, seconds
        self._end = time.perf_counter() + seconds

    def due(self) -> bool:
        return time.perf_counter() >= self._end

    async def pause(self) -> None:
        await self._pause()
        self._end = time.perf_counter() + self._seconds
