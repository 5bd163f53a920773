"""The challenge API's per-source call rate (gatewayd.core.callrate): a token bucket per address."""

from __future__ import annotations

import pytest

from gatewayd.core.callrate import CallRate


def test_a_burst_then_the_rate() -> None:
    rate = CallRate(rate=2.0, burst=5)
    assert [rate.take("10.0.0.2", 100.0) for _ in range(5)] == [None] * 5
    wait = rate.take("10.0.0.2", 100.0)
    assert wait == pytest.approx(0.5)  # one token comes back every 1/rate seconds
    assert rate.take("10.0.0.2", 100.2) == pytest.approx(0.3)  # a refused call takes nothing
    assert rate.take("10.0.0.2", 100.5) is None
    assert rate.take("10.0.0.2", 100.5) == pytest.approx(0.5)
    # idle long enough, the whole burst is back, and no more than that
    assert [rate.take("10.0.0.2", 1000.0) for _ in range(6)][-2:] == [None, pytest.approx(0.5)]


def test_sources_are_counted_apart() -> None:
    rate = CallRate(rate=1.0, burst=2)
    for _ in range(2):
        assert rate.take("10.0.0.2", 5.0) is None
    assert rate.take("10.0.0.2", 5.0) is not None
    assert rate.take("10.0.0.3", 5.0) is None
    assert rate.take("fd00::3", 5.0) is None


def test_a_clock_that_goes_back_refills_nothing() -> None:
    rate = CallRate(rate=1.0, burst=1)
    assert rate.take("a", 50.0) is None
    assert rate.take("a", 10.0) is not None  # earlier than the last call: no tokens from nowhere
    assert rate.take("a", 50.5) is not None
    assert rate.take("a", 51.0) is None


def test_the_table_of_sources_is_bounded() -> None:
    rate = CallRate(rate=1.0, burst=2, max_sources=100)
    for i in range(100):
        rate.take(f"busy{i}", 0.0)
        rate.take(f"busy{i}", 0.0)  # empty buckets: kept while they refill
    assert len(rate) == 100
    # a new source at a full table, one second later: nothing has refilled, so the table starts over
    assert rate.take("new", 1.0) is None
    assert len(rate) == 1
    for i in range(99):
        rate.take(f"idle{i}", 1.0)  # one call each: full again a second later
    rate.take("new", 1.0)
    assert rate.take("new", 1.0) is not None  # "new" is out of tokens
    assert rate.take("late", 2.0) is None  # the refilled (idle) ones are dropped, the busy one stays
    assert len(rate) == 2
    assert rate.take("new", 2.0) is None  # its one token back, not a fresh burst
    assert rate.take("new", 2.0) is not None
