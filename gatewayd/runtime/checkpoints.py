"""SQLite checkpoints off the commit path.

SQLite's automatic checkpoint runs inside the COMMIT that crosses 1,000 WAL pages (every ~120th Disconnect
here), copying pages and syncing the database file for ~12 ms. The store turns it off; this task checkpoints
every second instead, started between RPCs but never kept from running for long (the WAL grows until a
checkpoint catches up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gatewayd.ports import Store
from gatewayd.runtime.driver import Driver

log = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 1.0
"""Seconds between two background SQLite checkpoints."""
CHECKPOINT_PATIENCE = 5.0
"""How long a checkpoint waits for a moment without foreground work before it runs anyway."""


class Checkpointer:
    def __init__(self, store: Store, driver: Driver) -> None:
        self.store, self.driver = store, driver
        self.wal_frames = 0
        """Frames in SQLite's WAL when the latest checkpoint started."""
        self.failures = 0
        """Checkpoints that failed (the disk); retried."""

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.driver.foreground.quiet(), CHECKPOINT_PATIENCE)
            try:
                await self.once()
            except Exception as exc:
                # A full or failing disk: the WAL keeps the data; try again next time, never stop the daemon.
                failure = self.store.storage_error(exc)
                if failure is None:
                    raise
                self.failures += 1
                log.warning("checkpoint failed, retrying in %.0f s: %s", CHECKPOINT_INTERVAL, failure)

    async def once(self) -> None:
        # The bulk (copying pages, syncing the database file) runs beside the batches that keep committing.
        frames, _ = await self.store.checkpoint()
        self.wal_frames = frames
        if frames:
            # The few frames committed meanwhile, with no transaction open: the next batch then starts the
            # WAL over. Without this a busy gateway's WAL only grows (a transaction is nearly always open
            # when the concurrent checkpoint ends, and SQLite restarts the WAL only after a complete one).
            async with self.driver.between_batches():
                await self.store.checkpoint()
