"""A team Disconnect puts the team's prefixes into the quarantine sets in one transaction before the per-peer
bookkeeping; a failure of that early transaction leaves the enforcement to the batch; other teams are untouched."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gatewayd.core.model import PeerState
from gatewayd.ports import SetChange
from gatewayd.v1 import control_pb2
from tests.fakes import MemoryEnforcer
from tests.harness import Harness, gw, key, start, stop
from tests.pki import Authority

__all__ = ["gw"]


class OrderingEnforcer(MemoryEnforcer):
    """Notes, for each transaction, the core's view of the peers at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.view: Callable[[], dict[str, PeerState | None]] = dict
        self.seen: list[dict[str, PeerState | None]] = []

    async def apply(self, change: SetChange, *, first: Callable[[], None] | None = None) -> None:
        self.seen.append(self.view())
        await super().apply(change, first=first)


async def _team(gw: Harness, team: str, first: int, count: int) -> list[str]:
    prefixes = []
    for i in range(first, first + count):
        prefix = f"10.100.0.{i}/32"
        gw.source.add(key(i), prefix)
        await gw.enroll(f"m{i}", (key(i),), team=team)
        prefixes.append(prefix)
    return prefixes


async def _disconnect_team(gw: Harness, team: str) -> control_pb2.DisconnectResponse:
    response: control_pb2.DisconnectResponse = await gw.local().Disconnect(control_pb2.DisconnectRequest(
        team_id=team, reason="siem", idempotency_key=os.urandom(8).hex()))
    return response


async def test_team_prefixes_are_quarantined_first_in_one_transaction(tmp_path: Path) -> None:
    enforcer = OrderingEnforcer()
    gw = await start(tmp_path, Authority("ca"), enforcer=enforcer)
    try:
        enforcer.view = lambda: {k: p.state for k, p in gw.daemon.driver.core.peers.items()}
        red = await _team(gw, "red", 1, 5)
        blue = await _team(gw, "blue", 10, 2)
        await gw.poll()
        assert not enforcer.held  # no connection policy: everyone admitted
        before = len(enforcer.transactions)
        answer = await _disconnect_team(gw, "red")
        assert answer.peers_quarantined == 5
        first = enforcer.transactions[before]
        assert sorted(first.quarantine) == sorted(red)
        assert not first.release and not first.track and not first.untrack
        # ...applied before the core's bookkeeping: the core still had every red peer authorized then.
        assert {enforcer.seen[before][key(i)] for i in range(1, 6)} == {PeerState.AUTHORIZED}
        assert enforcer.held == set(red)
        assert not enforcer.held & set(blue)
        # The batch's own tightening found them held: no second transaction adds them again.
        assert all(not set(t.quarantine) & set(red) for t in enforcer.transactions[before + 1:])
    finally:
        await stop(gw)


async def test_a_failed_early_transaction_is_made_good_by_the_batch(gw: Harness) -> None:
    red = await _team(gw, "red", 1, 3)
    await gw.poll()
    gw.enforcer.fail_next = True
    answer = await _disconnect_team(gw, "red")
    assert answer.peers_quarantined == 3
    assert gw.enforcer.held == set(red)
    assert gw.daemon.driver.enforcement_healthy


async def test_a_replayed_team_disconnect_changes_nothing(gw: Harness) -> None:
    red = await _team(gw, "red", 1, 2)
    await gw.poll()
    request = control_pb2.DisconnectRequest(team_id="red", reason="siem", idempotency_key="k-1")
    await gw.local().Disconnect(request)
    proven = gw.enforcer.held
    assert proven == set(red)
    gw.enforcer.held = set()  # as if someone emptied the set: a replay answers from the record, touching nothing
    before = len(gw.enforcer.transactions)
    await gw.local().Disconnect(request)
    assert len(gw.enforcer.transactions) == before
