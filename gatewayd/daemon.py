"""The daemon: wiring, start-up order, reload, gauges, watchdog and shutdown.

Start-up: open the store, restore the core, reconcile the kernel's quarantine sets with it (one
transaction), read the WireGuard interface once and feed what changed, start the listeners, then report
READY. Stop: close listeners with a bounded grace, stop the driver, close the store. The nftables table is
left in place: a stopped daemon keeps quarantined peers quarantined.

The work itself lives below: the driver (gatewayd.runtime.driver) owns the core, the tracker
(gatewayd.runtime.tracker) owns what WireGuard says, the checkpointer keeps SQLite's WAL short, and the
gRPC services (gatewayd.api) turn calls into driver jobs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gatewayd.adapters.metrics import serve as serve_metrics
from gatewayd.adapters.mqtt import OutboxPublisher
from gatewayd.adapters.rtnetlink import LinkWatcher, interface_addresses
from gatewayd.adapters.sqlite import SecretBox, SqliteStore
from gatewayd.adapters.systemd import notify, watchdog_interval
from gatewayd.api.listeners import (
    Authorizer,
    ListenerLimits,
    TlsFiles,
    challenge_methods,
    challenge_server,
    control_server,
)
from gatewayd.api.relay import ChallengeWorkers
from gatewayd.api.services import ChallengeService, ControlService
from gatewayd.auth import device
from gatewayd.config import Config, ConfigError, load
from gatewayd.core.callrate import CallRate
from gatewayd.core.model import PeerState
from gatewayd.core.state import CoreConfig, GatewayState
from gatewayd.core.tracking import PeerSnapshot
from gatewayd.ports import (
    EnforcementMonitor,
    Enforcer,
    FleetLedger,
    FlowTable,
    HandshakeRules,
    LedgerUnavailable,
    PacketQueue,
    PeerSource,
    QueuedPacket,
    QueueRule,
)
from gatewayd.runtime.checkpoints import Checkpointer
from gatewayd.runtime.control import Heartbeat, MarkPublished, Note
from gatewayd.runtime.driver import Driver, JobSettings
from gatewayd.runtime.fleet import Fleet
from gatewayd.runtime.guard import EnforcementGuard
from gatewayd.runtime.handshakes import HandshakeWatch
from gatewayd.runtime.memory import collection_paused
from gatewayd.runtime.observability import Metrics
from gatewayd.runtime.status import StatusSnapshot, peer_counts
from gatewayd.runtime.tracker import Tracker
from gatewayd.tasks import spawn

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0
DETECTING_POLL_INTERVAL = 30.0
"""wireguard.poll_interval "auto" while handshakes are decided as they arrive."""


def core_config(config: Config, *, detection: bool) -> CoreConfig:
    return CoreConfig(quarantine_unknown_peers=config.gateway.quarantine_unknown_peers,
                      handshake_detection=detection,
                      new_endpoint_is_new_session=config.handshake.new_endpoint_is_new_session)


@dataclass
class Adapters:
    enforcer: Enforcer
    source: PeerSource | None
    flows: FlowTable | None
    watch_links: bool = False
    """Follow the WireGuard interface's link and address changes over rtnetlink."""
    monitor: Callable[[Callable[[str, dict[str, set[str]] | None], None], Callable[[str], None]],
                      EnforcementMonitor] | None = None
    """Makes the monitor that reports others' changes of the enforcement table to the first callback, and of
    the tables where the handshake queue rule lives to the second."""
    handshake_queue: Callable[[Callable[[list[QueuedPacket]], None]], PacketQueue] | None = None
    """Makes the queue of handshake initiations (None: sessions are seen only by reading the interface)."""
    queue_rule: QueueRule | None = None
    """The rule that sends initiations to that queue (or, with handshake detection off, the one to remove)."""
    ledger: FleetLedger | None = None
    """The fleet ledger ([fleet]); None: this gateway decides alone."""


