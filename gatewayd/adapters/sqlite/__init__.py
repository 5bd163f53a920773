"""SQLite persistence: one database file, with the gateway's state and its event outbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from gatewayd.adapters.sqlite.database import Database
from gatewayd.adapters.sqlite.outbox import SqliteOutbox
from gatewayd.adapters.sqlite.secretbox import SecretBox
from gatewayd.adapters.sqlite.state import SqliteState
from gatewayd.core.model import Member, PeerRecord, TeamPolicy

__all__ = ["SecretBox", "SqliteStore"]


class SqliteStore(Database):
    """The database, its state tables (`state`) and its outbox (`outbox`): what the `Store` port asks for."""

    def __init__(self, path: Path, box: SecretBox) -> None:
        super().__init__(path)
        self.state = SqliteState(self, box)
        self.outbox = SqliteOutbox(self)

    async def open(self, *, init: bool = False) -> None:
        await super().open(init=init)
        await self.outbox.load_cursor()

    async def load(self) -> tuple[list[TeamPolicy], list[Member], Iterator[PeerRecord]]:
        return await self.state.load()
