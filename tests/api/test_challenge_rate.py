"""The challenge API's per-caller call rate ([challenge] calls_per_second, calls_burst), against the daemon with
the challenge API served in-process and by worker processes: one caller over its rate is refused before any
work is done for it; other callers are not affected; the limit is reloadable and validated."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from gatewayd.config import Config, ConfigError, validate
from gatewayd.v1 import challenge_pb2
from tests.api.test_challenge_api import quarantined
from tests.harness import Harness, config_for, key, start, stop, write_config
from tests.pki import Authority


def limited(config: Config, rate: float, burst: int) -> Config:
    return replace(config, challenge=replace(config.challenge, calls_per_second=rate, calls_burst=burst))


async def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def limited_count(gw: Harness) -> float:
    return gw.daemon.metrics.registry.registry.get_sample_value("gatewayd_challenge_calls_limited_total") or 0.0


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "worker-processes"])
async def test_a_caller_over_its_rate_is_refused_and_others_are_not(tmp_path: Path, workers: int) -> None:
    ca = Authority("ca")
    gw = await start(tmp_path, ca, config=limited(config_for(tmp_path, ca), rate=2.0, burst=3), workers=workers)
    try:
        await quarantined(gw)
        me = gw.challenge()
        for _ in range(3):
            assert (await me.GetChallenge(challenge_pb2.GetChallengeRequest())).attempts_left == 10
        events_before = len(await gw.daemon.store.outbox.events_after(0, 10_000))
        # Over the burst: refused at once, whatever the call (a wrong code costs no attempt, writes nothing).
        code, details = await status_of(me.SubmitTotp(challenge_pb2.SubmitTotpRequest(code="000000")))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in" in details
        code, _ = await status_of(me.GetChallenge(challenge_pb2.GetChallengeRequest()))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(await gw.daemon.store.outbox.events_after(0, 10_000)) == events_before
        assert limited_count(gw) == 2
        # Another source has its own budget (::1 is nobody's tunnel address: refused as such, not as over rate).
        code, _ = await status_of(gw.challenge("::1").GetChallenge(challenge_pb2.GetChallengeRequest()))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        # The rate refills the caller's budget: one call per 1/rate seconds.
        await asyncio.sleep(0.6)
        reply = await me.SubmitTotp(challenge_pb2.SubmitTotpRequest(code=gw.code()))
        assert reply.accepted
        code, _ = await status_of(me.GetChallenge(challenge_pb2.GetChallengeRequest()))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await stop(gw)


async def test_the_rate_is_reloaded(tmp_path: Path) -> None:
    ca = Authority("ca")
    path = tmp_path / "gatewayd.toml"
    config = limited(config_for(tmp_path, ca), rate=0.1, burst=1)
    write_config(config, path)
    gw = await start(tmp_path, ca, config=config, config_path=path)
    try:
        await quarantined(gw)
        me = gw.challenge()
        assert (await me.GetChallenge(challenge_pb2.GetChallengeRequest())).attempts_left == 10
        code, _ = await status_of(me.GetChallenge(challenge_pb2.GetChallengeRequest()))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        write_config(limited(config, rate=1000.0, burst=5), path)
        assert await gw.daemon.reload()
        await asyncio.sleep(0.01)  # 10 calls' worth at the new rate
        for _ in range(5):
            assert (await me.GetChallenge(challenge_pb2.GetChallengeRequest())).attempts_left == 10
    finally:
        await stop(gw)


@pytest.mark.parametrize(("field", "value"), [
    ("calls_per_second", 0.0), ("calls_per_second", -1.0), ("calls_per_second", float("nan")),
    ("calls_per_second", float("inf")), ("calls_per_second", 100_001.0),
    ("calls_burst", 0), ("calls_burst", -1), ("calls_burst", 100_001), ("calls_burst", 1 << 63),
])
def test_rates_out_of_range_are_refused(tmp_path: Path, field: str, value: float) -> None:
    config = config_for(tmp_path, Authority("ca"))
    with pytest.raises(ConfigError, match=rf"challenge\.{field}"):
        validate(replace(config, challenge=replace(config.challenge, **{field: value})))  # type: ignore[arg-type]


class FromAddress:
    """What the challenge servicer reads of a call's context: the caller as gRPC names it."""

    def __init__(self, address: str) -> None:
        self.address = address

    def peer(self) -> str:
        return f"ipv6:[{self.address}]:40000" if ":" in self.address else f"ipv4:{self.address}:40000"


async def test_a_subnet_peer_has_one_budget_whatever_address_it_calls_from(tmp_path: Path) -> None:
    """A site-to-site peer (a /24 of allowed IPs) calling from a new address each time still spends one budget;
    callers that are nobody's tunnel address are counted per address."""
    from gatewayd.api.services import ChallengeService
    from gatewayd.core.callrate import CallRate
    from gatewayd.errors import Refused, Status

    ca = Authority("ca")
    gw = await start(tmp_path, ca)
    try:
        gw.source.add(key(7), "10.60.0.0/24", handshake=gw.clock() - 1)
        await gw.enroll("bob", (key(7),))
        await gw.poll()
        servicer = ChallengeService(gw.daemon.driver, gw.daemon.metrics, None, CallRate(rate=0.01, burst=3))
        for host in (1, 2, 3):
            assert servicer._caller(FromAddress(f"10.60.0.{host}")) == key(7)
        with pytest.raises(Refused) as refused:
            servicer._caller(FromAddress("10.60.0.4"))
        assert refused.value.status is Status.RESOURCE_EXHAUSTED
        # nobody's addresses: their own budgets, then refused as strangers
        for address in ("10.61.0.1", "10.61.0.2", "fd00::9"):
            with pytest.raises(Refused) as refused:
                servicer._caller(FromAddress(address))
            assert refused.value.status is Status.PERMISSION_DENIED
    finally:
        await stop(gw)
