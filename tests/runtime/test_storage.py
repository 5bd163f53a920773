"""The daemon's SQLite housekeeping, on a real database."""

from __future__ import annotations

import asyncio

from gatewayd.runtime.control import Note
from tests.harness import Harness, gw

__all__ = ["gw"]


async def test_the_wal_starts_over_while_batches_keep_committing(gw: Harness) -> None:
    """Checkpoints run beside the driver's commits (no commit waits for one), and the WAL still starts over
    after each: SQLite restarts it only from a transaction that began once every frame was copied, which a
    busy driver never gives a concurrent checkpoint by chance."""
    wal = gw.tmp / "state.db-wal"

    def restarts() -> int:
        return int.from_bytes(wal.read_bytes()[12:16], "big")  # the WAL header's checkpoint sequence number

    stop = asyncio.Event()
    committed = 0

    async def writer(n: int) -> None:
        nonlocal committed
        while not stop.is_set():
            await gw.daemon.driver.submit(Note(type="test.filler", subject=f"gateway/{n}", data={"n": committed}))
            committed += 1

    writers = [asyncio.ensure_future(writer(n)) for n in range(4)]
    await asyncio.sleep(0.05)
    before, first = restarts(), committed
    try:
        for _ in range(5):
            await gw.daemon.checkpointer.once()
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert committed - first > 50  # the driver kept committing throughout
    assert restarts() >= before + 5
    assert 0 < gw.daemon.checkpointer.wal_frames < committed * 20
