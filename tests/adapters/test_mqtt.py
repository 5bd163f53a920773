"""Security events over MQTT with a real mosquitto: CloudEvents, retained status, outages, redelivery."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from gatewayd.config import MqttSection
from gatewayd.v1 import control_pb2
from tests.harness import Harness, config_for, start, stop
from tests.mosquitto import Broker, Subscriber, broker
from tests.pki import Authority

pytestmark = pytest.mark.kernel


async def daemon(tmp: Path, ca: Authority, b: Broker, **mqtt: object) -> Harness:
    config = config_for(tmp, ca)
    config = replace(config, mqtt=MqttSection(host="127.0.0.1", port=b.port, **mqtt))  # type: ignore[arg-type]
    return await start(tmp, ca, config=config)


def events(messages: list[tuple[str, bytes, bool]], type_: str) -> list[dict[str, object]]:
    return [json.loads(p) for t, p, _ in messages if t.endswith(f"/events/{type_}")]


async def test_cloudevents_on_topics_and_retained_status(tmp_path: Path) -> None:
    async with broker() as b, Subscriber(b, "gatewayd/gw-test/#") as sub:
        h = await daemon(tmp_path, Authority("ca"), b)
        try:
            await sub.wait_for(lambda ms: any(t.endswith("/status") and p == b"online" for t, p, _ in ms))
            await h.enroll("alice", ())
            await sub.wait_for(lambda ms: events(ms, "member.upserted"))
            e = events(sub.messages, "member.upserted")[0]
            assert e["specversion"] == "1.0" and e["source"] == "gw-test" and e["subject"] == "member/alice"
            assert e["type"] == "member.upserted" and str(e["time"]).endswith("Z") and isinstance(e["data"], dict)
            rows = await h.daemon.store.outbox.events_after(0)
            assert e["id"] in {r.id for r in rows}
        finally:
            await stop(h)
        await sub.wait_for(lambda ms: [p for t, p, _ in ms if t.endswith("/status")][-1] == b"offline")


async def test_broker_outage_during_100_changes_loses_nothing(tmp_path: Path) -> None:
    async with broker() as b, Subscriber(b, "gatewayd/gw-test/events/#") as sub:
        h = await daemon(tmp_path, Authority("ca"), b)
        try:
            await h.enroll("alice", ())
            await sub.wait_for(lambda ms: events(ms, "member.upserted"))
            b.stop()
            for _ in range(100):
                await h.local().UnlockMfa(control_pb2.UnlockMfaRequest(member_id="alice"))
            ids = [r.id for r in await h.daemon.store.outbox.events_after(0, 10_000) if r.type == "factor.unlocked"]
            assert len(ids) == 100 and (await h.daemon.store.outbox.stats())[0] >= 100  # nothing left yet
            b.start()
            await sub.wait_for(lambda ms: len(events(ms, "factor.unlocked")) >= 100, seconds=60)
            got = [str(e["id"]) for e in events(sub.messages, "factor.unlocked")]
            assert sorted(got) == sorted(ids) and len(got) == len(set(got)) == 100
            await _until_empty(h)
        finally:
            await stop(h)


async def test_daemon_stopped_before_puback_redelivers_with_the_same_id(tmp_path: Path) -> None:
    ca = Authority("ca")
    async with broker() as b, Subscriber(b, "gatewayd/gw-test/events/#") as sub:
        h = await daemon(tmp_path, ca, b)
        config, source = h.daemon.config, h.source
        try:
            await h.enroll("alice", ())
            await sub.wait_for(lambda ms: events(ms, "member.upserted"))
            b.pause()  # the broker reads nothing and acknowledges nothing
            await h.local().ResetMfa(control_pb2.ResetMfaRequest(member_id="alice"))
            (pending,) = [r for r in await h.daemon.store.outbox.unpublished(100) if r.type == "mfa_reset.requested"]
        finally:
            await stop(h)  # gone before any PUBACK
        b.resume()
        h = await start(tmp_path, ca, config=config, source=source)
        try:
            assert [r.id for r in await h.daemon.store.outbox.unpublished(100)][:1] in ([pending.id], [])
            await sub.wait_for(lambda ms: events(ms, "mfa_reset.requested"))
            got = events(sub.messages, "mfa_reset.requested")
            assert {e["id"] for e in got} == {pending.id}  # at least once, always with the same id
            await _until_empty(h)
        finally:
            await stop(h)


async def _until_empty(h: Harness) -> None:
    """The outbox drains once the broker acknowledged everything."""
    for _ in range(200):
        if (await h.daemon.store.outbox.stats())[0] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("outbox not drained")
