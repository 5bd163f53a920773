"""Fleet mode: the gateways of a fleet share one-time spends, failure counts, MFA-reset completions and step-up
demands through the ledger in etcd (gatewayd.auth.ledger decides, gatewayd.adapters.etcd stores).

- A proof is checked in the driver, decided by one etcd transaction outside it (an etcd round trip must not hold
  up Disconnects), then committed in the driver as decided (`prove`).
- A mirror of the ledger, fed by a watch from the last seen revision, gives each transaction the revisions to
  compare against (a stale mirror costs a retry, never a wrong decision) and applies what other gateways wrote:
  step-up demands, locks and unlocks, confirmed resets. After a compaction or a restart it reads everything
  afresh; applying an entry twice changes nothing.
- etcd unreachable: `closed` (default) refuses proofs with UNAVAILABLE; `local` decides them on this gateway's
  state alone. Quarantine and Disconnect never wait for etcd.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import unquote

from gatewayd.auth import ledger, limits
from gatewayd.core import events as ev
from gatewayd.errors import Refused, Status
from gatewayd.ports import FleetLedger, LedgerCompacted, LedgerUnavailable, LedgerValue
from gatewayd.runtime import proofs
from gatewayd.runtime.driver import Batch, Job
from gatewayd.runtime.proofs import Check, Prove, Settle

log = logging.getLogger(__name__)

MAX_TRIES = 16
"""Transactions per proof when other gateways keep changing the member's entries meanwhile."""


# ---- jobs that bring what other gateways wrote into this gateway's state ----------------------------------


@dataclass(frozen=True, kw_only=True)
class SyncAttempts:
    """The member's failure count and lock, as the fleet has them."""

    member_id: str
    """The member."""
    attempts: limits.AttemptState
    """The fleet's state."""

    async def run(self, b: Batch) -> None:
        member = b.core.members.get(self.member_id)
        auth = await b.state.member_auth(self.member_id)
        if member is None or auth is None or auth.attempts == self.attempts:
            return
        await b.state.save_attempts(self.member_id, self.attempts)
        if self.attempts.locked != member.locked:
            subject = f"member/{self.member_id}"
            if self.attempts.locked:
                b.publish("factor.locked", subject, failures=self.attempts.failures, fleet=True)
            else:
                b.publish("factor.unlocked", subject, fleet=True)
            b.feed(ev.MemberUpserted(member=replace(member, locked=self.attempts.locked)))


@dataclass(frozen=True, kw_only=True)
class ConfirmReset:
    """An MFA reset was confirmed at a gateway of the fleet with the TOTP factor `factor_id`: if this gateway
    holds that factor as pending, it becomes the member's factor and the old one is invalid."""

    member_id: str
    """The member."""
    factor_id: str
    """The confirmed factor's ledger id."""
    step: int
    """The step it was confirmed with (its replay mark)."""

    async def run(self, b: Batch) -> None:
        member = b.core.members.get(self.member_id)
        auth = await b.state.member_auth(self.member_id)
        if member is None or auth is None or not auth.reset_pending or auth.pending_totp is None:
            return
        if ledger.totp_factor_id(auth.pending_totp.secret) != self.factor_id:
            return
        await proofs.promote(b, member, self.step)


@dataclass(frozen=True, kw_only=True)
class ApplyDemand:
    """A step-up demand from the ledger."""

    target: ledger.Target
    """What it names."""
    ident: str
    """The member id, peer key or team id."""
    after: float
    """A proof verified since pays it."""
    reason: str
    """Why."""
    by: str
    """The gateway that recorded it."""

    async def run(self, b: Batch) -> None:
        name = {ledger.Target.MEMBER: "member_id", ledger.Target.PEER: "public_key",
                ledger.Target.TEAM: "team_id"}[self.target]
        b.feed(ev.StepUpDemanded(after=self.after, reason=self.reason, by=self.by, **{name: self.ident}))


# ---- the fleet --------------------------------------------------------------------------------------------


