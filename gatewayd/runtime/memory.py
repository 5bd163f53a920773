"""Garbage collection for a process that holds a large state for its whole life.

CPython's full (generation 2) collection walks every object it tracks, and nothing else runs meanwhile. With
10,000 peers the daemon tracks ~170,000 objects: one full collection took 80-100 ms on the 2-core test
machines, stalling any Disconnect under way. What is alive once the daemon is ready (modules, the gRPC and
protobuf machinery, the state restored from the store) stays alive: it is frozen (`gc.freeze`), so later
collections walk only objects created since. Collected first, so no garbage is frozen with it.

What the daemon builds after that and keeps (members enrolled since, peers' new states) is walked by every full
collection, and under load those came every ~2 s and took 5-25 ms each (10,000 members enrolled after start,
2,000 proofs a second): a pause of every call in flight, which made the proofs' p99. Full collections are
triggered by the young generation's, which by default run every 700 net allocations of tracked objects; from
READY on they run every YOUNG_THRESHOLD (10,000), so full ones come ~14 times less often. A young collection then
walks up to 10,000 objects (~1 ms). Requests make little cyclic garbage (objects are freed by reference counting),
so memory does not grow waiting for collections.

Memory freed after bulk work (start-up, the first read of 100,000 peers, a team Disconnect) stays with the C
allocator: glibc keeps freed chunks in its arenas, libnftables and SQLite allocate from worker threads' arenas.
After such work the free pages are handed back to the kernel (`malloc_trim`, in a worker thread: ~5 ms at
100,000 peers, during which other threads' allocations from the arena being trimmed wait). At 100,000 peers
that is ~40 MB of RSS after a restart. Without glibc (e.g. musl) nothing is trimmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


YOUNG_THRESHOLD = 10_000
"""Net allocations of tracked objects between young collections, from READY on (CPython's default: 700)."""


def freeze_long_lived() -> int:
    """Collect, then exempt every surviving object from future collections; returns how many were frozen. From
    then on, young collections every YOUNG_THRESHOLD allocations."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    frozen = gc.get_freeze_count()
    log.info("froze %d long-lived objects for the garbage collector (%.0f ms)", frozen,
             (time.perf_counter() - started) * 1000)
    return frozen


async def freeze_when_ready(*stages: asyncio.Event) -> None:
    """Freeze once each stage is reached (READY; then the first read of the interface, which adds a snapshot
    per peer), and give back what building it freed."""
    for stage in stages:
        await stage.wait()
        freeze_long_lived()
        await release_free_memory()


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _find_malloc_trim()
_trimming: asyncio.Future[int] | None = None


async def release_free_memory(after: float = 0.0) -> bool:
    """Return the C allocator's free pages to the kernel, `after` seconds from now (bulk work's garbage is
    often freed a little after the work: its answer sent, the next read done); False where that is not
    possible. Calls that arrive while one is pending or running share it rather than start another."""
    global _trimming
    if _malloc_trim is None:
        return False
    if _trimming is None or _trimming.done() or _trimming.get_loop() is not asyncio.get_running_loop():
        _trimming = asyncio.ensure_future(_trim_after(_malloc_trim, after))
    await asyncio.shield(_trimming)
    return True


async def _trim_after(trim: Callable[[int], int], delay: float) -> int:
    await asyncio.sleep(delay)
    return await asyncio.to_thread(trim, 0)


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
