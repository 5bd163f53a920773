"""The daemon: start-up order, the tracking loop, listeners, signals and shutdown.

Start-up: open the store, restore the core, reconcile the kernel's quarantine sets with it (one
transaction), read the WireGuard interface once and feed what changed, start the listeners, then report
READY. Stop: close listeners with a bounded grace, stop the driver, close the store. The nftables table is
left in place: a stopped daemon keeps quarantined peers quarantined.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gatewayd.adapters.grpc.listeners import (
    Authorizer,
    ListenerLimits,
    TlsFiles,
    challenge_server,
    control_server,
)
from gatewayd.adapters.grpc.services import ChallengeService, ControlService
from gatewayd.adapters.metrics import serve as serve_metrics
from gatewayd.adapters.mqtt import OutboxPublisher
from gatewayd.adapters.rtnetlink import LinkWatcher
from gatewayd.adapters.sqlite_store import SecretBox, Store
from gatewayd.auth.limits import AttemptPolicy
from gatewayd.config import Config, ConfigError, load
from gatewayd.core.events import Event
from gatewayd.core.model import PeerState
from gatewayd.core.session import CoreConfig, Gateway
from gatewayd.core.tracking import PeerSnapshot, diff
from gatewayd.ports import Enforcer, FlowTable, PeerSource
from gatewayd.runtime.driver import Driver
from gatewayd.runtime.observability import Metrics
from gatewayd.runtime.operations import DevicePolicy, Operations, StatusSnapshot
from gatewayd.runtime.systemd import notify, watchdog_interval
from gatewayd.runtime.tasks import spawn
from gatewayd.scheduling import Pause, Slices, auto_poll_interval

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
CHECKPOINT_INTERVAL = 1.0
"""Seconds between two background SQLite checkpoints."""
CHECKPOINT_PATIENCE = 5.0
"""How long a checkpoint waits for a moment without foreground work before it runs anyway."""


@dataclass
class Adapters:
    enforcer: Enforcer
    source: PeerSource | None
    flows: FlowTable | None
    watch_links: bool = False
    """Follow the WireGuard interface's link and address changes over rtnetlink."""


def kernel_adapters(config: Config) -> Adapters:
    """The real adapters: nftables, WireGuard (kernel genetlink or UAPI), conntrack."""
    from gatewayd.adapters.conntrack import Conntrack
    from gatewayd.adapters.nftables import NftEnforcer
    from gatewayd.adapters.wireguard import open_source

    return Adapters(
        enforcer=NftEnforcer(table=config.enforcement.table, interface=config.wireguard.interface,
                             challenge_port=config.challenge.port),
        source=open_source(config.wireguard),
        flows=Conntrack(),
        watch_links=True,
    )


async def diff_in_slices(old: Mapping[str, PeerSnapshot], new: Mapping[str, PeerSnapshot], pause: Pause
                         ) -> list[Event]:
    """`diff`, 64 peers at a time, pausing whenever a slice's time is used up (10,000 peers take ~5 ms)."""
    keys = sorted(old.keys() | new.keys())
    events: list[Event] = []
    slices = Slices(pause)
    for i in range(0, len(keys), 64):
        events += diff(old, new, keys[i:i + 64])
        if slices.due():
            await slices.pause()
    return events


