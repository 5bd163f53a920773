"""The enforcement guard: the kernel holds what the core says, whoever else touches the firewall.

Another process can change gatewayd's nftables table at any moment (`nft delete table`, a reload of
nftables.service whose file starts with `flush ruleset`, firewalld, a deleted element). The monitor reports
such a change as soon as its transaction commits; the guard then compares the kernel with the core and repairs
the difference in one transaction, between two driver batches. It also verifies on a slow timer, in case
notifications were lost. Until a suspected drift is verified, enforcement is reported unhealthy; every repair
is logged and published as `enforcement.drift_repaired` naming what differed; a repair that fails is an error,
published as `enforcement.drift_unrepaired`, and retried every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from gatewayd.ports import RULES, SetChange
from gatewayd.runtime.control import Note
from gatewayd.runtime.driver import Driver

log = logging.getLogger(__name__)

RETRY = 1.0
"""Seconds between attempts to repair a drift that could not be repaired."""


class EnforcementGuard:
    def __init__(self, driver: Driver, *, table: str, interval: Callable[[], float],
                 clock: Callable[[], float] = time.time) -> None:
        self.driver, self.table, self.interval, self.clock = driver, table, interval, clock
        self.suspect = False
        """A change by someone else was reported and not yet verified."""
        self.verified_at: float | None = None
        """When the kernel was last found to hold exactly what the core says."""
        self.repairs = 0
        """Drifts found and repaired."""
        self.reasserted_at = 0.0
        """perf_counter() when the latest reported drift was put back (the window closed)."""
        self._wake = asyncio.Event()
        self._reasons: list[str] = []
        self._deleted: dict[str, set[str]] | None = {}

    @property
    def healthy(self) -> bool:
        return self.driver.enforcement_healthy and not self.suspect

    def drift(self, who: str, deleted: dict[str, set[str]] | None = None) -> None:
        """The monitor's callback: someone else changed the table (or notifications were lost). `deleted`: the
        elements the change deleted, by set name, when that is all it did (they alone are put back)."""
        self.suspect = True
        self._reasons.append(who)
        if deleted is None or self._deleted is None:
            self._deleted = None
        else:
            for name, prefixes in deleted.items():
                self._deleted.setdefault(name, set()).update(prefixes)
        self._wake.set()

    async def run(self) -> None:
        while True:
            wait = RETRY if self.suspect else self.interval()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            await self.verify()

    async def verify(self) -> list[str]:
        """Compare the kernel with the core and repair the difference; returns what differed."""
        reasons, self._reasons = self._reasons, []
        deleted, self._deleted = self._deleted, {}
        core = self.driver.core
        enforcer = self.driver.enforcer
        try:
            if reasons:
                # Reported by the monitor: put back what was removed first, without reading the kernel (the
                # window closes in one small transaction), then compare in a second step (removes what someone
                # added, and finds anything the notifications did not say).
                async with self.driver.between_batches():
                    await self._put_back(deleted)
                self.reasserted_at = time.perf_counter()
            # The comparison runs beside the batches; only a difference is repaired between two of them (read
            # again there: a batch may have changed the sets meanwhile).
            changes = await enforcer.verify(core.enforced_prefixes(), core.tracked_prefixes())
            if changes:
                async with self.driver.between_batches():
                    changes = await enforcer.reconcile(self.driver.core.enforced_prefixes(),
                                                       self.driver.core.tracked_prefixes())
            if reasons and not changes:
                changes = ["restored what the other process removed"]
        except Exception as exc:
            self.suspect = True
            self._reasons = reasons + self._reasons
            log.error("enforcement drift could not be repaired; retrying in %.0f s: %s", RETRY, exc)
            await self._publish("enforcement.drift_unrepaired", {"error": str(exc), "changed_by": reasons})
            return []
        self.suspect = False
        self.driver.enforcement_healthy = True
        self.verified_at = self.clock()
        if changes:
            self.repairs += 1
            by = reasons or ["found by the periodic verification"]
            log.warning("enforcement drift repaired (changed by %s): %s", ", ".join(by), "; ".join(changes))
            await self._publish("enforcement.drift_repaired", {"changes": changes, "changed_by": by})
        return changes

    async def _put_back(self, deleted: dict[str, set[str]] | None) -> None:
        core, enforcer = self.driver.core, self.driver.enforcer
        if deleted is not None and deleted.keys() == {RULES}:
            with contextlib.suppress(Exception):
                await enforcer.reassert(core.enforced_prefixes(), core.tracked_prefixes(), elements=False)
            return
        if deleted is not None:
            # Only elements were deleted, and the notification named them: add back those that belong.
            gone: set[str] = set().union(*deleted.values()) if deleted else set()
            quarantine = sorted(gone & core.enforced_prefixes()) if any(n.startswith("quarantine") for n in deleted) \
                else []
            track = sorted(gone & core.tracked_prefixes()) if any(n.startswith("tracked") for n in deleted) else []
            with contextlib.suppress(Exception):  # the comparison that follows repairs it anyway
                await enforcer.apply(SetChange(quarantine=quarantine, track=track))
            return
        with contextlib.suppress(Exception):  # a redefined object: the comparison that follows rebuilds the table
            await enforcer.reassert(core.enforced_prefixes(), core.tracked_prefixes())

    async def _publish(self, type_: str, data: dict[str, object]) -> None:
        with contextlib.suppress(Exception):  # the event is a report; the repair itself must not depend on it
            await self.driver.submit(Note(type=type_, subject=f"table/{self.table}", data=data))
