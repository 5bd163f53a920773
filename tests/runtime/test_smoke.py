from __future__ import annotations

import pytest

from gatewayd.core.model import PeerState
from gatewayd.v1 import challenge_pb2, control_pb2, types_pb2
from tests.fakes import CallJob
from tests.harness import Harness, gw, key

__all__ = ["gw"]


async def test_disconnect_then_totp_releases(gw: Harness) -> None:
    gw.source.add(key(1), "127.0.0.1/32", handshake=gw.clock() - 5)
    await gw.enroll("alice", (key(1),))
    await gw.policy(1)
    await gw.poll()
    assert gw.daemon.core.peers[key(1)].state is PeerState.AUTHORIZED
    res = await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", reason="siem",
                                                                    idempotency_key="k1"))
    assert res.peers_quarantined == 1 and res.sessions_cut == 1
    assert "127.0.0.1/32" in gw.enforcer.held
    assert gw.source.resets == [key(1)]
    ch = gw.challenge()
    c = await ch.GetChallenge(challenge_pb2.GetChallengeRequest())
    assert c.state == types_pb2.PEER_STATE_QUARANTINED
    r = await ch.SubmitTotp(challenge_pb2.SubmitTotpRequest(code=gw.code()))
    assert r.accepted
    assert "127.0.0.1/32" not in gw.enforcer.held


async def test_auto_poll_interval_follows_what_reads_cost(gw: Harness) -> None:
    """poll_interval = "auto" (the default): the interval follows how long reads keep the interface busy."""
    from dataclasses import replace

    assert gw.daemon.config.wireguard.poll_interval == "auto"
    await gw.poll()
    assert gw.tracker.poll_interval() == 1.0  # reads that cost nothing: every second
    gw.source.read_seconds = 0.03
    await gw.poll()
    assert gw.tracker.poll_interval() == pytest.approx(3.0)  # 30 ms per read: at most 1% of the time
    for _ in range(20):
        gw.source.read_seconds = 0.01
        await gw.poll()
    assert gw.tracker.poll_interval() == pytest.approx(1.0, rel=0.01)
    config = gw.daemon.config
    gw.daemon.config = replace(config, wireguard=replace(config.wireguard, poll_interval=0.5))
    assert gw.tracker.poll_interval() == 0.5  # a configured number is kept as it is


async def test_a_poll_gives_way_to_the_driver(gw: Harness) -> None:
    """A poll neither asks WireGuard nor decodes while a job is queued or running: a Disconnect never waits
    behind it for more than one slice."""
    import asyncio

    from gatewayd.runtime.driver import Batch

    gw.source.add(key(1), "127.0.0.1/32", handshake=gw.clock() - 5)
    await gw.enroll("alice", (key(1),))
    await gw.poll()
    release = asyncio.Event()

    async def busy(b: Batch) -> None:
        await release.wait()

    job = asyncio.ensure_future(gw.daemon.driver.submit(CallJob(busy)))
    gw.source.add(key(2), "127.0.0.2/32", handshake=gw.clock() - 1)
    reads = gw.source.reads
    poll = asyncio.ensure_future(gw.poll())
    await asyncio.sleep(0.2)
    assert not poll.done() and gw.source.reads == reads  # waiting: WireGuard was not even asked
    release.set()
    await job
    await asyncio.wait_for(poll, 5)
    assert gw.tracker.spec(key(2)) is not None and key(2) in gw.daemon.core.peers
