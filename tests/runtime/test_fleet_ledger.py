"""The fleet's decisions and its watch against a real 3-member etcd cluster (mTLS, loopback), in-process: races
between gateways, compaction, unavailability in both modes. The daemon around it is tested in tests/e2e."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from gatewayd.adapters.etcd import EtcdLedger, EtcdSettings
from gatewayd.auth import ledger, limits
from gatewayd.auth.ledger import Claim, Outcome
from gatewayd.errors import Refused, Status
from gatewayd.lab.etcd import EtcdCluster
from gatewayd.runtime.fleet import ApplyDemand, Fleet
from tests.conftest import require_tools
from tests.pki import Authority

pytestmark = pytest.mark.kernel  # needs etcd from Debian's etcd-server, installed with the kernel tools


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdCluster, Path]]:
    require_tools("etcd", "etcdctl", package="etcd-server, etcd-client")
    d = tmp_path_factory.mktemp("etcd")
    ca = Authority("etcd-ca")
    cert, key = ca.issue("localhost", server=True, client_too=True)
    for name, data in (("ca.pem", ca.pem), ("server.pem", cert), ("server.key", key)):
        (d / name).write_bytes(data)
    for gw in ("a", "b"):
        cert, key = ca.issue(f"gateway-{gw}")
        (d / f"{gw}.pem").write_bytes(cert)
        (d / f"{gw}.key").write_bytes(key)
    etcd = EtcdCluster(cert_file=d / "server.pem", key_file=d / "server.key", ca_file=d / "ca.pem")
    with etcd.running():
        yield etcd, d


class Jobs:
    """Stands in for the driver: records the jobs the fleet submits."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []
        self.arrived = asyncio.Event()

    async def __call__(self, job: Any) -> None:
        self.jobs.append(job)
        self.arrived.set()

    async def until(self, done: Any) -> None:
        while not done():
            self.arrived.clear()
            await self.arrived.wait()


def settings(d: Path, endpoints: list[str], gw: str, prefix: str, timeout: float = 2.0) -> EtcdSettings:
    return EtcdSettings(endpoints=tuple(endpoints), prefix=prefix, ca_file=d / "ca.pem", cert_file=d / f"{gw}.pem",
                        key_file=d / f"{gw}.key", server_name="localhost", timeout=timeout)


@pytest.fixture
async def fleets(cluster: tuple[EtcdCluster, Path], request: pytest.FixtureRequest
                 ) -> AsyncIterator[tuple[Fleet, Fleet, Jobs]]:
    etcd, d = cluster
    prefix = f"/gatewayd/{request.node.name[:40]}/"
    jobs = Jobs()
    made = []
    for gw in ("a", "b"):
        store = EtcdLedger(settings(d, etcd.endpoints, gw, prefix))
        await store.start()
        made.append(Fleet(store, gateway=f"gw-{gw}", mode="closed", policy=limits.AttemptPolicy, submit=jobs))
    yield made[0], made[1], jobs
    for f in made:
        await f.ledger.close()


async def test_the_same_backup_code_from_two_gateways_at_once_is_spent_once(fleets: tuple[Fleet, Fleet, Jobs]
                                                                           ) -> None:
    a, b, _ = fleets
    claim = Claim(member_id="m", factor="backup_code", verified=True, backup_set="s", backup_index=3)
    decisions = await asyncio.gather(*(f.decide(claim) for f in (a, b) * 10))
    outcomes = [d.outcome for d in decisions if d is not None]
    assert outcomes.count(Outcome.ACCEPTED) == 1
    # The losers counted as failures, each on the count it saw: ten of nineteen gated ones lock (limit 10).
    assert set(outcomes) <= {Outcome.ACCEPTED, Outcome.USED, Outcome.TOO_EARLY, Outcome.LOCKED}


async def test_one_totp_step_is_accepted_once_across_gateways(fleets: tuple[Fleet, Fleet, Jobs]) -> None:
    a, b, _ = fleets
    claim = Claim(member_id="t", factor="totp", verified=True, totp_id="f", step=1000)
    first, second = await asyncio.gather(a.decide(claim), b.decide(claim))
    assert first is not None and second is not None
    assert sorted(d.outcome.value for d in (first, second)) == ["accepted", "replayed"]
    later = await b.decide(Claim(member_id="t", factor="totp", verified=True, totp_id="f", step=1001))
    assert later is not None and later.outcome is Outcome.ACCEPTED and later.attempts == limits.RESET


