"""nftables notifications against the kernel: a change of gatewayd's table by another process is reported
when its transaction commits; gatewayd's own transactions and other tables' changes are not."""

from __future__ import annotations

import asyncio

import pytest

from gatewayd.adapters.nftables import NftEnforcer
from gatewayd.adapters.nftmonitor import NftMonitor
from gatewayd.ports import RULES, SetChange
from tests.netns import inside, namespace, nft

pytestmark = pytest.mark.kernel


async def settle(seen: list[str], count: int) -> None:
    for _ in range(100):
        if len(seen) >= count:
            return
        await asyncio.sleep(0.01)


async def test_changes_by_others_are_reported_and_our_own_are_not() -> None:
    with namespace() as ns:
        seen: list[str] = []
        deleted: list[dict[str, set[str]] | None] = []

        def report(who: str, gone: dict[str, set[str]] | None) -> None:
            seen.append(who)
            deleted.append(gone)

        with inside(ns):
            enforcer = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
            monitor = NftMonitor("gatewayd", report, own_threads=enforcer.writer_threads)
            await monitor.start()
            assert await enforcer.reconcile({"10.0.0.2/32"}, {"10.0.0.2/32"})
            await enforcer.apply(SetChange(quarantine=["10.0.0.3/32", "10.0.0.4/32"], track=["10.0.0.3/32"]))
            # A release is written from the enforcer's writer thread (in this namespace), also ours.
            await enforcer.apply(SetChange(release=["10.0.0.4/32"]))
        try:
            await asyncio.sleep(0.1)
            assert seen == []  # our own transactions
            listed = nft(ns, "list", "set", "inet", "gatewayd", "quarantine4")
            assert "10.0.0.3" in listed and "10.0.0.4" not in listed
            nft(ns, "add", "table", "inet", "somebody_else")
            await asyncio.sleep(0.1)
            assert seen == []  # another table
            for cmd in (["delete", "element", "inet", "gatewayd", "quarantine4", "{ 10.0.0.2 }"],
                        ["flush", "chain", "inet", "gatewayd", "forward_quarantine"],
                        ["flush", "ruleset"]):
                before = len(seen)
                nft(ns, *cmd)
                await settle(seen, before + 1)
                assert len(seen) == before + 1 and "nft" in seen[-1], (cmd, seen)
            # A deleted element is named (the daemon puts back just that); a flushed chain or ruleset is not.
            assert deleted == [{"quarantine4": {"10.0.0.2/32"}}, {RULES: set()}, None]
            assert "deleted set elements" in seen[0] and "deleted rules" in seen[1]
        finally:
            with inside(ns):
                await monitor.close()


async def test_our_own_transaction_of_100000_elements_is_not_taken_for_drift() -> None:
    """A team Disconnect or a start-up at 100,000 peers writes that many elements in one transaction, announced
    while the event loop is still inside it: the monitor's buffer must hold them all, or the loss is verified as
    possible drift (the whole table put back, a false "drift repaired" report)."""
    with namespace() as ns:
        seen: list[str] = []
        with inside(ns):
            monitor = NftMonitor("gatewayd", lambda who, gone: seen.append(who))
            await monitor.start()
            enforcer = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
            await enforcer.reconcile(set(), set())
            hosts = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(1, 100_001)]
            await enforcer.apply(SetChange(quarantine=hosts, track=hosts))
        try:
            await asyncio.sleep(0.5)
            assert seen == []
            nft(ns, "delete", "element", "inet", "gatewayd", "quarantine4", "{ 10.0.0.7 }")
            await settle(seen, 1)
            assert len(seen) == 1 and "deleted set elements" in seen[0]  # still listening afterwards
        finally:
            with inside(ns):
                await monitor.close()
