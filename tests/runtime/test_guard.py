"""The enforcement guard with the in-memory kernel: a reported drift is verified and repaired at once, health
is false until then, the repair is an event; the periodic verification finds what no notification reported."""

from __future__ import annotations

import asyncio
import json

from gatewayd.v1 import control_pb2
from tests.harness import Harness, gw, key

__all__ = ["gw"]


async def quarantined_peer(gw: Harness) -> None:
    gw.source.add(key(1), "10.9.0.1/32", handshake=gw.clock() - 1)
    await gw.enroll("alice", (key(1),))
    await gw.poll()
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="g"))
    assert gw.enforcer.held == {"10.9.0.1/32"}


async def test_a_reported_drift_is_repaired_and_published(gw: Harness) -> None:
    await quarantined_peer(gw)
    guard = gw.daemon.guard
    gw.enforcer.held.clear()  # someone flushed the quarantine set
    guard.drift("nft (pid 4242)")
    assert not guard.healthy  # from the report until the verification (the gauge and GetStatus read this)
    for _ in range(100):
        if guard.healthy:
            break
        await asyncio.sleep(0.01)
    assert guard.healthy and gw.enforcer.held == {"10.9.0.1/32"} and guard.repairs == 1
    rows = await gw.daemon.store.outbox.events_after(0, 10_000)
    (event,) = [e for e in rows if e.type == "enforcement.drift_repaired"]
    data = json.loads(event.data_json)
    assert data["changed_by"] == ["nft (pid 4242)"] and data["changes"]
    status = await gw.local().GetStatus(control_pb2.GetStatusRequest())
    assert status.enforcement_healthy and status.enforcement_verified_at.ToSeconds() >= int(gw.clock()) - 1


async def test_the_periodic_verification_finds_an_unreported_drift(gw: Harness) -> None:
    await quarantined_peer(gw)
    gw.enforcer.held.clear()
    changes = await gw.daemon.guard.verify()
    assert changes and gw.enforcer.held == {"10.9.0.1/32"}
    assert await gw.daemon.guard.verify() == []  # nothing left to repair


async def test_a_repair_that_fails_keeps_health_false_and_retries(gw: Harness) -> None:
    await quarantined_peer(gw)
    guard = gw.daemon.guard

    async def refuse(quarantined: object, tracked: object, **_: object) -> list[str]:
        raise RuntimeError("netlink: Operation not permitted")

    original, reassert = gw.enforcer.reconcile, gw.enforcer.reassert
    gw.enforcer.reconcile = gw.enforcer.reassert = refuse  # type: ignore[method-assign,assignment]
    gw.enforcer.held.clear()
    guard.drift("nft (pid 1)")
    await asyncio.sleep(0.2)
    assert not guard.healthy
    rows = await gw.daemon.store.outbox.events_after(0, 10_000)
    assert any(e.type == "enforcement.drift_unrepaired" for e in rows)
    gw.enforcer.reconcile, gw.enforcer.reassert = original, reassert  # type: ignore[method-assign]
    for _ in range(300):
        if guard.healthy:
            break
        await asyncio.sleep(0.01)
    assert guard.healthy