async def test_a_stale_mirror_costs_a_retry_not_a_wrong_decision(fleets: tuple[Fleet, Fleet, Jobs]) -> None:
    a, b, _ = fleets
    wrong = Claim(member_id="s", factor="totp", verified=False, reason="wrong_code")
    for _ in range(3):
        assert (await a.decide(wrong)).outcome is Outcome.FAILED  # type: ignore[union-attr]
    # b has not watched any of it: its first transaction fails its compare, reads afresh, and gates on the
    # fleet's 3 failures (the fourth try must wait: free_failures is 3).
    assert ledger.attempts_key("s") not in b.entries
    d = await b.decide(wrong)
    assert d is not None and d.outcome is Outcome.TOO_EARLY and d.attempts.failures == 3
    assert b.entries[ledger.attempts_key("s")][0]["failures"] == 3


async def test_the_watch_applies_others_writes_and_survives_a_compaction(
        cluster: tuple[EtcdCluster, Path], fleets: tuple[Fleet, Fleet, Jobs]) -> None:
    etcd, _ = cluster
    a, b, jobs = fleets
    await b.load()
    # Written while b is not watching, then compacted away: b's watch from its revision must start over.
    await a.demand(ledger.Target.MEMBER, "m1", 100.0, "first")
    await a.demand(ledger.Target.TEAM, "t/1", 200.0, "second")
    revision = (await a.ledger.snapshot())[1]
    assert etcd.etcdctl("compact", str(revision)).returncode == 0
    watching = asyncio.ensure_future(b.run())
    try:
        async with asyncio.timeout(10):
            await jobs.until(lambda: len([j for j in jobs.jobs if isinstance(j, ApplyDemand)]) >= 2)
            demands = {(j.target, j.ident, j.after, j.reason, j.by) for j in jobs.jobs if isinstance(j, ApplyDemand)}
            assert demands == {(ledger.Target.MEMBER, "m1", 100.0, "first", "gw-a"),
                               (ledger.Target.TEAM, "t/1", 200.0, "second", "gw-a")}
            # And from then on, live.
            await a.demand(ledger.Target.PEER, "k=", 300.0, "third")
            await jobs.until(lambda: any(isinstance(j, ApplyDemand) and j.ident == "k=" for j in jobs.jobs))
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)


async def test_unreachable_etcd_fails_closed_or_decides_locally_as_configured(tmp_path: Path,
                                                                             cluster: tuple[EtcdCluster, Path]
                                                                             ) -> None:
    _, d = cluster
    claim = Claim(member_id="u", factor="totp", verified=True, totp_id="f", step=1)
    modes: tuple[Literal["closed", "local"], ...] = ("closed", "local")
    for mode in modes:
        store = EtcdLedger(settings(d, ["127.0.0.1:9"], "a", "/gatewayd/x/", timeout=0.5))  # nothing listens
        await store.start()
        fleet = Fleet(store, gateway="gw-a", mode=mode, policy=limits.AttemptPolicy, submit=Jobs())
        try:
            if mode == "closed":
                with pytest.raises(Refused) as refused:
                    await fleet.decide(claim)
                assert refused.value.status is Status.UNAVAILABLE and "fleet ledger" in refused.value.message
                problem = await fleet.demand(ledger.Target.MEMBER, "m", 1.0, "")
                assert problem is not None and "not recorded" in problem
            else:
                assert await fleet.decide(claim) is None and fleet.local_decisions == 1
        finally:
            await store.close()


async def test_a_malformed_entry_is_read_as_empty_and_does_not_stop_the_watch(
        cluster: tuple[EtcdCluster, Path], fleets: tuple[Fleet, Fleet, Jobs]) -> None:
    """Someone with write access put garbage under the prefix: proofs of that member still decide (on an empty
    count), and the watch goes on to the next demand."""
    etcd, _ = cluster
    a, b, jobs = fleets
    prefix = a.ledger.settings.prefix  # type: ignore[attr-defined]
    await b.load()
    watching = asyncio.ensure_future(b.run())
    try:
        for key, value in ((ledger.attempts_key("g"), "not json"), (ledger.demand_key(ledger.Target.MEMBER, "g"),
                                                                    "[1, 2]")):
            assert etcd.etcdctl("put", prefix + key, value).returncode == 0
        d = await a.decide(Claim(member_id="g", factor="totp", verified=False, reason="wrong_code"))
        assert d is not None and d.outcome is Outcome.FAILED and d.attempts.failures == 1
        await a.demand(ledger.Target.MEMBER, "after-garbage", 5.0, "next")
        async with asyncio.timeout(10):
            await jobs.until(lambda: any(isinstance(j, ApplyDemand) and j.ident == "after-garbage"
                                         for j in jobs.jobs))
        assert not any(isinstance(j, ApplyDemand) and j.ident == "g" for j in jobs.jobs)
        assert not watching.done()
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
