"""Freezing the long-lived objects (gatewayd.runtime.memory), in a separate interpreter: a freeze is
process-wide and would otherwise hold on to the test run's objects."""

from __future__ import annotations

import json
import subprocess
import sys

PROGRAM = """
import asyncio, gc, json, weakref
from gatewayd.runtime.memory import freeze_when_ready

gc.disable()  # only the freeze's own collection may free the cycle below


class Node:
    pass


cycle = Node()
cycle.me = cycle
cycle_ref = weakref.ref(cycle)
del cycle
state = [Node() for _ in range(1000)]


async def main():
    ready = asyncio.Event()
    task = asyncio.ensure_future(freeze_when_ready(ready))
    await asyncio.sleep(0.05)
    before = gc.get_freeze_count(), gc.get_threshold()
    ready.set()
    await task
    return before


(before, threshold_before) = asyncio.run(main())
walked = {id(o) for o in gc.get_objects()}
print(json.dumps({
    "frozen_before_ready": before,
    "threshold": [threshold_before, gc.get_threshold()],
    "frozen": gc.get_freeze_count(),
    "garbage_collected": cycle_ref() is None,
    "state_walked_by_collections": sum(id(n) in walked for n in state),
}))
"""


def test_the_state_alive_when_ready_is_frozen_and_garbage_is_collected_first() -> None:
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["frozen_before_ready"] == 0
    assert result["frozen"] >= 1000
    assert result["garbage_collected"]
    assert result["state_walked_by_collections"] == 0
    # Young collections every 10,000 allocations from READY on (700 before): full ones ~14x less often.
    assert result["threshold"] == [[700, 10, 10], [10_000, 10, 10]]


RELEASE = """
import asyncio, json, threading
from gatewayd.runtime.memory import release_free_memory


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


# What bulk work leaves behind: 200 MB of C-allocator chunks (2 KB objects are not Python's small-object
# allocator's) made in a worker thread, as libnftables and SQLite allocate, every 16th kept so the freed ones
# cannot simply fall off the top of the heap.
kept = []


def bulk():
    made = [bytes(2048) for _ in range(100_000)]
    kept.extend(made[::16])


worker = threading.Thread(target=bulk)
worker.start()
worker.join()
before = rss_mb()
released = asyncio.run(release_free_memory())
print(json.dumps({"released": released, "before": before, "after": rss_mb(), "kept": len(kept)}))
"""


def test_memory_freed_by_bulk_work_goes_back_to_the_kernel() -> None:
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["released"] is True  # glibc, as on every Debian gateway
    assert result["before"] - result["after"] > 100, result  # of the ~190 MB freed
