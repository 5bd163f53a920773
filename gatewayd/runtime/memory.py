"""Garbage collection for a process that holds a large state for its whole life.

CPython's full (generation 2) collection walks every object it tracks, and nothing else runs meanwhile. With
10,000 peers the daemon tracks ~170,000 objects: one full collection took 80-100 ms on the 2-core test
machines, stalling any Disconnect under way. What is alive once the daemon is ready (modules, the gRPC and
protobuf machinery, the state restored from the store) stays alive: it is frozen (`gc.freeze`), so later
collections walk only objects created since. Collected first, so no garbage is frozen with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def freeze_long_lived() -> int:
    """Collect, then exempt every surviving object from future collections; returns how many were frozen."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d long-lived objects for the garbage collector (%.0f ms)", frozen,
             (time.perf_counter() - started) * 1000)
    return frozen


async def freeze_when_ready(*stages: asyncio.Event) -> None:
    """Freeze once each stage is reached (READY; then the first read of the interface, which adds a snapshot
    per peer)."""
    for stage in stages:
        await stage.wait()
        freeze_long_lived()


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No garbage collection while a bulk load builds objects that all stay alive: at 100,000 peers the
    collections it would trigger (each walking everything built so far) cost more than the load itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
