"""Attempt limits per member, across peers, reconnects and restarts. Time alone never clears a counter."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class AttemptPolicy:
    max_failures: int = 10
    """Consecutive failures that lock the member's factors."""
    free_failures: int = 3
    """Failures before delays start."""
    base_delay: float = 1.0
    """Delay after the first delayed failure, doubled after each further one."""
    max_delay: float = 60.0
    """Upper bound of a delay."""


@dataclass(frozen=True, kw_only=True)
class AttemptState:
    failures: int = 0
    """Consecutive failures."""
    last_failure_at: float | None = None
    """When the latest failure happened."""
    locked: bool = False
    """Locked until the control plane unlocks or re-enrolls."""


class Gate(enum.Enum):
    OPEN = "open"
    LOCKED = "locked"
    TOO_EARLY = "too_early"


def retry_not_before(policy: AttemptPolicy, state: AttemptState) -> float | None:
    """Earliest time of the next attempt, or None if it may come now."""
    if state.last_failure_at is None or state.failures < policy.free_failures:
        return None
    exponent = state.failures - policy.free_failures
    delay = min(policy.base_delay * (2.0**exponent), policy.max_delay)
    return state.last_failure_at + delay


def gate(policy: AttemptPolicy, state: AttemptState, now: float) -> Gate:
    if state.locked or state.failures >= policy.max_failures:
        return Gate.LOCKED
    earliest = retry_not_before(policy, state)
    if earliest is not None and now < earliest:
        return Gate.TOO_EARLY
    return Gate.OPEN


def after_failure(policy: AttemptPolicy, state: AttemptState, now: float) -> AttemptState:
    failures = state.failures + 1
    return AttemptState(failures=failures, last_failure_at=now, locked=failures >= policy.max_failures)


def attempts_left(policy: AttemptPolicy, state: AttemptState) -> int:
    return 0 if state.locked else max(policy.max_failures - state.failures, 0)


RESET = AttemptState()
