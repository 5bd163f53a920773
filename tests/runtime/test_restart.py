"""What a restart of gatewayd keeps: peers' endpoints (a restart does not report every endpoint as changed; one
that changed while gatewayd was down is reported once), and enforcement from the store before the first read."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from gatewayd.config import Config
from gatewayd.core.model import PeerState
from gatewayd.core.tracking import PeerSnapshot
from gatewayd.daemon import Adapters, Daemon
from gatewayd.ports import StoredEvent
from gatewayd.scheduling import Pause, no_pause
from tests.fakes import MemoryEnforcer, MemoryFlows, MemorySource
from tests.harness import config_for, key, start, stop
from tests.pki import Authority


def _endpoint_events(rows: list[StoredEvent]) -> list[tuple[str, str]]:
    return [(r.subject, r.data_json) for r in rows if r.type == "endpoint.changed"]


def _two_peers(tmp_path: Path) -> tuple[Authority, Config, MemorySource]:
    ca = Authority("ca")
    source = MemorySource()
    source.add(key(1), "10.100.0.1/32")
    source.add(key(2), "10.100.0.2/32")
    return ca, config_for(tmp_path, ca), source


async def test_a_restart_reports_only_endpoints_that_changed_while_it_was_down(tmp_path: Path) -> None:
    ca, config, source = _two_peers(tmp_path)
    h = await start(tmp_path, ca, config, source=source)
    try:
        await h.enroll("m1", (key(1),))
        await h.enroll("m2", (key(2),))
        await h.poll()
        # Peer 2 roams while gatewayd runs: reported, and remembered.
        source.peers[key(2)] = PeerSnapshot(public_key=key(2), endpoint="198.51.100.2:4000",
                                            allowed_ips=("10.100.0.2/32",), last_handshake=None, keepalive=25)
        await h.poll()
        before = _endpoint_events(await h.daemon.store.outbox.events_after(0, 10_000))
        assert [subject for subject, _ in before] == [f"peer/{key(2)}"]
        cursor = h.daemon.store.outbox.next_cursor - 1
    finally:
        await stop(h)
    # While down, peer 1 moves; peer 2 stays where it was.
    source.peers[key(1)] = PeerSnapshot(public_key=key(1), endpoint="203.0.113.1:5000",
                                        allowed_ips=("10.100.0.1/32",), last_handshake=None, keepalive=25)
    h = await start(tmp_path, ca, config, source=source, enforcer=MemoryEnforcer())
    try:
        after = _endpoint_events(await h.daemon.store.outbox.events_after(cursor, 10_000))
        assert [(subject, json.loads(data)["old"], json.loads(data)["new"]) for subject, data in after] == [
            (f"peer/{key(1)}", "192.0.2.1:51820", "203.0.113.1:5000")]
        assert h.daemon.core.peers[key(2)].endpoint == "198.51.100.2:4000"
    finally:
        await stop(h)


class HeldSource(MemorySource):
    """Reads wait until released: the interface answers late (100,000 peers take seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def read(self, pause: Pause = no_pause) -> dict[str, PeerSnapshot]:
        await self.release.wait()
        return await super().read(pause)


async def test_ready_comes_before_the_first_read_and_the_store_is_enforced_meanwhile(tmp_path: Path) -> None:
    ca, config, source = _two_peers(tmp_path)
    h = await start(tmp_path, ca, config, source=source)
    try:
        await h.policy(totp=True)
        await h.enroll("m1", (key(1),))
        await h.enroll("m2", (key(2),), team="other")
        await h.poll()
        assert h.enforcer.held == {"10.100.0.1/32"}
    finally:
        await stop(h)
    held = HeldSource()
    held.peers = dict(source.peers)
    held.add(key(3), "10.100.0.3/32")  # configured while gatewayd was down: undecided until the read
    enforcer = MemoryEnforcer()
    daemon = Daemon(config, Adapters(enforcer=enforcer, source=held, flows=MemoryFlows()), autopoll=True)
    await daemon.start()
    try:
        assert daemon.ready.is_set() and not daemon.first_read.is_set()
        # The store's enforcement holds; the new peer's address is neither tracked nor quarantined, which the
        # tracked-source rule refuses (tests/adapters/test_nftables_traffic.py).
        assert enforcer.held == {"10.100.0.1/32"}
        assert enforcer.tracked_ == {"10.100.0.1/32", "10.100.0.2/32"}
        held.release.set()
        await asyncio.wait_for(daemon.first_read.wait(), 10)
        for _ in range(100):
            if daemon.core.peers.get(key(3)) is not None and daemon.core.peers[key(3)].state is not None:
                break
            await asyncio.sleep(0.01)
        assert daemon.core.peers[key(3)].state is PeerState.LOCKED  # a key no member holds
        assert "10.100.0.3/32" in enforcer.tracked_ and "10.100.0.3/32" in enforcer.held
    finally:
        await daemon.stop()
