"""Foreground and background work: a poll's slices wait while an RPC or a driver job runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gatewayd.api.listeners import ListenerLimits, guarded
from gatewayd.scheduling import AUTO_POLL_MAX, AUTO_POLL_MIN, AUTO_POLL_SHARE, Foreground, auto_poll_interval


def test_auto_poll_interval_keeps_reads_to_a_share_of_the_time() -> None:
    assert auto_poll_interval(0.0) == AUTO_POLL_MIN == 1.0
    assert auto_poll_interval(0.004) == 1.0  # a small gateway is read every second
    assert auto_poll_interval(0.03) == pytest.approx(0.03 / AUTO_POLL_SHARE) == pytest.approx(3.0)
    assert auto_poll_interval(0.045) == pytest.approx(4.5)
    assert auto_poll_interval(2.0) == AUTO_POLL_MAX == 5.0  # however slow a read, at least every 5 s


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