class Daemon:
    def __init__(self, config: Config, adapters: Adapters, *, clock: Callable[[], float] = time.time,
                 autopoll: bool = True, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.autopoll = autopoll
        self.adapters = adapters
        self.clock = clock
        self.store = Store(config.gateway.database, SecretBox.from_file(config.gateway.secrets_key_file))
        self.core = Gateway(CoreConfig(quarantine_unknown_peers=config.gateway.quarantine_unknown_peers))
        a = config.auth
        d = config.device
        self.ops = Operations(AttemptPolicy(max_failures=a.max_failures, free_failures=a.free_failures,
                                            base_delay=a.base_delay, max_delay=a.max_delay),
                              DevicePolicy(rp_id=d.rp_id, origins=tuple(d.origins), challenge_ttl=d.challenge_ttl))
        self.driver = Driver(self.core, self.store, adapters.enforcer, adapters.source, adapters.flows,
                             clock=clock, event_retention=config.gateway.event_retention,
                             keep_unpublished=bool(config.mqtt.host), max_unpublished=config.mqtt.max_unpublished)
        self.publisher: OutboxPublisher | None = None
        m = config.mqtt
        if m.host:
            self.publisher = OutboxPublisher(
                m, config.gateway.id,
                self.store, lambda cursors: self.driver.submit(self.ops.mark_published(list(cursors))),
                self.driver.events_appended)
        self.control: grpc.aio.Server | None = None
        self.challenge: grpc.aio.Server | None = None
        self.challenge_ports: list[int] = []
        self.control_port: int | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.ready = asyncio.Event()
        self._poll_now = asyncio.Event()
        self.links: LinkWatcher | None = None
        self.metrics = Metrics.create()
        self.metrics_server: asyncio.Server | None = None
        self.started_at: float | None = None
        self.last_poll: float | None = None
        self.wal_frames = 0
        """Frames in SQLite's WAL when the latest checkpoint started."""
        self.read_seconds = 0.0
        """How long reads of the interface keep it busy, smoothed over the latest polls."""
        self.outbox: tuple[int, float | None] = (0, None)  # (unpublished, oldest time), refreshed every 2 s
        self._register_gauges()

    async def start(self) -> None:
        self.config.gateway.database.parent.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        if self.adapters.flows is not None:
            await self.adapters.flows.start()
        teams, members, records = await self.store.load()
        self.core.restore(teams, members, records)
        await self.adapters.enforcer.reconcile(self.core.enforced_prefixes(), self.core.tracked_prefixes())
        # The first read of the interface is compared with what was stored: peers gone meanwhile are
        # unconfigured, so that their prefixes stop being tracked.
        self.driver.snapshot = {
            k: PeerSnapshot(public_key=k, endpoint=p.endpoint, allowed_ips=p.allowed_ips,
                            last_handshake=p.last_handshake, keepalive=0)
            for k, p in self.core.peers.items() if p.present}
        self._tasks.append(spawn(self.driver.run(), name="driver"))
        self._tasks.append(spawn(self._checkpoint_wal(), name="checkpointer"))
        if self.publisher is not None:
            self._tasks.append(spawn(self.publisher.run(), name="mqtt"))
        if self.adapters.watch_links:
            self.links = LinkWatcher(self.config.wireguard.interface, self._link_changed)
            await self.links.start()
        if self.adapters.source is not None:
            try:
                await self.poll_once()
            except (OSError, ConnectionError) as exc:
                # The interface may come up later (rtnetlink tells): enforcement from the store already holds,
                # and tunnel traffic from undecided addresses is refused meanwhile.
                self.metrics.poll_errors.inc()
                log.warning("first read of %s failed, retrying while running: %s",
                            self.config.wireguard.interface, exc)
            if self.autopoll:
                self._tasks.append(spawn(self._track(), name="tracker"))
        c = self.config.control
        self.authorizer = Authorizer({p: frozenset(m) for p, m in c.authorization.items()}, c.unix_principal)
        await self._start_control()
        await self._start_challenge()
        if self.config.metrics.listen:
            host, _, port = self.config.metrics.listen.rpartition(":")
            self.metrics_server = await serve_metrics(self.metrics.registry, host.strip("[]"), int(port))
        if self.publisher is not None:
            self._tasks.append(spawn(self._refresh_outbox_stats(), name="outbox-stats"))
        watchdog = watchdog_interval()
        if watchdog is not None:
            self._tasks.append(spawn(self._watchdog(watchdog), name="watchdog"))
        self.started_at = self.clock()
        self.ready.set()
        notify("READY=1\nSTATUS=enforcing")
        log.info("gatewayd %s ready: %d peers, %d quarantined prefixes", self.config.gateway.id,
                 len(self.core.peers), len(self.core.enforced_prefixes()))

    def _register_gauges(self) -> None:
        r = self.metrics.registry

        r.gauge("gatewayd_sessions", "Configured peers by state",
                lambda: {(("state", s.value),): float(n) for s, n in self._peer_counts()[1].items()})
        r.gauge("gatewayd_quarantined_prefixes", "Prefixes in the kernel's quarantine sets",
                lambda: float(len(self.adapters.enforcer.quarantined())))
        r.gauge("gatewayd_enforcement_healthy", "1 unless a kernel change failed and is being retried",
                lambda: float(self.driver.enforcement_healthy))
        r.gauge("gatewayd_outbox_unpublished", "Events not yet acknowledged by the broker",
                lambda: float(self.outbox[0]) if self.publisher else 0.0)
        r.gauge("gatewayd_outbox_oldest_age_seconds", "Age of the oldest event not yet acknowledged by the broker",
                self._outbox_age)
        r.gauge("gatewayd_broker_connected", "1 while connected to the MQTT broker",
                lambda: float(bool(self.publisher and self.publisher.connected)))
        r.gauge("gatewayd_poll_interval_seconds", "Seconds between two reads of the interface (poll_interval, "
                "or what auto chose)", self.poll_interval)
        r.gauge("gatewayd_poll_read_seconds", "How long reads of the interface keep it busy (smoothed)",
                lambda: self.read_seconds)
        r.gauge("gatewayd_sqlite_wal_frames", "Pages in SQLite's write-ahead log when the latest checkpoint started",
                lambda: float(self.wal_frames))
        r.gauge("gatewayd_batch_phase_seconds", "Time spent in each phase of the latest driver batch",
                lambda: {(("phase", k),): v for k, v in self.driver.last_batch.items()})

    async def _checkpoint_wal(self) -> None:
        """SQLite checkpoints off the commit path (see gatewayd.adapters.sqlite_store), started between RPCs
        but never kept from running for long: the WAL grows until a checkpoint catches up."""
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.driver.foreground.quiet(), CHECKPOINT_PATIENCE)
            await self.checkpoint_once()

    async def checkpoint_once(self) -> None:
        # The bulk (copying pages, syncing the database file) runs beside the batches that keep committing.
        frames, _ = await self.store.checkpoint()
        self.wal_frames = frames
        if frames:
            # The few frames committed meanwhile, with no transaction open: the next batch then starts the
            # WAL over. Without this a busy gateway's WAL only grows (a transaction is nearly always open
            # when the concurrent checkpoint ends, and SQLite restarts the WAL only after a complete one).
            async with self.driver.between_batches():
                await self.store.checkpoint()

    async def _refresh_outbox_stats(self) -> None:
        while True:
            self.outbox = await self.store.outbox_stats()
            await asyncio.sleep(2.0)

    def _peer_counts(self) -> tuple[int, dict[PeerState, int]]:
        """(peers on the interface, how many of them are in each state)."""
        counts = {state: 0 for state in PeerState}
        present = 0
        for peer in self.core.peers.values():
            present += peer.present
            if peer.state is not None and peer.present:
                counts[peer.state] += 1
        return present, counts

    def _outbox_age(self) -> float:
        return max(self.clock() - self.outbox[1], 0.0) if self.publisher and self.outbox[1] else 0.0

    def status(self) -> StatusSnapshot:
        present, counts = self._peer_counts()
        return StatusSnapshot(
            gateway_id=self.config.gateway.id, started_at=self.started_at, interface=self.config.wireguard.interface,
            peers_configured=present, authorized=counts[PeerState.AUTHORIZED],
            quarantined=counts[PeerState.QUARANTINED], locked=counts[PeerState.LOCKED],
            quarantined_prefixes=len(self.adapters.enforcer.quarantined()),
            enforcement_healthy=self.driver.enforcement_healthy, broker_configured=self.publisher is not None,
            broker_connected=bool(self.publisher and self.publisher.connected),
            outbox_unpublished=self.outbox[0] if self.publisher else 0,
            outbox_oldest_age=self._outbox_age(),
            last_poll=self.last_poll, members=len(self.core.members), teams=len(self.core.teams))

    def _limits(self) -> ListenerLimits:
        c = self.config.control
        return ListenerLimits(max_message_bytes=c.max_message_bytes, max_deadline=c.max_deadline)

    async def _start_control(self) -> None:
        c = self.config.control
        tls = None
        if c.listen:
            assert c.tls_cert_file and c.tls_key_file and c.client_ca_file
            tls = TlsFiles(cert=c.tls_cert_file, key=c.tls_key_file, client_ca=c.client_ca_file)
        if c.listen or c.unix_socket:
            self.control, self.control_port = await control_server(
                ControlService(self.driver, self.ops, self.metrics, self.status), tcp=c.listen or None, tls=tls,
                unix_socket=c.unix_socket,
                unix_mode=c.unix_socket_mode, authorizer=self.authorizer, limits=self._limits(),
                foreground=self.driver.foreground)

    async def _start_challenge(self) -> None:
        if self.config.challenge.listen:
            self.challenge, self.challenge_ports = await challenge_server(
                ChallengeService(self.driver, self.ops, self.metrics), self.config.challenge.listen, self._limits(),
                foreground=self.driver.foreground)

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 only while the driver makes progress: a heartbeat job must get through it in time."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self.driver.submit(self.ops.heartbeat()), interval)
            except TimeoutError:
                log.error("driver made no progress for %.1f s: withholding the watchdog ping", interval)
                continue
            notify("WATCHDOG=1")

    async def reload(self) -> bool:
        """SIGHUP: validate the file first; swap in what can change at runtime, or keep the old config."""
        if self.config_path is None:
            return False
        try:
            new = load(self.config_path)
            fixed = [key for key, old, cur in (
                ("gateway.id", self.config.gateway.id, new.gateway.id),
                ("gateway.database", self.config.gateway.database, new.gateway.database),
                ("gateway.secrets_key_file", self.config.gateway.secrets_key_file, new.gateway.secrets_key_file),
                ("wireguard.interface", self.config.wireguard.interface, new.wireguard.interface),
                ("wireguard.backend", self.config.wireguard.backend, new.wireguard.backend),
                ("enforcement", self.config.enforcement, new.enforcement),
                ("mqtt", self.config.mqtt, new.mqtt),
            ) if old != cur]
            if fixed:
                raise ConfigError(fixed[0], "cannot change while running; restart gatewayd")
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            await self.driver.submit(self.ops.note("config.reload_refused", f"gateway/{self.config.gateway.id}",
                                                   {"reason": str(exc)}))
            return False
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        old, self.config = self.config, new
        a, d = new.auth, new.device
        self.ops.attempts = AttemptPolicy(max_failures=a.max_failures, free_failures=a.free_failures,
                                          base_delay=a.base_delay, max_delay=a.max_delay)
        self.ops.device = DevicePolicy(rp_id=d.rp_id, origins=tuple(d.origins), challenge_ttl=d.challenge_ttl)
        self.core.config = CoreConfig(quarantine_unknown_peers=new.gateway.quarantine_unknown_peers)
        self.driver.event_retention = new.gateway.event_retention
        self.authorizer.rules = {p: frozenset(m) for p, m in new.control.authorization.items()}
        self.authorizer.local_principal = new.control.unix_principal
        rebound = []
        if (old.control.listen, old.control.unix_socket, old.control.tls_cert_file, old.control.tls_key_file,
                old.control.client_ca_file, old.control.max_message_bytes) != (
                new.control.listen, new.control.unix_socket, new.control.tls_cert_file, new.control.tls_key_file,
                new.control.client_ca_file, new.control.max_message_bytes):
            if self.control is not None:
                await self.control.stop(SHUTDOWN_GRACE)
            self.control = None
            await self._start_control()
            rebound.append("control")
        if old.challenge.listen != new.challenge.listen:
            if self.challenge is not None:
                await self.challenge.stop(SHUTDOWN_GRACE)
            self.challenge = None
            await self._start_challenge()
            rebound.append("challenge")
        await self.driver.submit(self.ops.note("config.reloaded", f"gateway/{new.gateway.id}",
                                               {"listeners_rebound": rebound}))
        notify("READY=1\nSTATUS=enforcing (configuration reloaded)")
        log.info("configuration reloaded%s", f"; rebound {', '.join(rebound)}" if rebound else "")
        return True

    async def poll_once(self) -> None:
        assert self.adapters.source is not None
        started = time.perf_counter()
        # Background work: it gives way to RPCs and driver jobs (see gatewayd.scheduling).
        quiet = self.driver.foreground.quiet
        snapshot = await self.adapters.source.read(quiet)
        latest = self.adapters.source.read_seconds
        self.read_seconds = latest if not self.read_seconds else 0.7 * self.read_seconds + 0.3 * latest
        events = await diff_in_slices(self.driver.snapshot, snapshot, quiet)
        self.driver.snapshot = dict(snapshot)
        self.metrics.poll_seconds.observe(time.perf_counter() - started)
        self.last_poll = self.clock()
        if events:
            await self.driver.submit(self.ops.feed(events))

    def _link_changed(self, kind: str, fields: dict[str, Any]) -> None:
        """rtnetlink saw the interface or its addresses change: record it and re-read the peers now."""
        log.info("interface %s: %s %s", self.config.wireguard.interface, kind, fields)
        spawn(self.driver.submit(self.ops.note(f"interface.{kind}", f"interface/{fields['interface']}", fields)),
              name="link-event")
        self._poll_now.set()

    def poll_interval(self) -> float:
        configured = self.config.wireguard.poll_interval
        return auto_poll_interval(self.read_seconds) if configured == "auto" else configured

    async def _track(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll_now.wait(), self.poll_interval())
            self._poll_now.clear()
            try:
                await self.poll_once()
            except (OSError, ConnectionError) as exc:
                self.metrics.poll_errors.inc()
                log.warning("reading %s failed: %s", self.config.wireguard.interface, exc)

    async def stop(self) -> None:
        notify("STOPPING=1")
        for server in (self.control, self.challenge):
            if server is not None:
                await server.stop(SHUTDOWN_GRACE)
        if self.metrics_server is not None:
            self.metrics_server.close()
            await self.metrics_server.wait_closed()
        for task in reversed(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.adapters.flows is not None:
            await self.adapters.flows.close()
        if self.links is not None:
            await self.links.close()
        await self.store.close()
        log.info("gatewayd stopped; quarantine left in place")

    async def serve(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            waiter = spawn(stop.wait(), name="stop-signal")
            await asyncio.wait([waiter, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in self._tasks:
                if task.done() and task.exception() is not None:
                    raise RuntimeError(f"{task.get_name()} failed") from task.exception()
        finally:
            await self.stop()
