"""Foreground and background work: a poll's slices wait while an RPC or a driver job runs."""

from __future__ import annotations

import asyncio
from typing import Any

from gatewayd.adapters.grpc.listeners import ListenerLimits, guarded
from gatewayd.scheduling import Foreground


async def test_quiet_waits_for_every_piece_of_foreground_work() -> None:
    fg = Foreground()
    await asyncio.wait_for(fg.quiet(), 1)  # nothing running: returns at once
    first, second = asyncio.Event(), asyncio.Event()

    async def work(done: asyncio.Event) -> None:
        with fg.running():
            await done.wait()

    tasks = [asyncio.ensure_future(work(first)), asyncio.ensure_future(work(second))]
    await asyncio.sleep(0)
    waiter = asyncio.ensure_future(fg.quiet())
    first.set()
    await asyncio.sleep(0.05)
    assert fg.busy and not waiter.done()  # one piece still runs
    second.set()
    await asyncio.wait_for(waiter, 1)
    assert not fg.busy
    await asyncio.gather(*tasks)


class _Context:
    def time_remaining(self) -> float | None:
        return None


async def test_a_unary_call_is_foreground_work_and_a_stream_is_not() -> None:
    fg = Foreground()
    seen: list[bool] = []

    async def unary(request: Any, context: Any) -> str:
        seen.append(fg.busy)
        return "ok"

    async def stream(request: Any, context: Any) -> Any:
        seen.append(fg.busy)
        yield "item"

    assert await guarded(unary, "Unary", ListenerLimits(), None, fg)(None, _Context()) == "ok"
    assert [i async for i in guarded(stream, "Stream", ListenerLimits(), None, fg)(None, _Context())] == ["item"]
    assert seen == [True, False] and not fg.busy
