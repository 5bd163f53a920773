"""The driver and its jobs, without gRPC: a real SQLite file, the in-memory kernel ports (tests/fakes.py).

What is checked: one batch is one nftables change before the commit (tightening), one commit, one change after
it (loosening), and the callers are answered last; a refused job leaves no write while the rest of its batch
commits; a key reset waits for a real read of the interface instead of re-adding a peer from a guess."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest_asyncio

from gatewayd.adapters.sqlite import SecretBox, SqliteStore
from gatewayd.core import events as ev
from gatewayd.core.model import Factor, Member, PeerState, Role, Roles, Scope, TeamPolicy
from gatewayd.core.state import GatewayState
from gatewayd.core.tracking import PeerSnapshot
from gatewayd.errors import EnforcementFailed, JobFailed, Refused, Status, StorageFailed
from gatewayd.ports import SetChange
from gatewayd.runtime.control import Disconnect, RemoveMember, ResetMfa, UpsertMember
from gatewayd.runtime.driver import Batch, Driver, Job
from gatewayd.runtime.tracker import FeedTracking
from tests.fakes import CallJob, MemoryEnforcer, MemoryFlows, MemorySource

K1, K2 = "a" * 43 + "=", "b" * 43 + "="


class Journal(list[str]):
    """What happened, in order, across the fakes and the store."""


class LoggedEnforcer(MemoryEnforcer):
    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self.journal = journal

    async def apply(self, change: SetChange, *, first: Callable[[], None] | None = None) -> None:
        await super().apply(change, first=first)
        self.journal.append("tighten" if change.quarantine or change.untrack else "loosen")


class LoggedStore(SqliteStore):
    def __init__(self, path: Path, journal: Journal) -> None:
        super().__init__(path, SecretBox(os.urandom(32)))
        self.journal = journal
        self.refuse_commit = False

    def commit_blocking(self) -> None:
        if self.refuse_commit:
            self.refuse_commit = False
            raise sqlite3.OperationalError("database or disk is full")
        super().commit_blocking()
        self.journal.append("commit")


class LoggedSource(MemorySource):
    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self.journal = journal
        self.reset_specs: list[PeerSnapshot] = []

    async def reset_sessions(self, peers: Sequence[PeerSnapshot]) -> None:
        await super().reset_sessions(peers)
        self.reset_specs += peers
        self.journal.append("reset")


@dataclass
class Specs:
    """The tracker's answer for resets: a dict of peers read, or nothing read yet."""

    read: dict[str, PeerSnapshot] | None = None

    @property
    def has_read(self) -> bool:
        return self.read is not None

    def spec(self, public_key: str) -> PeerSnapshot | None:
        return self.read.get(public_key) if self.read is not None else None


@dataclass
class Rig:
    driver: Driver
    store: LoggedStore
    enforcer: LoggedEnforcer
    source: LoggedSource
    specs: Specs
    journal: Journal

    async def run(self, *jobs: Job[object]) -> list[object]:
        """Submit the jobs together (one batch) and return their results or exceptions, in order."""
        futures = [asyncio.ensure_future(self.driver.submit(j)) for j in jobs]
        return list(await asyncio.gather(*futures, return_exceptions=True))


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    journal = Journal()
    store = LoggedStore(tmp_path / "state.db", journal)
    await store.open()
    enforcer, source, specs = LoggedEnforcer(journal), LoggedSource(journal), Specs()
    driver = Driver(GatewayState(), store, enforcer, source, MemoryFlows(), specs=specs, clock=lambda: 1_000_000.0)
    task = asyncio.ensure_future(driver.run())
    r = Rig(driver, store, enforcer, source, specs, journal)
    team = TeamPolicy(team_id="t", version=1, scope=Scope.BOTH, roles=Roles.ALL, totp_prior_connection=False,
                      device_prior_connection=False, reverify_interval=0.0)

    async def setup(b: Batch) -> None:
        await b.state.save_team(team)
        b.feed(ev.TeamPolicyApplied(policy=team))
        for member_id, key, ip in (("alice", K1, "10.0.0.1/32"), ("bob", K2, "10.0.0.2/32")):
            await b.state.save_member(member_id, "t", Role.MEMBER, [key])
            b.feed(ev.MemberUpserted(member=Member(member_id=member_id, team_id="t", role=Role.MEMBER,
                                                   peers=(key,), factors=frozenset({Factor.TOTP}))))
            b.feed(ev.PeerConfigured(public_key=key, allowed_ips=(ip,), endpoint="192.0.2.1:51820"))

    await driver.submit(CallJob(setup))
    journal.clear()
    enforcer.transactions.clear()
    try:
        yield r
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


