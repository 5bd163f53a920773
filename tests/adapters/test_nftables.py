"""The nftables adapter against the kernel, in a namespace of the test's own."""

from __future__ import annotations

import json
import threading

import pytest

from gatewayd.adapters.nftables import NftEnforcer
from gatewayd.ports import SetChange
from tests.netns import inside, namespace, nft

pytestmark = pytest.mark.kernel


def elements(ns: str, name: str) -> set[str]:
    """Addresses in a host set and prefixes in its interval companion."""
    out = set()
    for each in (name, name + "_nets"):
        listing = json.loads(nft(ns, "-j", "list", "set", "inet", "gatewayd", each))
        for item in listing["nftables"]:
            for e in item.get("set", {}).get("elem", []):
                out.add(e if isinstance(e, str) else f"{e['prefix']['addr']}/{e['prefix']['len']}")
    return out


async def test_reconcile_creates_then_changes_nothing_and_leaves_other_tables_alone() -> None:
    with namespace() as ns:
        nft(ns, "add", "table", "inet", "somebody_else")
        nft(ns, "add", "chain", "inet", "somebody_else", "c", "{ type filter hook forward priority 0; }")
        nft(ns, "add", "rule", "inet", "somebody_else", "c", "ct", "state", "established", "counter")
        with inside(ns):
            enforcer = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
            assert await enforcer.reconcile({"10.0.0.2/32", "fd00::2/128", "10.1.0.0/24"}, {"10.0.0.2/32"})
            before = nft(ns, "list", "ruleset")
            assert not await enforcer.reconcile({"10.0.0.2/32", "fd00::2/128", "10.1.0.0/24"}, {"10.0.0.2/32"})
            assert nft(ns, "list", "ruleset") == before
        assert elements(ns, "quarantine4") == {"10.0.0.2", "10.1.0.0/24"}
        assert elements(ns, "quarantine6") == {"fd00::2"}
        assert elements(ns, "tracked4") == {"10.0.0.2"}
        assert "ct state established counter" in nft(ns, "list", "table", "inet", "somebody_else")
        assert "reject with icmp admin-prohibited" in before


async def test_reconcile_repairs_a_tampered_table_in_one_step() -> None:
    with namespace() as ns:
        with inside(ns):
            enforcer = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
            await enforcer.reconcile({"10.0.0.2/32"}, set())
        nft(ns, "flush", "chain", "inet", "gatewayd", "forward_quarantine")
        nft(ns, "add", "element", "inet", "gatewayd", "quarantine4", "{ 10.0.0.9 }")
        with inside(ns):
            fresh = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
            assert await fresh.reconcile({"10.0.0.2/32"}, set())
            assert not await fresh.reconcile({"10.0.0.2/32"}, set())
        assert elements(ns, "quarantine4") == {"10.0.0.2"}
        assert "ip saddr @quarantine4 reject" in nft(ns, "list", "chain", "inet", "gatewayd", "forward_quarantine")


async def test_apply_is_one_transaction_and_idempotent() -> None:
    with namespace() as ns:
        with inside(ns):
            enforcer = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
            await enforcer.reconcile(set(), set())
            many = [f"10.{i // 250}.{i % 250}.1/32" for i in range(5000)]
            await enforcer.apply(SetChange(quarantine=many, track=many[:10]))
            assert len(enforcer.quarantined()) == 5000
            await enforcer.apply(SetChange(release=[*many[:4000], "10.200.0.1/32"], untrack=many[:5]))
            # A host inside another peer's prefix is fine (separate sets) ...
            await enforcer.apply(SetChange(quarantine=["10.240.0.0/16", "10.240.0.7/32"]))
            await enforcer.apply(SetChange(release=["10.240.0.0/16", "10.240.0.7/32"]))
            # ... overlapping prefixes are refused, and the failing transaction changes nothing.
            with pytest.raises(RuntimeError):
                await enforcer.apply(SetChange(quarantine=["10.250.0.1/32", "10.250.0.0/24", "10.250.0.0/16"]))
        assert len(elements(ns, "quarantine4")) == 1000
        assert "10.250.0.1" not in elements(ns, "quarantine4")
        assert elements(ns, "tracked4") == {p.removesuffix("/32") for p in many[5:10]}


async def test_a_release_after_a_commit_is_one_hop_and_nothing_is_released_if_the_commit_fails() -> None:
    """`first` (the store's COMMIT) runs on the writer thread just before the release; if it raises, the kernel and
    the enforcer's view keep the quarantine; a tightening never takes one (it comes before the commit)."""
    with namespace() as ns:
        with inside(ns):
            enforcer = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
            await enforcer.reconcile({"10.0.0.2/32", "10.0.0.3/32"}, set())
            seen: list[tuple[str, set[str]]] = []

            def commit() -> None:
                seen.append((threading.current_thread().name, elements(ns, "quarantine4")))

            def refused() -> None:
                raise OSError("database or disk is full")

            with pytest.raises(OSError, match="full"):
                await enforcer.apply(SetChange(release=["10.0.0.2/32"]), first=refused)
            assert enforcer.quarantined() == {"10.0.0.2/32", "10.0.0.3/32"}
            await enforcer.apply(SetChange(release=["10.0.0.2/32"]), first=commit)
            with pytest.raises(ValueError, match="before the commit"):
                await enforcer.apply(SetChange(quarantine=["10.0.0.4/32"]), first=commit)
            # A release of what is no longer held still commits.
            await enforcer.apply(SetChange(release=["10.0.0.2/32"]), first=commit)
        assert [name.startswith("nft-writer") for name, _ in seen] == [True, True]
        assert seen[0][1] == {"10.0.0.2", "10.0.0.3"}  # committed while the quarantine still held
        assert elements(ns, "quarantine4") == {"10.0.0.3"} and enforcer.quarantined() == {"10.0.0.3/32"}


async def test_a_prefetched_reading_serves_the_next_reconcile_once() -> None:
    """At start-up the table is read while the store loads (prefetch); the reconcile then works from that reading
    and repairs what it showed. What changes after the reading is the monitor's and the guard's to repair: the
    reconcile after that reads the kernel again."""
    with namespace() as ns:
        with inside(ns):
            enforcer = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
            await enforcer.reconcile({"10.0.0.2/32", "10.0.0.3/32"}, {"10.0.0.2/32"})
        nft(ns, "delete", "element", "inet", "gatewayd", "quarantine4", "{ 10.0.0.3 }")
        with inside(ns):
            fresh = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
            fresh.prefetch()
            # (the reading is under way or done; a change made now is not in it)
            changes = await fresh.reconcile({"10.0.0.2/32", "10.0.0.3/32"}, {"10.0.0.2/32"})
            assert changes and "missing from the quarantine sets (10.0.0.3/32)" in changes[0]
        assert elements(ns, "quarantine4") == {"10.0.0.2", "10.0.0.3"}
        nft(ns, "delete", "element", "inet", "gatewayd", "quarantine4", "{ 10.0.0.2 }")
        with inside(ns):
            # No prefetch pending: the kernel is read afresh.
            assert await fresh.reconcile({"10.0.0.2/32", "10.0.0.3/32"}, {"10.0.0.2/32"})
        assert elements(ns, "quarantine4") == {"10.0.0.2", "10.0.0.3"}
