"""The event outbox: events written in the same transaction as the state change they report, read in
order by WatchEvents and the MQTT publisher, marked published after the broker's PUBACK."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence

from gatewayd.adapters.sqlite.database import Database
from gatewayd.ports import StoredEvent

log = logging.getLogger(__name__)


def _events(rows: Iterable[sqlite3.Row]) -> list[StoredEvent]:
    """Outbox rows selected as (cursor, id, type, time, subject, data_json)."""
    return [StoredEvent(cursor=r[0], id=r[1], type=r[2], time=r[3], subject=r[4], data_json=r[5]) for r in rows]


class SqliteOutbox:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.next_cursor = 1
        """The cursor the next appended event gets."""

    async def load_cursor(self) -> None:
        """Read where the outbox ends (once, after the database is open)."""
        row = await self.db.one("SELECT coalesce(max(cursor), 0) FROM outbox")
        self.next_cursor = int(row[0]) + 1 if row else 1

    async def append(self, events: Sequence[StoredEvent]) -> None:
        """Insert events numbered from next_cursor on, and move next_cursor past them."""
        await self.db.writer.executemany(
            "INSERT INTO outbox (cursor, id, type, time, subject, data_json) VALUES (?,?,?,?,?,?)",
            [(e.cursor, e.id, e.type, e.time, e.subject, e.data_json) for e in events])
        self.next_cursor += len(events)

    async def prune(self, keep: int, *, keep_unpublished: bool, max_unpublished: int) -> None:
        """Keep the latest `keep` events; with a broker, also every event not yet acknowledged by it, up to
        `max_unpublished` (beyond that the oldest are dropped, loudly: a broker that is gone for good must not
        fill the disk)."""
        limit = self.next_cursor - 1 - keep
        if not keep_unpublished:
            await self.db.writer.execute("DELETE FROM outbox WHERE cursor <= ?", (limit,))
            return
        await self.db.writer.execute("DELETE FROM outbox WHERE cursor <= ? AND published = 1", (limit,))
        cur = await self.db.writer.execute(
            "DELETE FROM outbox WHERE published = 0 AND cursor <= ?", (self.next_cursor - 1 - max_unpublished,))
        if cur.rowcount:
            log.error("outbox over %d unpublished events: dropped the %d oldest",
                                              max_unpublished, cur.rowcount)

    async def mark_published(self, cursors: Sequence[int]) -> None:
        await self.db.writer.executemany("UPDATE outbox SET published = 1 WHERE cursor = ?", [(c,) for c in cursors])

    async def unpublished(self, limit: int) -> list[StoredEvent]:
        async with self.db.reader.execute(
            "SELECT cursor, id, type, time, subject, data_json FROM outbox WHERE published = 0 "
            "ORDER BY cursor LIMIT ?", (limit,)) as cur:
            return _events(await cur.fetchall())

    async def stats(self) -> tuple[int, float | None]:
        """(unpublished events, time of the oldest unpublished one)."""
        async with self.db.reader.execute("SELECT count(*), min(time) FROM outbox WHERE published = 0") as cur:
            row = await cur.fetchone()
        return (int(row[0]), row[1]) if row else (0, None)

    async def events_after(self, cursor: int, limit: int = 1000) -> list[StoredEvent]:
        async with self.db.reader.execute(
            "SELECT cursor, id, type, time, subject, data_json FROM outbox WHERE cursor > ? "
            "ORDER BY cursor LIMIT ?", (cursor, limit)) as cur:
            return _events(await cur.fetchall())

    async def first_cursor(self) -> int | None:
        async with self.db.reader.execute("SELECT min(cursor) FROM outbox") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else None
