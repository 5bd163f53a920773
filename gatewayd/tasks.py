"""Named, tracked tasks: a task that dies unexpectedly is logged, never lost silently."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)
_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any], *, name: str, awaited: bool = False) -> asyncio.Task[Any]:
    """A named task; its failure is logged with the traceback, unless `awaited` (the caller reads its result)."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _running.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        _running.discard(t)
        if not awaited and not t.cancelled() and t.exception() is not None:
            log.error("task %s failed", t.get_name(), exc_info=t.exception())

    task.add_done_callback(done)
    return task
