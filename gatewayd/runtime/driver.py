"""The driver: the one task that owns the core.

It takes jobs from one queue in order and drains what has queued up into a batch. A batch runs in one SQLite
transaction (each job in a savepoint, so a refused job leaves nothing), and its commands are executed
together: quarantine additions, session resets and flow flushes first, then the commit (state and outbox),
then releases, then the waiting callers are answered. Acknowledged therefore means enforced and committed.

A job is an object with `async run(batch) -> T` (gatewayd.runtime.control and .proofs hold them); `submit`
returns that T to the caller. Jobs reach the core only through the Batch, and the kernel and the disk only
through the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from gatewayd.auth.device import DevicePolicy
from gatewayd.auth.limits import AttemptPolicy
from gatewayd.core import events as ev
from gatewayd.core.commands import (
    Command,
    FlushFlows,
    ForgetPeer,
    Publish,
    Quarantine,
    Release,
    ResetPeerSession,
    SavePeer,
    Track,
    Untrack,
)
from gatewayd.core.model import PeerRecord
from gatewayd.core.state import GatewayState
from gatewayd.core.tracking import PeerSnapshot
from gatewayd.errors import EnforcementFailed, JobFailed, Refused, StorageFailed
from gatewayd.ports import (
    Enforcer,
    FlowTable,
    Outbox,
    PeerSource,
    SetChange,
    StateStore,
    Store,
    StoredEvent,
    new_event_id,
)
from gatewayd.runtime.memory import release_free_memory
from gatewayd.scheduling import Foreground
from gatewayd.tasks import spawn

log = logging.getLogger(__name__)

MAX_BATCH = 20_000
BULK_COMMANDS = 5_000
"""A batch this large (a team Disconnect, a read that configured many peers) frees much memory when it ends:
it is handed back to the kernel (runtime.memory)."""


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
E = TypeVar("E", bound=ev.Event)


@dataclass(frozen=True, kw_only=True)
class JobSettings:
    """What jobs need from the configuration (swapped as a whole on reload)."""

    attempts: AttemptPolicy = field(default_factory=AttemptPolicy)
    """Attempt limits for proofs."""
    device: DevicePolicy = field(default_factory=DevicePolicy)
    """WebAuthn settings for device proofs."""


class Batch:
    """What the jobs of one batch see and produce: the core, the state store and the outbox inside the open
    transaction, the batch's `now`, and the commands the core returned."""

    def __init__(self, core: GatewayState, state: StateStore, outbox: Outbox, now: float, settings: JobSettings,
                 enforcer: Enforcer | None = None) -> None:
        self.core, self.state, self.outbox, self.now, self.settings = core, state, outbox, now, settings
        self._enforcer = enforcer
        self.commands: list[Command] = []
        self.fed = 0
        """Events handed to the core so far (a refusal must come before the first)."""

    def feed(self, event: ev.Event) -> None:
        """Hand an event to the core; its commands join the batch."""
        self.fed += 1
        self.commands += self.core.handle(event, self.now)

    def ask(self, handler: Callable[[E, float], tuple[T, list[Command]]], event: E) -> T:
        """Hand a request to one of the core's answering handlers (e.g. `core.disconnect`); returns its answer."""
        self.fed += 1
        answer, commands = handler(event, self.now)
        self.commands += commands
        return answer

    def publish(self, type_: str, subject: str, **data: Any) -> None:
        self.commands.append(Publish(type=type_, subject=subject, data=data))

    async def quarantine_now(self, prefixes: Iterable[str]) -> None:
        """Put prefixes into the quarantine sets at once, before the job's bookkeeping (a team Disconnect of
        100,000 peers is enforced in one transaction, not after seconds of per-peer work). Only ever tightens,
        so it needs no commit first: if the batch is given up, the reconcile that follows takes back what the
        store does not hold. A failure here is left to the batch's own tightening, which reports it."""
        if self._enforcer is None:
            return
        held = self._enforcer.quarantined()
        missing = [p for p in prefixes if p not in held]
        if not missing:
            return
        try:
            await self._enforcer.apply(SetChange(quarantine=missing))
        except Exception as exc:
            log.warning("early quarantine of %d prefixes failed (retried with the batch): %s", len(missing), exc)