class Fleet:
    def __init__(self, ledger_: FleetLedger, *, gateway: str, mode: Literal["closed", "local"],
                 policy: Callable[[], limits.AttemptPolicy], submit: Callable[[Job[Any]], Awaitable[Any]],
                 clock: Callable[[], float] = time.time) -> None:
        self.ledger, self.gateway, self.mode, self.policy = ledger_, gateway, mode, policy
        self.submit, self.clock = submit, clock
        self.entries: dict[str, tuple[LedgerValue, int]] = {}
        self._deleted: dict[str, int] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        """Set once the whole ledger was read and applied since start (or since a compaction)."""
        self.watching = False
        self.unavailable_refusals = 0
        self.local_decisions = 0

    # ---- the mirror ---------------------------------------------------------------------------------------

    def _store(self, key: str, value: LedgerValue | None, revision: int) -> bool:
        """Take a change into the mirror; False if the mirror already has it or something newer."""
        current = self.entries.get(key)
        seen = max(current[1] if current else 0, self._deleted.get(key, 0))
        if revision <= seen:
            return False
        if value is None:
            self.entries.pop(key, None)
            self._deleted[key] = revision
        else:
            self.entries[key] = (value, revision)
            self._deleted.pop(key, None)
        return True

    def _refresh(self, prefixes: tuple[str, ...], fresh: ledger.Entries, revision: int) -> None:
        """Everything under `prefixes` as read at `revision`."""
        for key in [k for k in self.entries if k.startswith(prefixes) and k not in fresh]:
            self._store(key, None, revision)
        for key, (value, rev) in fresh.items():
            self._store(key, value, rev)

    async def load(self) -> None:
        entries, revision = await self.ledger.snapshot()
        self.entries, self._deleted, self.revision = dict(entries), {}, revision
        await self._apply([(key, value) for key, (value, _) in entries.items()])
        self.synced.set()
        log.info("fleet: ledger read at revision %d (%d entries)", revision, len(entries))

    @staticmethod
    def _job_for(key: str, value: LedgerValue | None) -> Job[None] | None:
        """The job that brings another gateway's write into this gateway's state, if it needs one."""
        parts = key.split("/")
        if parts[0] != "w":
            return None  # a spend: decided by the transactions that read it
        parts = parts[1:]
        try:
            if parts[0] == "d" and len(parts) == 3 and value is not None:
                return ApplyDemand(target=ledger.Target(parts[1]), ident=unquote(parts[2]),
                                   after=float(value["after"]), reason=str(value.get("reason", "")),
                                   by=str(value.get("by", "")))
            if parts[0] == "m" and len(parts) == 3 and parts[2] == "attempts":
                state, _ = ledger.attempts_of({key: (value or {}, 0)}, unquote(parts[1]))
                return SyncAttempts(member_id=unquote(parts[1]), attempts=state)
            if parts[0] == "m" and len(parts) == 4 and parts[2] == "reset" and value is not None:
                return ConfirmReset(member_id=unquote(parts[1]), factor_id=parts[3], step=int(value["step"]))
        except (KeyError, ValueError, TypeError) as exc:
            log.error("fleet: ignoring a malformed ledger entry %r: %s", key[:200], exc)
        return None

    async def _apply(self, changes: list[tuple[str, LedgerValue | None]]) -> None:
        """Apply others' writes; submitted together, so that the driver takes them in one batch (a restart
        with thousands of demands in the ledger is one transaction, not thousands)."""
        jobs = [(key, job) for key, value in changes if (job := self._job_for(key, value)) is not None]
        results = await asyncio.gather(*(self.submit(job) for _, job in jobs), return_exceptions=True)
        for (key, _), result in zip(jobs, results, strict=True):
            if isinstance(result, Refused):
                log.warning("fleet: could not apply %r: %s", key[:200], result)
            elif isinstance(result, BaseException):
                log.error("fleet: applying %r failed: %r", key[:200], result)

    async def run(self) -> None:
        """Keep the mirror current and apply other gateways' writes, for as long as the daemon runs."""
        backoff = 0.2
        while True:
            try:
                if not self.synced.is_set():
                    await self.load()
                async for revision, changes in self.ledger.watch(self.revision):
                    if not self.watching:
                        log.info("fleet: watching the ledger from revision %d", self.revision + 1)
                    self.watching, backoff = True, 0.2
                    await self._apply([(key, value) for key, value, rev in changes if self._store(key, value, rev)])
                    self.revision = max(self.revision, revision)
                    if len(self._deleted) > 10_000:
                        self._deleted = {k: r for k, r in self._deleted.items() if r > self.revision}
            except LedgerCompacted as exc:
                log.warning("fleet: %s; reading the whole ledger again", exc)
                self.synced.clear()
                continue
            except LedgerUnavailable as exc:
                if self.watching or backoff == 0.2:
                    log.warning("fleet: the ledger is unavailable (%s); proofs are %s until it answers", exc,
                                "refused" if self.mode == "closed" else "decided by this gateway alone")
            except Exception:
                # A bug here must not stop local enforcement; the watch starts over from the last revision.
                log.exception("fleet: following the ledger failed; starting over")
            self.watching = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    # ---- decisions ----------------------------------------------------------------------------------------

    async def decide(self, claim: ledger.Claim) -> ledger.Decision | None:
        """The fleet's decision on a checked proof, committed in etcd; None if etcd cannot be reached and the
        fleet runs in `local` mode (raises UNAVAILABLE in `closed` mode)."""
        prefixes = (ledger.member_prefix(claim.member_id), ledger.spends_prefix(claim.member_id))
        try:
            for _ in range(MAX_TRIES):
                decision = ledger.decide(claim, self.entries, self.policy(), self.clock(), self.gateway)
                ok, revision, fresh = await self.ledger.transact(decision.compares, decision.writes, prefixes)
                if ok:
                    for key, (value, _) in decision.writes.items():
                        self._store(key, value, revision)
                    return decision
                self._refresh(prefixes, fresh, revision)
        except LedgerUnavailable as exc:
            if self.mode == "local":
                self.local_decisions += 1
                log.warning("fleet: the ledger is unavailable (%s); proof decided by this gateway alone "
                            "(fleet.on_unavailable = local)", exc)
                return None
            self.unavailable_refusals += 1
            raise Refused(Status.UNAVAILABLE, f"the fleet ledger cannot be reached, so the proof cannot be spent "
                          f"fleet-wide ({exc}); nothing was recorded: try again shortly") from None
        raise Refused(Status.ABORTED, "other gateways changed this member's ledger entries too often meanwhile; "
                      "submit again")

    def demands_for(self, member_id: str, team_id: str, keys: Iterable[str]) -> list[ApplyDemand]:
        """The demands the mirror holds for this member, its team or its peers: a member enrolled here after a
        demand was written owes it too."""
        out = []
        for target, ident in ((ledger.Target.MEMBER, member_id), (ledger.Target.TEAM, team_id),
                              *((ledger.Target.PEER, k) for k in keys)):
            key = ledger.demand_key(target, ident)
            entry = self.entries.get(key)
            job = self._job_for(key, entry[0]) if entry is not None else None
            if isinstance(job, ApplyDemand):
                out.append(job)
        return out

    async def demand(self, target: ledger.Target, ident: str, after: float, reason: str) -> str | None:
        """Record a step-up demand for the whole fleet; returns why it could not be, or None."""
        key = ledger.demand_key(target, ident)
        value = {"after": after, "reason": reason, "by": self.gateway}
        try:
            self._store(key, value, await self.ledger.put(key, value, ledger.Lifetime.RETAIN))
        except LedgerUnavailable as exc:
            return f"the fleet demand was not recorded: {exc}; retry the call with the same idempotency key"
        return None

    async def unlock(self, member_id: str) -> None:
        """Clear the member's failure count fleet-wide (UnlockMfa)."""
        key = ledger.attempts_key(member_id)
        try:
            _, revision, _ = await self.ledger.transact({}, {key: (None, ledger.Lifetime.KEEP)}, (key,))
        except LedgerUnavailable as exc:
            raise Refused(Status.UNAVAILABLE, f"the fleet ledger cannot be reached ({exc}); the member stays locked "
                          "fleet-wide: try again shortly") from None
        self._store(key, None, revision)