def disconnect(member: str, key: str = "") -> Disconnect:
    return Disconnect(member_id=member, reason="test", idempotency_key=key or f"idem-{member}")


async def test_a_batch_tightens_before_its_commit_and_answers_after_it(rig: Rig) -> None:
    async def call(job: Disconnect) -> None:
        await rig.driver.submit(job)
        rig.journal.append(f"answer {job.member_id}")

    rig.specs.read = {}
    await asyncio.gather(call(disconnect("alice")), call(disconnect("bob")))
    # One transaction each way for both calls; both answered after the commit.
    assert rig.journal[:2] == ["tighten", "commit"]
    assert sorted(rig.journal[2:]) == ["answer alice", "answer bob"]
    assert rig.enforcer.held == {"10.0.0.1/32", "10.0.0.2/32"}
    assert len(rig.enforcer.transactions) == 1


async def test_loosening_is_applied_after_the_commit(rig: Rig) -> None:
    rig.specs.read = {}
    await rig.driver.submit(disconnect("alice"))
    rig.journal.clear()

    async def prove(b: Batch) -> bool:
        return b.ask(b.core.accept_proof, ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=b.now))

    assert await rig.driver.submit(CallJob(prove)) is True
    assert rig.journal == ["commit", "loosen"]
    assert "10.0.0.1/32" not in rig.enforcer.held


async def test_a_commit_the_disk_refuses_releases_nothing(rig: Rig) -> None:
    """A batch of proofs commits and releases in one hop off the loop: when the COMMIT fails, nothing is released,
    the callers hear StorageFailed, and the core is rebuilt from what was committed (still quarantined)."""
    rig.specs.read = {}
    await rig.driver.submit(disconnect("alice"))
    rig.journal.clear()

    async def prove(b: Batch) -> bool:
        return b.ask(b.core.accept_proof, ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=b.now))

    rig.store.refuse_commit = True
    (result,) = await rig.run(CallJob(prove))
    assert isinstance(result, StorageFailed) and "full" in str(result)
    assert "loosen" not in rig.journal and "10.0.0.1/32" in rig.enforcer.held
    assert rig.driver.core.peers[K1].state is PeerState.QUARANTINED
    # The disk takes writes again: the same proof releases the peer.
    assert await rig.driver.submit(CallJob(prove)) is True
    assert rig.journal[-2:] == ["commit", "loosen"] and "10.0.0.1/32" not in rig.enforcer.held


async def test_a_release_the_kernel_refuses_after_the_commit_is_reported_and_reconciled(rig: Rig) -> None:
    rig.specs.read = {}
    await rig.driver.submit(disconnect("alice"))

    async def prove(b: Batch) -> bool:
        return b.ask(b.core.accept_proof, ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=b.now))

    rig.journal.clear()
    rig.enforcer.fail_next = True
    (result,) = await rig.run(CallJob(prove))
    # The caller hears that the kernel refused; the proof is committed, and the reconcile that follows the batch
    # puts the kernel in line with it.
    assert isinstance(result, EnforcementFailed)
    assert rig.journal == ["commit"] and rig.driver.core.peers[K1].state is PeerState.AUTHORIZED
    assert "10.0.0.1/32" not in rig.enforcer.held and rig.driver.enforcement_healthy


async def test_a_refused_job_writes_nothing_and_its_batch_commits_the_rest(rig: Rig) -> None:
    taken = UpsertMember(member_id="carol", team_id="t", role=Role.MEMBER, peers=frozenset({K1}), totp=None,
                         backup=None, devices=None)
    results = await rig.run(taken, RemoveMember(member_id="nobody"), disconnect("bob"))
    assert isinstance(results[0], Refused) and results[0].status is Status.FAILED_PRECONDITION
    assert results[0].field == "peer_public_keys"
    assert isinstance(results[1], Refused) and results[1].status is Status.NOT_FOUND
    assert not isinstance(results[2], BaseException)
    assert rig.journal.count("commit") == 1
    assert not await rig.store.state.member_exists("carol")  # its savepoint was rolled back
    assert "10.0.0.2/32" in rig.enforcer.held