@runtime_checkable
class Pending(Protocol):
    """A result that can say which parts of its effect are still pending (e.g. a Disconnect whose session keys
    could not be dropped yet while its quarantine holds)."""

    def with_pending(self, notes: tuple[str, ...]) -> Any: ...


class Job(Protocol[T_co]):
    """One unit of work the driver runs inside a batch; its result is the caller's answer."""

    async def run(self, b: Batch) -> T_co: ...


@dataclass
class _Queued(Generic[T]):
    job: Job[T]
    future: asyncio.Future[T]


class EventSubscription:
    """One WatchEvents stream. A subscriber that falls too far behind is cut off (it resumes by cursor)."""

    def __init__(self, limit: int = 100_000) -> None:
        self.queue: asyncio.Queue[StoredEvent] = asyncio.Queue(maxsize=limit)
        self.overflowed = asyncio.Event()

    def offer(self, event: StoredEvent) -> bool:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed.set()
            return False
        return True


class StatusWatch:
    """One WatchStatus stream: `changed` is set when its peer's status may have changed; `superseded` once newer
    streams of the same peer pushed it out."""

    __slots__ = ("changed", "superseded")

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.superseded = False


@dataclass
class Watchers:
    """Subscribers to events and to peer status changes."""

    events: set[EventSubscription] = field(default_factory=set)
    peers: dict[str, dict[StatusWatch, None]] = field(default_factory=dict)
    """Each peer's open status streams, oldest first."""

    def watch(self, public_key: str, limit: int) -> StatusWatch:
        """A new status stream of the peer; past `limit` open ones, the oldest is superseded (told, and dropped
        from the notifications)."""
        streams = self.peers.setdefault(public_key, {})
        while len(streams) >= limit:
            oldest = next(iter(streams))
            del streams[oldest]
            oldest.superseded = True
            oldest.changed.set()
        watch = StatusWatch()
        streams[watch] = None
        return watch

    def unwatch(self, public_key: str, watch: StatusWatch) -> None:
        streams = self.peers.get(public_key)
        if streams is not None:
            streams.pop(watch, None)
            if not streams:
                del self.peers[public_key]


class PeerSpecs(Protocol):
    """Where the driver finds a peer's full WireGuard configuration for a key reset (the tracker)."""

    @property
    def has_read(self) -> bool:
        """The interface was read at least once: `spec` answers from a real read."""
        ...

    def spec(self, public_key: str) -> PeerSnapshot | None:
        """The peer as last read from the interface, or None if the last read did not list it."""
        ...


