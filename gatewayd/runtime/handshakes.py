"""Handshake initiations, decided as they arrive: the queue hands over each initiation to the interface's listen
port before WireGuard sees it; this opens it with the interface's key (gatewayd.handshake), feeds the core a
HandshakeInitiated, and gives the verdict only once the batch that decided it is enforced (a new session that
owes a proof is in the quarantine sets before its initiation goes on, so not one of its packets is forwarded).

Whatever cannot be attributed to a peer of the interface - not an initiation, mac1 wrong, undecryptable, an
unknown key - is passed on untouched: WireGuard drops it itself. A batch that fails (nftables or the disk
refused it) drops the initiations it held: the clients retry in 5 s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from gatewayd.core.events import HandshakeInitiated
from gatewayd.core.state import SessionStart
from gatewayd.handshake import INITIATION_SIZE, Responder, endpoint_text, udp_packet
from gatewayd.ports import HandshakeRules, InterfaceIdentity, PacketQueue, QueuedPacket, QueueRule
from gatewayd.runtime.driver import Batch, Driver
from gatewayd.runtime.observability import Metrics
from gatewayd.tasks import spawn

log = logging.getLogger(__name__)

UNKNOWN_KEY_READ_INTERVAL = 1.0
"""An initiation from a key the core does not know asks for a read of the interface at most this often (a new
peer is decided at once; a flood of made-up keys costs at most one read a second)."""


@dataclass(frozen=True)
class DecideInitiations:
    """Job: the initiations of one or more queued datagrams."""

    events: tuple[HandshakeInitiated, ...]

    async def run(self, b: Batch) -> list[SessionStart | None]:
        return [b.ask(b.core.initiated, e) for e in self.events]


class HandshakeWatch:
    def __init__(self, driver: Driver, metrics: Metrics, *, make_queue: Callable[[Callable[[list[QueuedPacket]], None]],
                 PacketQueue], rule: QueueRule, rules: HandshakeRules,
                 install_rules: Callable[[HandshakeRules | None], Any], wake_reader: Callable[[], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.driver, self.metrics, self.clock = driver, metrics, clock
        self.rules = rules
        """The handshake chain's settings; its listen_port follows the interface's (adopt)."""
        self.rule, self.install_rules, self.wake_reader = rule, install_rules, wake_reader
        self.queue = make_queue(self._packets)
        self.responder: Responder | None = None
        self._key = b""
        self.listen_port = 0
        self._last_wake = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._check = asyncio.Event()
        self._who = ""

    def start(self) -> None:
        """Bind the queue (before the rules send anything to it)."""
        self.queue.start()

    async def adopt(self, identity: InterfaceIdentity | None) -> bool:
        """Follow the interface's key and port: open initiations with the key, and point the table's handshake
        chain at the port. True if the port changed (the queue rule must then be ensured)."""
        if identity is None or not identity.listen_port:
            return False
        if self.responder is None or identity.private_key != self._key:
            self.responder = Responder(identity.private_key)
            self._key = identity.private_key
        if identity.listen_port == self.listen_port:
            return False
        await self.install_rules(replace(self.rules, listen_port=identity.listen_port))
        if self.listen_port:
            log.info("WireGuard listen port moved from %d to %d", self.listen_port, identity.listen_port)
        self.listen_port = identity.listen_port
        return True

    async def ensure_rule(self) -> None:
        """Install the queue rule (after the reconcile: nothing is sent to the queue before)."""
        if self.listen_port:
            await asyncio.to_thread(self.rule.ensure)
            log.info("handshake initiations to port %d are decided as they arrive", self.listen_port)

    async def follow(self, identity: InterfaceIdentity | None) -> None:
        """After a read of the interface."""
        if await self.adopt(identity):
            await self.ensure_rule()

    def check_rule_soon(self, who: str) -> None:
        """Someone changed a table where the queue rule lives (nftables notifications): check it now."""
        self._who = who
        self._check.set()

    async def run(self, interval: float = 30.0) -> None:
        """Put the queue rule back if someone removed or changed it: at once when the nftables notifications tell
        (check_rule_soon), and every `interval` in case one was lost."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check.wait(), interval)
            self._check.clear()
            try:
                if self.listen_port and await asyncio.to_thread(self.rule.ensure):
                    log.warning("the handshake queue rule was missing or changed (last change by %s): put back",
                                self._who or "unknown")
            except Exception as exc:  # the check runs again; enforcement of sessions already seen goes on
                log.error("the handshake queue rule cannot be put back: %s", exc)
            self._who = ""

    def close(self) -> None:
        self.queue.close()
        for task in self._tasks:
            task.cancel()

    def _packets(self, packets: list[QueuedPacket]) -> None:
        now = self.clock()
        held: list[tuple[int, HandshakeInitiated]] = []
        peers = self.driver.core.peers
        for packet in packets:
            try:
                event = self._initiation(packet, now, peers)
            except Exception:  # our bug: never leave a packet held without a verdict
                log.exception("a queued packet could not be looked at; dropped (the client retries)")
                self.metrics.handshake_initiations.inc(outcome="dropped")
                self.queue.drop(packet.id)
                continue
            if event is None:
                self.metrics.handshake_initiations.inc(outcome="passed")
                self.queue.accept(packet.id)
            else:
                held.append((packet.id, event))
        if held:
            task = spawn(self._decide(held, time.perf_counter()), name="handshake-verdicts")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _initiation(self, packet: QueuedPacket, now: float, peers: dict[str, Any]) -> HandshakeInitiated | None:
        if self.responder is None:
            return None
        datagram = udp_packet(packet.payload)
        if datagram is None or len(datagram.payload) != INITIATION_SIZE:
            return None
        recent = bool(packet.mark & self.rules.recent_mark)
        if packet.outgoing:
            endpoint = endpoint_text(datagram.destination, datagram.dport)
            key = self._addressee(datagram.payload, endpoint, peers)
            if key is None:
                return None
            return HandshakeInitiated(public_key=key, endpoint=endpoint, at=now, stamp=b"", recent_data=recent,
                                      by_gateway=True)
        opened = self.responder.open(datagram.payload)
        if opened is None:
            return None
        key = base64.b64encode(opened.initiator).decode()
        if key not in peers:
            if now - self._last_wake >= UNKNOWN_KEY_READ_INTERVAL:
                self._last_wake = now
                self.wake_reader()
            return None
        return HandshakeInitiated(public_key=key, endpoint=endpoint_text(datagram.source, datagram.sport), at=now,
                                  stamp=opened.timestamp, recent_data=recent)

    def _addressee(self, message: bytes, endpoint: str, peers: dict[str, Any]) -> str | None:
        """The peer the gateway's own initiation is for: its mac1 is keyed with that peer's public key. The peer
        at the destination endpoint is tried first; the others only if that fails (the gateway initiates
        rarely: on a retry or to restart a session)."""
        assert self.responder is not None
        at_endpoint = [k for k, p in peers.items() if p.endpoint == endpoint]
        for key in at_endpoint + [k for k in peers if k not in at_endpoint]:
            if self.responder.sent_to(message, base64.b64decode(key)):
                return key
        return None

    async def _decide(self, held: list[tuple[int, HandshakeInitiated]], arrived: float) -> None:
        try:
            await self.driver.submit(DecideInitiations(tuple(e for _, e in held)))
        except Exception as exc:  # any failure: the initiations do not go on
            log.warning("dropping %d handshake initiations: their decision was not enforced (%s)", len(held), exc)
            self.metrics.handshake_initiations.inc(len(held), outcome="dropped")
            for packet_id, _ in held:
                self.queue.drop(packet_id)
            return
        for packet_id, _ in held:
            self.queue.accept(packet_id)
        self.metrics.handshake_initiations.inc(len(held), outcome="decided")
        elapsed = time.perf_counter() - arrived
        for _ in held:
            self.metrics.handshake_verdict_seconds.observe(elapsed)