def fleet_ledger(config: Config) -> FleetLedger | None:
    """The etcd ledger of [fleet], if configured."""
    fl = config.fleet
    if not fl.endpoints:
        return None
    from gatewayd.adapters.etcd import EtcdLedger, EtcdSettings

    assert fl.ca_file is not None and fl.cert_file is not None and fl.key_file is not None
    return EtcdLedger(EtcdSettings(endpoints=tuple(fl.endpoints), prefix=f"/gatewayd/{fl.name}/", ca_file=fl.ca_file,
                                   cert_file=fl.cert_file, key_file=fl.key_file, server_name=fl.server_name,
                                   timeout=fl.timeout, retain_ttl=int(fl.retention_days * 86400)))


def kernel_adapters(config: Config) -> Adapters:
    """The real adapters: nftables, WireGuard (kernel genetlink or UAPI), conntrack."""
    from gatewayd.adapters.conntrack import Conntrack
    from gatewayd.adapters.nfqueue import HandshakeQueue, NftQueueRule, StaleQueueRules, XtQueueRule, pick_mode
    from gatewayd.adapters.nftables import NftEnforcer
    from gatewayd.adapters.nftmonitor import NftMonitor
    from gatewayd.adapters.wireguard import open_source

    h = config.handshake
    rule: QueueRule = StaleQueueRules(table=config.enforcement.table)
    mode = pick_mode(h.queue) if h.detect else None
    if mode == "xt":
        rule = XtQueueRule(number=h.queue_num, mark=h.queue_mark, bypass=h.daemon_down == "bypass")
    elif mode == "nft":
        rule = NftQueueRule(table=config.enforcement.table, number=h.queue_num, mark=h.queue_mark,
                            bypass=h.daemon_down == "bypass")
    if mode is not None:
        log.info("handshake queue %d through %s", h.queue_num, "nftables' queue" if mode == "nft"
                 else "iptables-nft's NFQUEUE target")
    enforcer = NftEnforcer(table=config.enforcement.table, interface=config.wireguard.interface,
                           challenge_port=config.challenge.port)
    return Adapters(
        handshake_queue=(lambda on_packets: HandshakeQueue(h.queue_num, on_packets)) if mode else None,
        queue_rule=rule,
        enforcer=enforcer,
        source=open_source(config.wireguard),
        flows=Conntrack(),
        watch_links=True,
        monitor=lambda on_drift, on_queue_rule: NftMonitor(config.enforcement.table, on_drift, on_queue_rule,
                                                           own_threads=enforcer.writer_threads),
        ledger=fleet_ledger(config),
    )


def job_settings(config: Config) -> JobSettings:
    return JobSettings(attempts=config.auth, device=config.device)