async def prove(submit: Callable[[Job[Any]], Awaitable[Any]], fleet: Fleet | None, proof: proofs.Proof
                ) -> proofs.ProofOutcome:
    """A proof from check to commit: in one job without a fleet; check, ledger, commit with one."""
    if fleet is None:
        outcome: proofs.ProofOutcome = await submit(Prove(proof=proof))
        return outcome
    checked: proofs.Checked = await submit(Check(proof=proof))
    decision = await fleet.decide(checked.claim)
    if decision is not None and decision.outcome in (ledger.Outcome.LOCKED, ledger.Outcome.TOO_EARLY):
        await submit(SyncAttempts(member_id=checked.claim.member_id, attempts=decision.attempts))
        if decision.outcome is ledger.Outcome.LOCKED:
            raise Refused(Status.PERMISSION_DENIED, "factors are locked after too many failed attempts across the "
                          "fleet; the control plane must unlock or re-enroll them")
        wait = (limits.retry_not_before(fleet.policy(), decision.attempts) or 0.0) - fleet.clock()
        raise Refused(Status.RESOURCE_EXHAUSTED,
                      f"too many failed attempts across the fleet: retry in {max(wait, 0.0):.1f} s")
    settled: proofs.ProofOutcome = await submit(Settle(checked=checked, decision=decision))
    return settled
