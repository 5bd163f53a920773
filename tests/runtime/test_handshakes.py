"""The verdict path of handshake initiations, without the kernel: a memory queue, the real driver and store.
An initiation of a known peer is accepted only after the batch that decided it committed; one whose batch
fails is dropped; anything else passes at once; a packet that cannot be looked at is dropped, never left held."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gatewayd.adapters.sqlite import SecretBox, SqliteStore
from gatewayd.core import events as ev
from gatewayd.core.model import Factor, Member, Role, Roles, Scope, TeamPolicy
from gatewayd.core.state import GatewayState
from gatewayd.lab.noise import initiation
from gatewayd.ports import HandshakeRules, InterfaceIdentity, QueuedPacket
from gatewayd.runtime.driver import Batch, Driver
from gatewayd.runtime.handshakes import HandshakeWatch
from gatewayd.runtime.observability import Metrics
from tests.fakes import CallJob, MemoryEnforcer, MemoryFlows, MemorySource

GATEWAY = X25519PrivateKey.generate()
CLIENT = X25519PrivateKey.generate()
CLIENT_KEY = base64.b64encode(CLIENT.public_key().public_bytes_raw()).decode()
SETTINGS = HandshakeRules(listen_port=0, queue_mark=1 << 26, recent_mark=1 << 27, rate=50, burst=100,
                          recent_seconds=15)


class MemoryQueue:
    def __init__(self, on_packets: Callable[[list[QueuedPacket]], None]) -> None:
        self.on_packets = on_packets
        self.verdicts: dict[int, str] = {}
        self.overflows = 0

    def start(self) -> None: ...

    def close(self) -> None: ...

    def accept(self, packet_id: int) -> None:
        self.verdicts[packet_id] = "accept"

    def drop(self, packet_id: int) -> None:
        self.verdicts[packet_id] = "drop"


class NoRule:
    def ensure(self) -> bool:
        return False

    def present(self) -> bool:
        return True

    def remove(self) -> None: ...


def ipv4_udp(payload: bytes, sport: int = 40000) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0, 64, 17, 0, bytes([192, 0, 2, 9]),
                         bytes([192, 0, 2, 1]))
    return header + struct.pack("!HHHH", sport, 51820, 8 + len(payload), 0) + payload


class Rig:
    def __init__(self, driver: Driver, enforcer: MemoryEnforcer, watch: HandshakeWatch, queue: MemoryQueue) -> None:
        self.driver, self.enforcer, self.watch, self.queue = driver, enforcer, watch, queue


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = SqliteStore(tmp_path / "state.db", SecretBox(os.urandom(32)))
    await store.open()
    enforcer = MemoryEnforcer()
    driver = Driver(GatewayState(), store, enforcer, MemorySource(), MemoryFlows(), clock=lambda: 1_000_000.0)
    task = asyncio.ensure_future(driver.run())
    team = TeamPolicy(team_id="t", version=1, scope=Scope.BOTH, roles=Roles.ALL, totp_prior_connection=True,
                      device_prior_connection=False, reverify_interval=0.0)

    async def setup(b: Batch) -> None:
        await b.state.save_team(team)
        b.feed(ev.TeamPolicyApplied(policy=team))
        await b.state.save_member("alice", "t", Role.MEMBER, [CLIENT_KEY])
        b.feed(ev.MemberUpserted(member=Member(member_id="alice", team_id="t", role=Role.MEMBER,
                                               peers=(CLIENT_KEY,), factors=frozenset({Factor.TOTP}))))
        b.feed(ev.PeerConfigured(public_key=CLIENT_KEY, allowed_ips=("10.0.0.2/32",), endpoint="192.0.2.9:40000"))

    await driver.submit(CallJob(setup))
    queues: list[MemoryQueue] = []

    def make_queue(on_packets: Callable[[list[QueuedPacket]], None]) -> MemoryQueue:
        queues.append(MemoryQueue(on_packets))
        return queues[0]

    watch = HandshakeWatch(driver, Metrics.create(), make_queue=make_queue, rule=NoRule(), rules=SETTINGS,
                           install_rules=enforcer.set_handshake, wake_reader=lambda: None,
                           clock=lambda: 1_000_001.0)
    await watch.adopt(InterfaceIdentity(private_key=GATEWAY.private_bytes_raw(), listen_port=51820))
    try:
        yield Rig(driver, enforcer, watch, queues[0])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


def gateway_public() -> bytes:
    return GATEWAY.public_key().public_bytes_raw()


async def settle(rig: Rig, packet_id: int) -> str:
    for _ in range(200):
        if packet_id in rig.queue.verdicts:
            return rig.queue.verdicts[packet_id]
        await asyncio.sleep(0.01)
    raise AssertionError(f"packet {packet_id} got no verdict")


async def test_an_initiation_is_accepted_after_its_session_is_decided_and_committed(rig: Rig) -> None:
    assert rig.enforcer.handshake is not None and rig.enforcer.handshake.listen_port == 51820
    message = initiation(CLIENT.private_bytes_raw(), gateway_public())
    rig.queue.on_packets([QueuedPacket(id=1, mark=SETTINGS.queue_mark, payload=ipv4_udp(message))])
    assert 1 not in rig.queue.verdicts  # held while the driver decides
    assert await settle(rig, 1) == "accept"
    peer = rig.driver.core.peers[CLIENT_KEY]
    assert peer.last_initiation == 1_000_001.0 and peer.session_live and peer.endpoint == "192.0.2.9:40000"


async def test_garbage_and_strangers_pass_at_once(rig: Rig) -> None:
    stranger = initiation(X25519PrivateKey.generate().private_bytes_raw(), gateway_public())
    other_gateway = initiation(CLIENT.private_bytes_raw(), X25519PrivateKey.generate().public_key().public_bytes_raw())
    packets = [QueuedPacket(id=i, mark=0, payload=p) for i, p in enumerate(
        [ipv4_udp(b"\x01" + bytes(147)), ipv4_udp(stranger), ipv4_udp(other_gateway), b"\x45", b""], start=10)]
    rig.queue.on_packets(packets)
    assert all(rig.queue.verdicts[p.id] == "accept" for p in packets)  # synchronously: nothing waited


async def test_an_initiation_whose_batch_fails_is_dropped(rig: Rig) -> None:
    # A new session from another endpoint: the peer must be quarantined first, and nftables refuses.
    async def prove(b: Batch) -> None:
        b.feed(ev.ProofAccepted(public_key=CLIENT_KEY, factor=Factor.TOTP, verified_at=b.now))

    await rig.driver.submit(CallJob(prove))
    assert not rig.driver.core.peers[CLIENT_KEY].enforced
    rig.enforcer.fail_next = True
    message = initiation(CLIENT.private_bytes_raw(), gateway_public())
    rig.queue.on_packets([QueuedPacket(id=2, mark=0, payload=ipv4_udp(message, sport=41000))])
    assert await settle(rig, 2) == "drop"


async def test_a_packet_that_cannot_be_looked_at_is_dropped_not_left_held(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    assert rig.watch.responder is not None

    def broken(message: bytes) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(rig.watch.responder, "open", broken)
    message = initiation(CLIENT.private_bytes_raw(), gateway_public())
    rig.queue.on_packets([QueuedPacket(id=3, mark=0, payload=ipv4_udp(message))])
    assert rig.queue.verdicts[3] == "drop"