class Daemon:
    def __init__(self, config: Config, adapters: Adapters, *, clock: Callable[[], float] = time.time,
                 autopoll: bool = True, config_path: Path | None = None, init_store: bool = False) -> None:
        self.config = config
        self.init_store = init_store
        """Move an unusable database file aside and start empty (gatewayd run --init-store)."""
        self.config_path = config_path
        self.autopoll = autopoll
        self.adapters = adapters
        self.clock = clock
        self.store = SqliteStore(config.gateway.database, SecretBox.from_file(config.gateway.secrets_key_file))
        core = GatewayState(core_config(config, detection=adapters.handshake_queue is not None))
        self.metrics = Metrics.create()
        self.call_rate = CallRate(config.challenge.calls_per_second, config.challenge.calls_burst)
        """Challenge calls per caller (kept across listener restarts and reloads)."""
        self.driver = Driver(core, self.store, adapters.enforcer, adapters.source, adapters.flows,
                             settings=job_settings(config), clock=clock,
                             event_retention=config.gateway.event_retention,
                             keep_unpublished=bool(config.mqtt.host), max_unpublished=config.mqtt.max_unpublished)
        self.tracker: Tracker | None = None
        if adapters.source is not None:
            self.tracker = Tracker(adapters.source, self.driver, self.metrics, interface=config.wireguard.interface,
                                   poll_interval=self._poll_interval, clock=clock)
            self.driver.specs = self.tracker
        self.handshakes: HandshakeWatch | None = None
        if adapters.handshake_queue is not None and adapters.queue_rule is not None and self.tracker is not None:
            h = config.handshake
            self.handshakes = HandshakeWatch(
                self.driver, self.metrics, make_queue=adapters.handshake_queue, rule=adapters.queue_rule,
                rules=HandshakeRules(listen_port=0, queue_mark=h.queue_mark, recent_mark=h.recent_mark, rate=h.rate,
                                     burst=h.burst, recent_seconds=h.recent_seconds),
                install_rules=adapters.enforcer.set_handshake, wake_reader=self.tracker.wake.set, clock=clock)
            tracker, source, watch = self.tracker, adapters.source, self.handshakes
            assert source is not None

            async def follow() -> None:
                await watch.follow(await source.identity())

            tracker.after_read.append(follow)
        self.fleet: Fleet | None = None
        if adapters.ledger is not None:
            self.fleet = Fleet(adapters.ledger, gateway=config.gateway.id, mode=config.fleet.on_unavailable,
                               policy=lambda: self.driver.settings.attempts, submit=self.driver.submit, clock=clock)
        self.checkpointer = Checkpointer(self.store, self.driver)
        self.guard = EnforcementGuard(self.driver, table=config.enforcement.table,
                                      interval=lambda: self.config.enforcement.verify_interval, clock=clock)
        self.monitor: EnforcementMonitor | None = None
        self.publisher: OutboxPublisher | None = None
        if config.mqtt.host:
            self.publisher = OutboxPublisher(
                config.mqtt, config.gateway.id, self.store.outbox,
                lambda cursors: self.driver.submit(MarkPublished(tuple(cursors))), self.driver.events_appended)
        self.control: grpc.aio.Server | None = None
        self.challenge: grpc.aio.Server | ChallengeWorkers | None = None
        self.challenge_ports: list[int] = []
        self.challenge_bound: list[str] = []
        """The addresses the challenge listener is bound to."""
        self.control_port: int | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.ready = asyncio.Event()
        self.stopping = False
        self.first_read = asyncio.Event()
        """Set once the first read of the interface after READY was tried (it decides peers added meanwhile)."""
        self.links: LinkWatcher | None = None
        self.metrics_server: asyncio.Server | None = None
        self.started_at: float | None = None
        self.outbox: tuple[int, float | None] = (0, None)  # (unpublished, oldest time), refreshed every 2 s
        self._register_gauges()

    def _queue_rule_touched(self, who: str) -> None:
        if self.handshakes is not None:
            self.handshakes.check_rule_soon(who)

    def _poll_interval(self) -> float | str:
        configured = self.config.wireguard.poll_interval
        if configured == "auto" and self.handshakes is not None:
            # Sessions are decided at the handshake; reads are for counters, endpoints and peers others add.
            return DETECTING_POLL_INTERVAL
        return configured

    @property
    def core(self) -> GatewayState:
        """The driver's core (rebuilt from the store if the disk refused a batch)."""
        return self.driver.core

    def disk_free(self) -> float:
        """Bytes free for the database (what an unprivileged writer may use)."""
        try:
            st = os.statvfs(self.config.gateway.database.parent)
        except OSError:
            return 0.0
        return float(st.f_bavail * st.f_frsize)

    async def _watch_disk(self) -> None:
        """Warn before the disk is full (a full disk refuses writes: proofs, Disconnects, upserts)."""
        low = False
        while True:
            free = self.disk_free()
            if free < self.config.gateway.min_free_bytes and not low:
                log.warning("only %.1f MiB free for the database %s (gateway.min_free_bytes is %.1f MiB): writes will "
                            "be refused when it is full", free / 2**20, self.config.gateway.database,
                            self.config.gateway.min_free_bytes / 2**20)
            low = free < self.config.gateway.min_free_bytes
            await asyncio.sleep(10)

    async def start(self) -> None:
        self.config.gateway.database.parent.mkdir(parents=True, exist_ok=True)
        await self.store.open(init=self.init_store)
        if self.adapters.flows is not None:
            await self.adapters.flows.start()
        if self.adapters.monitor is not None:
            # Listening before the kernel is first read: a change made by someone else from then on is noticed.
            self.monitor = self.adapters.monitor(self.guard.drift, self._queue_rule_touched)
            await self.monitor.start()
            # The table is read for the reconcile (below) while the store loads.
            self.adapters.enforcer.prefetch()
        with collection_paused():
            teams, members, records = await self.store.load()
            self.core.restore(teams, members, records, now=self.clock())
            del teams, members, records
        if self.handshakes is not None and self.adapters.source is not None:
            # Bound before anything is sent to it: initiations wait here (not dropped) until the driver runs,
            # after the reconcile. The interface's key and port come first, so that the reconcile writes the
            # handshake chain with the rest of the table (a rule left by the last run keeps working throughout).
            self.handshakes.start()
            try:
                await self.handshakes.adopt(await self.adapters.source.identity())
            except OSError as exc:
                log.warning("reading %s failed: %s (handshakes are followed once it can be read)",
                            self.config.wireguard.interface, exc)
        elif self.adapters.queue_rule is not None:
            await asyncio.to_thread(self.adapters.queue_rule.remove)  # detection was turned off
        changes = await self.adapters.enforcer.reconcile(self.core.enforced_prefixes(), self.core.tracked_prefixes())
        if changes:
            log.warning("at start-up the kernel did not hold what the store says; made it so: %s", "; ".join(changes))
        self.guard.verified_at = self.clock()
        if self.handshakes is not None:
            await self.handshakes.ensure_rule()
        if self.tracker is not None:
            # The first read of the interface is compared with what was stored: peers gone meanwhile are
            # unconfigured, so that their prefixes stop being tracked.
            self.tracker.rebase()
        self._tasks.append(spawn(self.driver.run(), name="driver"))
        self._tasks.append(spawn(self.checkpointer.run(), name="checkpointer"))
        self._tasks.append(spawn(self.guard.run(), name="enforcement-guard"))
        self._tasks.append(spawn(self._watch_disk(), name="disk-watch"))
        if self.publisher is not None:
            self._tasks.append(spawn(self.publisher.run(), name="mqtt"))
        if self.fleet is not None:
            await self._join_fleet(self.fleet)
        if self.adapters.watch_links:
            self.links = LinkWatcher(self.config.wireguard.interface, self._link_changed)
            await self.links.start()
        if self.tracker is not None:
            # The first read runs right after READY (100,000 peers take seconds to read and decode): until it
            # is in, enforcement from the store holds, and tunnel traffic from an address the store does not
            # know (a peer added while gatewayd was down) is refused as undecided; a Disconnect quarantines at
            # once and drops the session keys after that read. Likewise if the interface is not there yet
            # (rtnetlink tells when it comes). Without autopoll (tests drive the reads) it runs here.
            if self.autopoll:
                self._tasks.append(spawn(self._track(self.tracker), name="tracker"))
            else:
                await self.tracker.poll_logged()
                self.first_read.set()
        if self.handshakes is not None:
            self._tasks.append(spawn(self.handshakes.run(), name="handshake-rule-check"))
        c = self.config.control
        self.authorizer = Authorizer({p: frozenset(m) for p, m in c.authorization.items()}, c.unix_principal)
        await self._start_control()
        await self._start_challenge()
        if self.config.metrics.listen:
            host, _, port = self.config.metrics.listen.rpartition(":")
            self.metrics_server = await serve_metrics(self.metrics.registry.render, host.strip("[]"), int(port))
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
        # After READY and its log line, on the loop's thread (one ~0.12 s pause): imported from a worker thread
        # instead, it made the drift repair of tests/e2e/test_drift.py miss its deadline (not understood).
        device.preload()

    async def _join_fleet(self, fleet: Fleet) -> None:
        """Read the fleet ledger before READY when etcd answers within the fleet timeout: a step-up demand written
        while this gateway was down is enforced from READY on. Otherwise READY anyway (enforcement is local), and
        the ledger is read as soon as etcd answers."""
        await fleet.ledger.start()
        try:
            await asyncio.wait_for(fleet.load(), self.config.fleet.timeout * 2)
        except (LedgerUnavailable, TimeoutError) as exc:
            log.warning("fleet: the ledger could not be read at start-up (%s); proofs are %s until it can", exc or
                        "timed out", "refused" if fleet.mode == "closed" else "decided by this gateway alone")
        self._tasks.append(spawn(fleet.run(), name="fleet"))

    def _register_gauges(self) -> None:
        r = self.metrics.registry

        r.gauge("gatewayd_sessions", "Configured peers by state",
                lambda: {(("state", s.value),): float(n) for s, n in peer_counts(self.core)[1].items()})
        r.gauge("gatewayd_quarantined_prefixes", "Prefixes in the kernel's quarantine sets",
                lambda: float(len(self.adapters.enforcer.quarantined())))
        r.gauge("gatewayd_enforcement_healthy", "1 while the kernel holds the enforcement gatewayd wants: 0 while a "
                "change failed and is retried, or a change by someone else is not yet repaired",
                lambda: float(self.guard.healthy))
        r.gauge("gatewayd_enforcement_verified_age_seconds", "Seconds since the kernel's table was last found to hold "
                "exactly the desired state", lambda: max(self.clock() - (self.guard.verified_at or self.clock()), 0.0))
        r.gauge("gatewayd_enforcement_drift_repairs", "Changes by others to the enforcement table found and repaired "
                "since start", lambda: float(self.guard.repairs))
        r.gauge("gatewayd_outbox_unpublished", "Events not yet acknowledged by the broker",
                lambda: float(self.outbox[0]) if self.publisher else 0.0)
        r.gauge("gatewayd_outbox_oldest_age_seconds", "Age of the oldest event not yet acknowledged by the broker",
                self._outbox_age)
        r.gauge("gatewayd_broker_configured", "1 when an MQTT broker is configured ([mqtt] host)",
                lambda: float(self.publisher is not None))
        r.gauge("gatewayd_broker_connected", "1 while connected to the MQTT broker",
                lambda: float(bool(self.publisher and self.publisher.connected)))
        r.gauge("gatewayd_poll_interval_seconds", "Seconds between two reads of the interface (poll_interval, "
                "or what auto chose)", lambda: self.tracker.poll_interval() if self.tracker else 0.0)
        r.gauge("gatewayd_poll_read_seconds", "How long reads of the interface keep it busy (smoothed)",
                lambda: self.tracker.read_seconds if self.tracker else 0.0)
        r.gauge("gatewayd_sqlite_wal_frames", "Pages in SQLite's write-ahead log when the latest checkpoint started",
                lambda: float(self.checkpointer.wal_frames))
        r.gauge("gatewayd_database_disk_free_bytes", "Bytes free on the database's filesystem", self.disk_free)
        r.gauge("gatewayd_database_writable", "0 after the database refused a write (a full disk), until one works",
                lambda: float(self.driver.storage_failed is None))
        r.gauge("gatewayd_sqlite_checkpoint_failures", "Checkpoints that failed and were retried",
                lambda: float(self.checkpointer.failures))
        r.gauge("gatewayd_handshake_detection", "1 while handshake initiations are decided as they arrive (queue "
                "bound, rules installed for the interface's port); 0 while off or the interface is not read yet",
                lambda: float(bool(self.handshakes and self.handshakes.listen_port)))
        r.gauge("gatewayd_handshake_queue_overflows", "Times the kernel could not hand queued initiations over "
                "(dropped; clients retry)", lambda: float(self.handshakes.queue.overflows if self.handshakes else 0))
        r.gauge("gatewayd_batch_phase_seconds", "Time spent in each phase of the latest driver batch",
                lambda: {(("phase", k),): v for k, v in self.driver.last_batch.items()})
        fleet = self.fleet
        if fleet is not None:
            r.gauge("gatewayd_fleet_ledger_watching", "1 while the fleet ledger (etcd) is followed live; 0 while it "
                    "cannot be reached (proofs are then refused, or decided locally with on_unavailable = local)",
                    lambda: float(fleet.watching))
            r.gauge("gatewayd_fleet_unavailable_refusals", "Proofs refused since start because the fleet ledger "
                    "could not be reached", lambda: float(fleet.unavailable_refusals))
            r.gauge("gatewayd_fleet_local_decisions", "Proofs decided by this gateway alone since start because the "
                    "fleet ledger could not be reached (on_unavailable = local)", lambda: float(fleet.local_decisions))

    async def _refresh_outbox_stats(self) -> None:
        while True:
            self.outbox = await self.store.outbox.stats()
            await asyncio.sleep(2.0)

    def _outbox_age(self) -> float:
        return max(self.clock() - self.outbox[1], 0.0) if self.publisher and self.outbox[1] else 0.0

    def status(self) -> StatusSnapshot:
        present, counts = peer_counts(self.core)
        return StatusSnapshot(
            gateway_id=self.config.gateway.id, started_at=self.started_at, interface=self.config.wireguard.interface,
            peers_configured=present, authorized=counts[PeerState.AUTHORIZED],
            quarantined=counts[PeerState.QUARANTINED], locked=counts[PeerState.LOCKED],
            quarantined_prefixes=len(self.adapters.enforcer.quarantined()),
            enforcement_healthy=self.guard.healthy, enforcement_verified_at=self.guard.verified_at,
            broker_configured=self.publisher is not None,
            broker_connected=bool(self.publisher and self.publisher.connected),
            outbox_unpublished=self.outbox[0] if self.publisher else 0,
            outbox_oldest_age=self._outbox_age(),
            last_poll=self.tracker.last_poll if self.tracker else None, members=len(self.core.members),
            teams=len(self.core.teams))

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
                ControlService(self.driver, self.metrics, self.status, self._snapshot, self.fleet),
                tcp=c.listen or None,
                tls=tls,
                unix_socket=c.unix_socket,
                unix_mode=c.unix_socket_mode, authorizer=self.authorizer, limits=self._limits(),
                foreground=self.driver.foreground)

    def challenge_addresses(self) -> list[str]:
        """Where the challenge listener binds: the configured addresses, or else the WireGuard interface's own
        (link-local excluded: a caller's tunnel source address identifies it, and those are routable ones)."""
        if self.config.challenge.listen:
            return list(self.config.challenge.listen)
        port = self.config.challenge.port
        out = []
        for entry in interface_addresses(self.config.wireguard.interface):
            ip = ipaddress.ip_interface(entry).ip
            if ip.is_link_local:
                continue
            out.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
        return sorted(out)

    async def _start_challenge(self) -> None:
        addresses = self.challenge_addresses()
        self.challenge_bound = addresses
        if not addresses:
            log.warning("challenge listener not bound: %s has no addresses yet (it is bound when they appear)",
                        self.config.wireguard.interface)
            return
        servicer = ChallengeService(self.driver, self.metrics, self.fleet, self.call_rate)
        if self.config.challenge.workers:
            workers = ChallengeWorkers(challenge_methods(servicer, self._limits(), self.driver.foreground),
                                       self.config.challenge.workers, self.config.control.max_message_bytes)
            self.challenge_ports = await workers.start(addresses)
            self.challenge = workers
        else:
            self.challenge, self.challenge_ports = await challenge_server(
                servicer, addresses, self._limits(), foreground=self.driver.foreground)

    async def _rebind_challenge(self) -> None:
        """The interface's addresses changed: follow them if the challenge listener is bound to them."""
        if self.config.challenge.listen or self.challenge_addresses() == self.challenge_bound:
            return
        if self.challenge is not None:
            await self.challenge.stop(SHUTDOWN_GRACE)
        self.challenge = None
        await self._start_challenge()
        log.info("challenge listener rebound to %s", ", ".join(self.challenge_bound) or "nothing")

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 only while the driver makes progress: a heartbeat job must get through it in time."""
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self.driver.submit(Heartbeat()), interval)
            except TimeoutError:
                log.error("driver made no progress for %.1f s: withholding the watchdog ping", interval)
                continue
            if self.stopping:
                return  # STOPPING=1 was sent: from then on systemd's stop timeout applies, not the watchdog
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
                ("handshake", self.config.handshake, new.handshake),
                ("challenge.port", self.config.challenge.port, new.challenge.port),
                ("mqtt", self.config.mqtt, new.mqtt),
                ("fleet", self.config.fleet, new.fleet),
            ) if old != cur]
            if fixed:
                raise ConfigError(fixed[0], "cannot change while running; restart gatewayd")
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            await self.driver.submit(Note(type="config.reload_refused", subject=f"gateway/{self.config.gateway.id}",
                                          data={"reason": str(exc)}))
            return False
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        old, self.config = self.config, new
        self.driver.settings = job_settings(new)
        self.core.config = core_config(new, detection=self.handshakes is not None)
        self.driver.event_retention = new.gateway.event_retention
        self.call_rate.rate, self.call_rate.burst = new.challenge.calls_per_second, new.challenge.calls_burst
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
        if old.challenge.listen != new.challenge.listen or old.challenge.workers != new.challenge.workers:
            if self.challenge is not None:
                await self.challenge.stop(SHUTDOWN_GRACE)
            self.challenge = None
            await self._start_challenge()
            rebound.append("challenge")
        await self.driver.submit(Note(type="config.reloaded", subject=f"gateway/{new.gateway.id}",
                                      data={"listeners_rebound": rebound}))
        notify("READY=1\nSTATUS=enforcing (configuration reloaded)")
        log.info("configuration reloaded%s", f"; rebound {', '.join(rebound)}" if rebound else "")
        return True

    def _snapshot(self, public_key: str) -> PeerSnapshot | None:
        return self.tracker.spec(public_key) if self.tracker else None

    def _link_changed(self, kind: str, fields: dict[str, Any]) -> None:
        """rtnetlink saw the interface or its addresses change: record it and re-read the peers now."""
        log.info("interface %s: %s %s", self.config.wireguard.interface, kind, fields)
        spawn(self.driver.submit(Note(type=f"interface.{kind}", subject=f"interface/{fields['interface']}",
                                      data=fields)), name="link-event")
        if self.tracker is not None:
            self.tracker.wake.set()
        if kind.startswith(("address.", "link.")):
            spawn(self._rebind_challenge(), name="challenge-rebind")

    async def _track(self, tracker: Tracker) -> None:
        await tracker.poll_logged()
        self.first_read.set()
        await tracker.run()

    async def stop(self) -> None:
        self.stopping = True
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
        if self.handshakes is not None:
            # The queue rule stays: with daemon_down = "closed" initiations are dropped until gatewayd is back.
            self.handshakes.close()
        if self.adapters.flows is not None:
            await self.adapters.flows.close()
        if self.links is not None:
            await self.links.close()
        if self.monitor is not None:
            await self.monitor.close()
        if self.fleet is not None:
            await self.fleet.ledger.close()
        await self.store.close()
        log.info("gatewayd stopped; quarantine left in place")

    async def serve(self, stop: asyncio.Event) -> None:
        """Start, run until `stop` is set or a task fails, stop. A stop request during start-up is honoured at
        once; whatever start-up opened is closed however it ends."""
        waiter = spawn(stop.wait(), name="stop-signal")
        starting = spawn(self.start(), name="start", awaited=True)
        try:
            await asyncio.wait([waiter, starting], return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("stop requested during start-up")
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                return
            starting.result()
            await asyncio.wait([waiter, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in self._tasks:
                if task.done() and task.exception() is not None:
                    raise RuntimeError(f"{task.get_name()} failed") from task.exception()
        finally:
            waiter.cancel()
            await self.stop()