class Driver:
    def __init__(
        self,
        core: GatewayState,
        store: Store,
        enforcer: Enforcer,
        source: PeerSource | None,
        flows: FlowTable | None,
        *,
        specs: PeerSpecs | None = None,
        settings: JobSettings | None = None,
        clock: Callable[[], float] = time.time,
        event_retention: int = 100_000,
        keep_unpublished: bool = False,
        max_unpublished: int = 1_000_000,
    ) -> None:
        self.core, self.store, self.enforcer = core, store, enforcer
        self.source, self.flows = source, flows
        self.clock = clock
        self.event_retention = event_retention
        self.keep_unpublished = keep_unpublished
        self.max_unpublished = max_unpublished
        self.events_appended = asyncio.Event()
        """Set whenever a batch committed events (the MQTT publisher waits on it)."""
        self.watchers = Watchers()
        self.specs = specs
        self.settings = settings or JobSettings()
        self.storage_failed: StorageFailed | None = None
        """The latest failure to write the database, until a batch commits again."""
        self.on_core_rebuilt: list[Callable[[], None]] = []
        """Called after the core was rebuilt from the store (a batch the disk refused was given up)."""
        self.pending_resets: set[str] = set()
        """Peers whose session keys must be dropped once the interface was read (their configuration is not
        known yet: a reset re-adds a peer with it, so guessing would lose its endpoint or preshared key)."""
        self.batches = 0
        """Batches executed; the watchdog checks that it moves."""
        self.enforcement_healthy = True
        self.last_batch: dict[str, float] = {}
        """Seconds spent in each phase of the latest batch (jobs, tighten, reset, flush, commit, loosen)."""
        self._queue: asyncio.Queue[_Queued[Any]] = asyncio.Queue()
        self._batch_lock = asyncio.Lock()
        self.foreground = Foreground()
        """Submitted jobs (and the RPC listeners' calls) are foreground work; polls give way to them."""

    async def submit(self, job: Job[T]) -> T:
        """Run `job` in the next batch; returns its result once its effects are enforced and committed."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self.foreground.running():
            self._queue.put_nowait(_Queued(job, fut))
            # The caller may give up (deadline, cancelled): that cancels `fut` alone; the job is queued and still
            # runs to completion in its batch (process() skips answering a future that is done).
            return await fut

    async def run(self) -> None:
        while True:
            first = await self._next(self._timeout())
            # One turn of the loop first: calls whose requests are already read (gRPC hands them over in bursts)
            # join this batch - one SQLite and one nftables transaction for more of them - for one loop iteration.
            await asyncio.sleep(0)
            async with self._batch_lock:
                batch = [first] if first else []
                while len(batch) < MAX_BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self.process(batch)

    @contextlib.asynccontextmanager
    async def between_batches(self) -> AsyncIterator[None]:
        """Hold the next batch back: entered once the batch under way (if any) is done, so that no write
        transaction is open inside."""
        async with self._batch_lock:
            yield

    def _timeout(self) -> float | None:
        deadline = self.core.next_deadline()
        retry = None if self.enforcement_healthy else 1.0
        if deadline is None:
            return retry
        wait = max(deadline - self.clock(), 0.0)
        return wait if retry is None else min(wait, retry)

    async def _next(self, wait: float | None) -> _Queued[Any] | None:
        """The next job, or None when `wait` seconds passed first (a timer is due)."""
        try:
            return await asyncio.wait_for(self._queue.get(), wait)
        except TimeoutError:
            return None

    async def process(self, queued: list[_Queued[Any]]) -> None:
        started = time.perf_counter()
        now = self.clock()
        batch = Batch(self.core, self.store.state, self.store.outbox, now, self.settings, self.enforcer)
        results: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = []
        await self.store.begin()
        try:
            for item in queued:
                mark = batch.fed
                await self.store.savepoint()
                try:
                    value = await item.job.run(batch)
                except Refused as exc:
                    # Refusals come before a job feeds the core: its writes are undone, the core's cannot be.
                    if batch.fed != mark:
                        raise RuntimeError("a job refused after it changed the core") from exc
                    await self.store.rollback_savepoint()
                    results.append((item.future, exc, None))
                except Exception as exc:
                    # Our bug or a store error in one request: it must not stop the daemon. Before the core was
                    # fed, undoing the request's writes is enough; after, the core and the store may disagree:
                    # the whole batch is given up and the core rebuilt from the store (below).
                    if batch.fed != mark:
                        raise
                    storage = self.store.storage_error(exc)
                    if storage is None:
                        log.exception("job %s failed; its writes were rolled back", type(item.job).__name__)
                    else:
                        log.error("%s", storage)
                    try:
                        await self.store.rollback_savepoint()
                    except Exception as undo:
                        raise storage or undo from exc  # the transaction is unusable: give the batch up
                    results.append((item.future, storage or JobFailed(type(item.job).__name__), None))
                else:
                    await self.store.release_savepoint()
                    results.append((item.future, None, value))
            batch.commands.extend(self.core.handle_timer(now))
            self.last_batch = {"jobs": time.perf_counter() - started}
            failure, pending = await self._execute(batch)
        except Exception as exc:
            storage = self.store.storage_error(exc)
            if storage is None:
                for item in queued:
                    if not item.future.done():
                        item.future.set_exception(exc)
                raise
            # The disk refused the batch (full, I/O error): nothing of it is kept. The core is rebuilt from what
            # was committed and the kernel made to hold exactly that; callers hear which disk; the daemon goes on.
            log.error("%s", storage)
            await self._rebuild_after(storage)
            for item in queued:
                if not item.future.done():
                    item.future.set_exception(storage)
            return
        except BaseException:
            for item in queued:
                if not item.future.done():
                    item.future.set_exception(RuntimeError("stopped"))
            raise
        if self.storage_failed is not None:
            log.info("the database takes writes again")
            self.storage_failed = None
        self.batches += 1
        if len(batch.commands) >= BULK_COMMANDS:
            spawn(release_free_memory(after=2.0), name="release-memory")
        for fut, error, value in results:
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            elif failure is not None:
                fut.set_exception(failure)
            elif pending and isinstance(value, Pending):
                fut.set_result(value.with_pending(pending))
            else:
                fut.set_result(value)

    async def _execute(self, batch: Batch) -> tuple[EnforcementFailed | None, tuple[str, ...]]:
        """Run the batch's commands; returns the kernel failure (if any) and what is left pending."""
        adds: dict[str, bool] = {}
        tracks: dict[str, bool] = {}
        resets_wanted: list[str] = []
        flushes: list[str] = []
        saves: dict[str, PeerRecord] = {}
        forgets: list[str] = []
        publishes: list[Publish] = []
        for cmd in batch.commands:
            match cmd:
                case Quarantine():
                    adds.update(dict.fromkeys(cmd.prefixes, True))
                case Release():
                    adds.update(dict.fromkeys(cmd.prefixes, False))
                case Track():
                    tracks.update(dict.fromkeys(cmd.prefixes, True))
                case Untrack():
                    tracks.update(dict.fromkeys(cmd.prefixes, False))
                case ResetPeerSession():
                    resets_wanted.append(cmd.public_key)
                case FlushFlows():
                    flushes.extend(cmd.prefixes)
                case SavePeer():
                    saves[cmd.record.public_key] = cmd.record
                case ForgetPeer():
                    saves.pop(cmd.public_key, None)
                    forgets.append(cmd.public_key)
                case Publish():
                    publishes.append(cmd)
                case _:
                    raise RuntimeError(f"unexpected command {cmd!r}")
        resets = self._reset_specs(resets_wanted)
        held, tracked = self.enforcer.quarantined(), self.enforcer.tracked()
        # Tightening (quarantine, untrack) is enforced before the commit, loosening after it.
        tighten = SetChange(quarantine=[p for p, on in adds.items() if on and p not in held],
                            untrack=[p for p, on in tracks.items() if not on and p in tracked])
        loosen = SetChange(release=[p for p, on in adds.items() if not on and p in held],
                           track=[p for p, on in tracks.items() if on and p not in tracked])
        failure: EnforcementFailed | None = None
        timings = self.last_batch
        mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            timings[name] = now - mark
            mark = now

        lap("plan")
        try:
            if tighten:
                await self.enforcer.apply(tighten)
        except Exception as exc:
            log.error("enforcement failed; will retry: %s", exc)
            failure = EnforcementFailed(str(exc))
            self.enforcement_healthy = False
        lap("tighten")

        # Once the quarantine holds, dropping session keys, deleting flows and committing are independent:
        # run them together; the callers are answered only when all three are done.
        async def cut() -> None:
            # Both are done after the quarantine holds; a failure of either leaves that quarantine in place, so
            # it is not a failure of the request: the callers are told what is pending, and it is retried.
            if resets and self.source is not None:
                try:
                    await self.source.reset_sessions(resets)
                except Exception as exc:
                    self.pending_resets.update(r.public_key for r in resets)
                    log.error("session reset of %d peers failed, retried after the next read: %s", len(resets), exc)
                    pending.append(f"session keys of {len(resets)} peers not dropped yet (WireGuard: {exc}); "
                                   "retried once the interface answers; their traffic is blocked meanwhile")
            if flushes and self.flows is not None:
                try:
                    await self.flows.flush(flushes)
                except Exception as exc:
                    log.error("conntrack flush failed: %s", exc)
                    pending.append(f"connection tracking entries not deleted ({exc}); the quarantine does not "
                                   "depend on them")

        pending: list[str] = []
        cutting = bool((resets and self.source is not None) or (flushes and self.flows is not None))
        cut_task = asyncio.ensure_future(cut()) if cutting else None
        # Serialising events is CPU work: it overlaps with the kernel work of cut() (socket I/O).
        outbox = self.store.outbox
        events = [StoredEvent(cursor=outbox.next_cursor + i, id=new_event_id(), type=p.type, time=batch.now,
                              subject=p.subject, data_json=json.dumps(p.data, sort_keys=True))
                  for i, p in enumerate(publishes)]
        # A batch that only loosens after its commit (proofs): the enforcer's writer thread commits, then
        # releases - one hop off the event loop instead of two, each of which waits for the loop's turn.
        joint = bool(loosen) and failure is None and not cutting

        async def persist() -> None:
            if saves:
                await self.store.state.save_peers(saves.values())
            if forgets:
                await self.store.state.forget_peers(forgets)
            if events:
                await outbox.append(events)
                await outbox.prune(self.event_retention, keep_unpublished=self.keep_unpublished,
                                   max_unpublished=self.max_unpublished)
            lap("persist")
            if not joint:
                await self.store.commit()

        if cut_task is None:
            await persist()
        else:
            cut_result, persisted = await asyncio.gather(cut_task, persist(), return_exceptions=True)
            if isinstance(persisted, BaseException):
                raise persisted
            if isinstance(cut_result, BaseException):
                raise cut_result
        if joint:
            committed = False

            def commit() -> None:
                nonlocal committed
                self.store.commit_blocking()
                committed = True

            try:
                await self.enforcer.apply(loosen, first=commit)
            except Exception as exc:
                if not committed:
                    raise  # the disk refused the batch: nothing was released (process() gives the batch up)
                failure = self._release_failed(exc)
            lap("commit+loosen")
        else:
            lap("cut+commit")
            try:
                if loosen and failure is None:
                    await self.enforcer.apply(loosen)
            except Exception as exc:
                failure = self._release_failed(exc)
            lap("loosen")
        for e in events:
            log.info("event %s %s %s", e.type, e.subject, e.data_json)
        if not self.enforcement_healthy:
            await self.retry_reconcile()
        # A peer's status (WatchStatus) changes with its saved state and with any event about it, such as a
        # refused proof that costs an attempt.
        touched = set(saves) | {e.subject.removeprefix("peer/") for e in events if e.subject.startswith("peer/")}
        self._notify(events, touched)
        return failure, tuple(pending)

    def _release_failed(self, exc: Exception) -> EnforcementFailed:
        # Fail closed: the peers stay quarantined until a reconcile succeeds.
        log.error("release failed; will retry: %s", exc)
        self.enforcement_healthy = False
        return EnforcementFailed(str(exc))

    async def _rebuild_after(self, failure: StorageFailed) -> None:
        self.storage_failed = failure
        with contextlib.suppress(Exception):
            await self.store.rollback()
        core = GatewayState(self.core.config)
        core.restore(*await self.store.load(), now=self.clock())
        self.core = core
        for hook in self.on_core_rebuilt:
            hook()
        await self.retry_reconcile()

    def _reset_specs(self, keys: Iterable[str]) -> list[PeerSnapshot]:
        """The full configuration of each peer to reset; a peer never read yet waits in pending_resets."""
        specs: list[PeerSnapshot] = []
        for key in keys:
            if self.specs is None or not self.specs.has_read:
                self.pending_resets.add(key)
                continue
            self.pending_resets.discard(key)
            spec = self.specs.spec(key)
            if spec is not None:  # not on the interface: no session to cut
                specs.append(spec)
        if self.pending_resets:
            log.warning("session reset of %d peers waits for a read of the interface (their endpoint and "
                        "preshared key are not known yet); the quarantine holds meanwhile",
                        len(self.pending_resets))
        return specs

    async def reset_pending(self) -> None:
        """Drop the session keys of peers whose reset waited for their configuration (after a read)."""
        if not self.pending_resets or self.source is None:
            return
        specs = self._reset_specs(sorted(self.pending_resets))
        if specs:
            await self.source.reset_sessions(specs)

    async def retry_reconcile(self) -> None:
        try:
            await self.enforcer.reconcile(self.core.enforced_prefixes(), self.core.tracked_prefixes())
        except Exception as exc:
            log.error("reconcile failed; will retry: %s", exc)
            return
        self.enforcement_healthy = True

    def _notify(self, events: list[StoredEvent], peers: Any) -> None:
        if events:
            self.events_appended.set()
        for sub in list(self.watchers.events):
            for e in events:
                if not sub.offer(e):
                    self.watchers.events.discard(sub)
                    break
        for key in peers:
            for watch in self.watchers.peers.get(key, ()):
                watch.changed.set()
