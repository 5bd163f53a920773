"""The handshake queue against the kernel: gatewayd's nftables chain marks initiations (and whether their
endpoint sent data lately), rate-limits them per source, and the iptables-nft NFQUEUE rule (this kernel has no
native nftables queue) hands them to the daemon, which gives each a verdict. Without a listener they are dropped
(daemon_down = "closed") or let through ("bypass")."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Callable

import pytest

from gatewayd.adapters.nfqueue import HandshakeQueue, QueueError, XtQueueRule, native_queue_supported, pick_mode
from gatewayd.adapters.nftables import NftEnforcer
from gatewayd.handshake import udp_packet
from gatewayd.ports import HandshakeRules, QueuedPacket
from tests.netns import inside, namespace

pytestmark = pytest.mark.kernel

PORT, QUEUE, QMARK, RMARK = 51820, 4242, 0x04000000, 0x08000000
INITIATION = b"\x01\x00\x00\x00" + bytes(144)
DATA = b"\x04\x00\x00\x00" + bytes(28)


def rules(rate: int = 50, burst: int = 100) -> HandshakeRules:
    return HandshakeRules(listen_port=PORT, queue_mark=QMARK, recent_mark=RMARK, rate=rate, burst=burst,
                          recent_seconds=15)


class Endpoint:
    """A client socket and the "WireGuard" socket it sends to, both on loopback in the namespace."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.address = address
        self.server = socket.socket(family, socket.SOCK_DGRAM)
        self.server.bind((address, PORT))
        self.server.setblocking(False)
        self.client = socket.socket(family, socket.SOCK_DGRAM)
        self.client.bind((address, 0))

    def send(self, payload: bytes, count: int = 1) -> None:
        for _ in range(count):
            self.client.sendto(payload, (self.address, PORT))

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.server.recv(2048))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.server.close()
        self.client.close()


async def handshake_table(handshake: HandshakeRules | None = None) -> NftEnforcer:
    """gatewayd's table with its handshake chains, and the xt queue rule (fail closed), in the current namespace."""
    enforcer = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
    await enforcer.reconcile(set(), set())
    await enforcer.set_handshake(handshake or rules())
    return enforcer


