"""Security events to MQTT (aiomqtt, QoS 1) from the SQLite outbox: at least once, nothing lost.

Events are written to the outbox in the same transaction as the state change they report. This publisher
reads unpublished events in order, publishes them in windows of `in_flight` messages as CloudEvents 1.0 JSON
on `<prefix>/<gateway-id>/events/<type>`, and marks them published only after the broker's PUBACK (through
the driver, the one writer). A broker outage or a restart therefore loses nothing and redelivers with the
same event ids. A retained `<prefix>/<gateway-id>/status` says online/offline, with a last will for crashes.

With more than one broker (`host:port` and then `brokers`, the nodes of a clustered or bridged broker), a lost or
refused connection moves on to the next one at once; the backoff applies only after a whole round failed. The
window that was in flight when a broker died is published again to the next one (same ids: consumers
deduplicate on the CloudEvents id).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence

import aiomqtt

from gatewayd.config import MqttSection
from gatewayd.ports import Outbox, StoredEvent

MAX_BACKOFF = 30.0  # seconds between reconnection attempts, at most

log = logging.getLogger(__name__)


def cloudevent(e: StoredEvent, source: str) -> bytes:
    time = dt.datetime.fromtimestamp(e.time, dt.UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({
        "specversion": "1.0", "id": e.id, "source": source, "type": e.type, "time": time, "subject": e.subject,
        "datacontenttype": "application/json", "data": json.loads(e.data_json),
    }, separators=(",", ":")).encode()


class OutboxPublisher:
    def __init__(self, settings: MqttSection, gateway_id: str, outbox: Outbox,
                 mark_published: Callable[[Sequence[int]], Awaitable[None]], wake: asyncio.Event) -> None:
        self.settings = settings
        self.gateway_id = gateway_id
        self.outbox = outbox
        self.mark_published = mark_published
        self.wake = wake
        self.connected = False
        self.broker = ""
        """The broker in use (host:port), or the last one."""
        self.published = 0
        s = settings
        self.status_topic = f"{s.topic_prefix}/{gateway_id}/status"

    def topic(self, e: StoredEvent) -> str:
        return f"{self.settings.topic_prefix}/{self.gateway_id}/events/{e.type}"

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The brokers, in the order they are tried."""
        out = [(self.settings.host, self.settings.port)]
        for broker in self.settings.brokers:
            host, _, port = broker.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out

    def _client(self, host: str, port: int) -> aiomqtt.Client:
        s = self.settings
        context = None
        if s.tls:
            context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if s.cert_file and s.key_file:
                context.load_cert_chain(str(s.cert_file), str(s.key_file))
        password = s.password_file.read_text().strip() if s.password_file else None
        client = aiomqtt.Client(
            host, port, identifier=s.client_id or f"gatewayd-{self.gateway_id}", username=s.username or None,
            password=password, keepalive=s.keepalive, tls_context=context, clean_session=True,
            max_inflight_messages=s.in_flight, timeout=10,
            will=aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True))
        client.pending_calls_threshold = s.in_flight * 2
        return client

    async def run(self) -> None:
        backoff = 0.5
        brokers = self.addresses
        current = 0
        failed_in_round = 0
        while True:
            host, port = brokers[current]
            try:
                async with self._client(host, port) as client:
                    self.connected = True
                    self.broker = f"{host}:{port}"
                    backoff, failed_in_round = 0.5, 0
                    log.info("mqtt: connected to %s:%d", host, port)
                    await client.publish(self.status_topic, b"online", qos=1, retain=True)
                    try:
                        await self._drain(client)
                    finally:
                        # On a graceful stop say so; the last will covers crashes and lost connections.
                        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                            await client.publish(self.status_topic, b"offline", qos=1, retain=True, timeout=2)
            except aiomqtt.MqttError as exc:
                failed_in_round += 1
                if len(brokers) > 1 and failed_in_round < len(brokers):
                    log.warning("mqtt: %s:%d: %s; trying the next broker", host, port, exc)
                else:
                    log.warning("mqtt: %s:%d: %s; retrying in %.1f s", host, port, exc, backoff)
            finally:
                self.connected = False
            current = (current + 1) % len(brokers)
            if failed_in_round >= len(brokers) or len(brokers) == 1:
                failed_in_round = 0
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _drain(self, client: aiomqtt.Client) -> None:
        source = self.gateway_id
        while True:
            self.wake.clear()
            batch = await self.outbox.unpublished(self.settings.in_flight)
            if not batch:
                try:
                    await asyncio.wait_for(self.wake.wait(), 1.0)
                except TimeoutError:
                    pass
                continue
            await asyncio.gather(*(client.publish(self.topic(e), cloudevent(e, source), qos=1) for e in batch))
            # Every message of the window was acknowledged (PUBACK): only now may they leave the outbox.
            await self.mark_published([e.cursor for e in batch])
            self.published += len(batch)