async def test_a_job_that_refuses_after_changing_the_core_is_a_bug(rig: Rig) -> None:
    async def bad(b: Batch) -> None:
        b.feed(ev.DisconnectRequested(member_id="alice"))
        raise Refused(Status.INVALID_ARGUMENT, "too late")

    (result,) = await rig.run(CallJob(bad))
    assert isinstance(result, RuntimeError) and "changed the core" in str(result)


async def test_a_replayed_disconnect_answers_the_first_outcome(rig: Rig) -> None:
    rig.specs.read = {}
    first = await rig.driver.submit(disconnect("alice", "k"))
    again = await rig.driver.submit(disconnect("alice", "k"))
    assert again.replayed and not first.replayed and again.outcome == first.outcome
    other = Disconnect(member_id="bob", reason="test", idempotency_key="k")
    (result,) = await rig.run(other)
    assert isinstance(result, Refused) and result.field == "idempotency_key"


async def test_a_key_reset_waits_for_a_read_instead_of_guessing(rig: Rig) -> None:
    """Before the interface was read, a Disconnect quarantines at once but does not re-add the peer from what
    the store remembers (no preshared key, keepalive or fresh endpoint): the reset runs after the first read."""
    result = await rig.driver.submit(disconnect("alice"))
    assert result.outcome.peers_quarantined == 1 and "10.0.0.1/32" in rig.enforcer.held
    assert rig.source.resets == [] and rig.driver.pending_resets == {K1}
    spec = PeerSnapshot(public_key=K1, endpoint="198.51.100.7:4000", allowed_ips=("10.0.0.1/32",),
                        last_handshake=None, keepalive=25, preshared_key=b"\x01" * 32)
    rig.specs.read = {K1: spec}
    await rig.driver.reset_pending()
    assert rig.source.reset_specs == [spec] and not rig.driver.pending_resets


async def test_a_reset_for_a_peer_the_read_did_not_list_is_dropped(rig: Rig) -> None:
    rig.specs.read = {}
    await rig.driver.submit(disconnect("alice"))
    assert rig.source.resets == [] and not rig.driver.pending_resets


async def test_reset_mfa_drops_an_unconfirmed_enrollment(rig: Rig) -> None:
    from gatewayd.auth.totp import TotpFactor

    async def pending(b: Batch) -> None:
        await b.state.save_totp("alice", "active", TotpFactor(secret=b"A" * 20))
        await b.state.save_totp("alice", "pending", TotpFactor(secret=b"B" * 20))

    await rig.driver.submit(CallJob(pending))
    await rig.driver.submit(ResetMfa(member_id="alice"))
    auth = await rig.store.state.member_auth("alice")
    assert auth is not None and auth.reset_pending and auth.pending_totp is None and auth.totp is not None


async def test_tracking_events_are_fed_in_order(rig: Rig) -> None:
    await rig.driver.submit(FeedTracking((ev.PeerUnconfigured(public_key=K2),)))
    assert not rig.driver.core.peers[K2].present
    assert "10.0.0.2/32" not in rig.enforcer.tracked()


async def test_a_job_that_fails_before_touching_the_core_is_rolled_back_and_the_driver_goes_on(rig: Rig) -> None:
    """A store error or a bug in one request (e.g. an integer SQLite cannot hold) answers that caller with
    JobFailed; its writes are undone and the driver keeps serving."""

    async def broken(b: Batch) -> None:
        await b.state.save_member("mallory", "t", Role.MEMBER, [])
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    (result,) = await rig.run(CallJob(broken))
    assert isinstance(result, JobFailed)
    assert not await rig.store.state.member_exists("mallory")
    rig.specs.read = {}
    assert (await rig.driver.submit(disconnect("alice"))).outcome.peers_quarantined == 1


def test_a_reads_events_go_in_runs_of_whole_peers() -> None:
    from gatewayd.runtime.tracker import by_peers

    events: list[ev.Event] = [
        ev.PeerUnconfigured(public_key="a"), ev.PeerConfigured(public_key="b", allowed_ips=()),
        ev.HandshakeSeen(public_key="b", at=1.0), ev.PeerConfigured(public_key="c", allowed_ips=()),
        ev.EndpointChanged(public_key="d", endpoint=None), ev.HandshakeSeen(public_key="d", at=2.0)]
    runs = list(by_peers(events, 2))
    assert [[getattr(e, "public_key", None) for e in run] for run in runs] == [["a", "b", "b"], ["c", "d", "d"]]
    assert [e for run in runs for e in run] == events
    assert list(by_peers(events, 10)) == [tuple(events)] and list(by_peers([], 3)) == []