async def until(predicate: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + 2.0
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
async def test_initiations_are_held_until_their_verdict_and_carry_the_recent_data_mark(address: str) -> None:
    assert pick_mode("auto") == ("nft" if native_queue_supported() else "xt")
    with namespace() as ns, inside(ns):
        await handshake_table()
        rule = XtQueueRule(number=QUEUE, mark=QMARK, bypass=False)
        assert rule.ensure() and rule.present() and not rule.ensure()
        got: list[QueuedPacket] = []
        queue = HandshakeQueue(QUEUE, got.extend)
        queue.start()
        ep = Endpoint(address)
        try:
            ep.send(INITIATION)
            await until(lambda: len(got) == 1)
            held = got[0]
            assert held.mark & QMARK and not held.mark & RMARK
            parsed = udp_packet(held.payload)
            assert parsed is not None and parsed.source == address and parsed.payload == INITIATION
            await asyncio.sleep(0.1)
            assert ep.received() == []  # held in the kernel
            queue.accept(held.id)
            await until(lambda: ep.received() == [INITIATION])
            # Data packets are not queued; they make the endpoint "recent" for the next initiation.
            ep.send(DATA)
            await asyncio.sleep(0.05)
            assert len(got) == 1 and ep.received() == [DATA]
            ep.send(INITIATION)
            await until(lambda: len(got) == 2)
            assert got[1].mark & RMARK
            queue.drop(got[1].id)
            await asyncio.sleep(0.1)
            assert ep.received() == []
            # The gateway's own initiations (from the WireGuard port) are queued too, marked as outgoing.
            with socket.socket(ep.server.family, socket.SOCK_DGRAM) as other:
                other.bind((address, 0))
                other.settimeout(2)
                ep.server.sendto(INITIATION, other.getsockname()[:2])
                await until(lambda: len(got) == 3)
                assert got[2].outgoing and got[2].mark & QMARK and not got[0].outgoing
                queue.accept(got[2].id)
                await asyncio.sleep(0.05)
                assert other.recv(2048) == INITIATION
            # One queue number, one listener.
            with pytest.raises(QueueError, match="already bound"):
                HandshakeQueue(QUEUE, got.extend).start()
        finally:
            queue.close()
            ep.close()


async def test_without_a_listener_initiations_are_dropped_or_with_bypass_let_through() -> None:
    with namespace() as ns, inside(ns):
        await handshake_table()
        XtQueueRule(number=QUEUE, mark=QMARK, bypass=False).ensure()
        ep = Endpoint()
        try:
            ep.send(INITIATION, 3)
            ep.send(DATA)
            await asyncio.sleep(0.1)
            assert ep.received() == [DATA]  # fail closed: the initiations are gone, other traffic is not
            bypass = XtQueueRule(number=QUEUE, mark=QMARK, bypass=True)
            assert bypass.ensure()  # replaces the closed rule
            listing = await asyncio.to_thread(lambda: subprocess.run(
                ["iptables-nft", "-t", "mangle", "-S", "INPUT"], capture_output=True, text=True).stdout)
            assert listing.count("gatewayd handshake queue") == 1 and "--queue-bypass" in listing
            ep.send(INITIATION)
            await asyncio.sleep(0.1)
            assert ep.received() == [INITIATION]
            bypass.remove()
            assert not bypass.present()
        finally:
            ep.close()


async def test_a_flood_from_one_source_is_cut_to_the_rate_before_the_queue() -> None:
    with namespace() as ns, inside(ns):
        enforcer = await handshake_table(rules(rate=10, burst=20))
        XtQueueRule(number=QUEUE, mark=QMARK, bypass=False).ensure()
        got: list[QueuedPacket] = []

        def accept_all(packets: list[QueuedPacket]) -> None:
            for p in packets:
                queue.accept(p.id)
            got.extend(packets)

        queue = HandshakeQueue(QUEUE, accept_all)
        queue.start()
        ep = Endpoint()
        try:
            ep.send(INITIATION, 2000)
            await asyncio.sleep(0.3)
            # The burst and what the rate refilled meanwhile; the rest never reached the daemon.
            assert 20 <= len(got) <= 40, len(got)
            assert len(ep.received()) == len(got)
            assert await enforcer.verify(set(), set()) == []  # the dynamic sets' contents are not drift
        finally:
            queue.close()
            ep.close()


async def test_a_restarted_daemon_keeps_the_chain_its_predecessor_left_and_follows_a_new_port() -> None:
    with namespace() as ns, inside(ns):
        first = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
        await first.reconcile({"10.0.0.2/32"}, {"10.0.0.2/32"})
        await first.set_handshake(rules())
        again = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)  # after a restart
        await again.set_handshake(rules())
        assert await again.reconcile({"10.0.0.2/32"}, {"10.0.0.2/32"}) == []  # nothing rebuilt
        moved = HandshakeRules(listen_port=PORT + 1, queue_mark=QMARK, recent_mark=RMARK, rate=50, burst=100,
                               recent_seconds=15)
        await again.set_handshake(moved)
        assert await again.verify({"10.0.0.2/32"}, {"10.0.0.2/32"}) == []
        listing = await asyncio.to_thread(lambda: subprocess.run(
            ["nft", "list", "chain", "inet", "gatewayd", "handshake"], capture_output=True, text=True).stdout)
        assert f"udp dport {PORT + 1}" in listing and f"udp dport {PORT} " not in listing
        off = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=9443)
        await off.set_handshake(None)
        assert await off.verify({"10.0.0.2/32"}, {"10.0.0.2/32"}) == []
        assert await asyncio.to_thread(lambda: subprocess.run(
            ["nft", "list", "chain", "inet", "gatewayd", "handshake"], capture_output=True).returncode) != 0
