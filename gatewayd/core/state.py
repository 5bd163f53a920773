"""The gateway's state machine. Everything that changes a peer's enforcement state lives in this file.

A peer's state moves only through `TRANSITIONS`; any other move is a bug and raises. A peer that owes a
proof leaves quarantine only through SATISFY, which requires an accepted proof of every owed kind, each
verified no earlier than the demand it answers. WAIVE exists for one case only: a peer locked solely because
no member was mapped to it (it owed nothing) that gets mapped to a member who owes nothing on connection.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from gatewayd.core import events as ev
from gatewayd.core import policy
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
from gatewayd.core.model import (
    FACTOR_PROVES,
    NO_PROOFS,
    LockedReason,
    Member,
    Peer,
    PeerRecord,
    PeerState,
    TeamPolicy,
)

# WireGuard protocol timers (whitepaper, section 6.1).
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_TIMEOUT = 5.0
RETRY_WINDOW = REKEY_TIMEOUT + 1.0
"""A client retries an unanswered initiation after REKEY_TIMEOUT plus up to 1/3 s of jitter."""
EARLIEST_REKEY = REKEY_AFTER_TIME - REKEY_TIMEOUT
"""A running client rekeys once its keys are REKEY_AFTER_TIME old; the gateway dates the keys from the
initiation, a round trip before the client does, so a margin keeps timer and path jitter from looking early."""


class Trigger(enum.Enum):
    ADMIT = "admit"
    """Nothing is owed: forward the peer's traffic."""
    DEMAND = "demand"
    """A proof is owed and the member can give it."""
    LOCK = "lock"
    """A proof is owed that cannot be given now, or no member is mapped."""
    SATISFY = "satisfy"
    """Every owed proof was accepted after the demand."""
    WAIVE = "waive"
    """A peer that owed nothing (locked only as unmapped) was mapped to a member who owes nothing."""


A, Q, L = PeerState.AUTHORIZED, PeerState.QUARANTINED, PeerState.LOCKED

TRANSITIONS: dict[tuple[PeerState | None, Trigger], PeerState] = {
    (None, Trigger.ADMIT): A,
    (A, Trigger.ADMIT): A,
    (None, Trigger.DEMAND): Q,
    (A, Trigger.DEMAND): Q,
    (Q, Trigger.DEMAND): Q,
    (L, Trigger.DEMAND): Q,
    (None, Trigger.LOCK): L,
    (A, Trigger.LOCK): L,
    (Q, Trigger.LOCK): L,
    (L, Trigger.LOCK): L,
    (Q, Trigger.SATISFY): A,
    (L, Trigger.WAIVE): A,
}


class CoreBug(Exception):
    """The core was driven in a way its own rules forbid (our bug, not the caller's input)."""


@dataclass(frozen=True, kw_only=True)
class CoreConfig:
    quarantine_unknown_peers: bool = True
    """Peers not mapped to any member are locked in quarantine."""
    handshake_detection: bool = False
    """Handshake initiations arrive as HandshakeInitiated events (the handshake queue): they decide when a
    client's session starts, and a read of the interface no longer guesses restarts from handshake times."""
    new_endpoint_is_new_session: bool = True
    """An initiation from another endpoint than the session's starts a new session (another machine may hold
    the key)."""


class SessionStart(enum.Enum):
    """Why a handshake initiation starts a new session."""

    NO_SESSION = "no_session"
    """No live session: the first handshake, or the first after the session ended."""
    NEW_ENDPOINT = "new_endpoint"
    """From another endpoint than the live session's."""
    EARLY = "early"
    """Earlier than any rekey of the live session's keys can come: the client restarted."""
    IDLE = "idle"
    """Late enough for a rekey, but the endpoint sent no data lately: a running client rekeys because it sends,
    so this client has no keys to send with (it restarted)."""
    UNANSWERED = "unanswered"
    """The gateway's WireGuard initiates within a live session, earlier than its own rekey or without data from
    the client lately: the client stopped answering (restarted, or its path broke) and whoever answers now
    starts a new session."""


@dataclass(frozen=True, kw_only=True)
class DisconnectOutcome:
    """The answer to a DisconnectRequested."""

    sessions_cut: int
    """Peers whose live session was cut."""
    peers_quarantined: int
    """Peers now owing a proof because of the request."""
    cause: str | None
    """"unknown_subject" or "session_context_not_found" when nothing matched."""
    warnings: tuple[str, ...]
    """Warnings for the caller."""


@dataclass(frozen=True, kw_only=True)
class PolicyOutcome:
    """The answer to a TeamPolicyApplied."""

    peers_quarantined: int
    """Peers that owe a proof because of the new policy."""
    warnings: tuple[str, ...]
    """Warnings for the caller."""


def no_connection_policy_warning(team_id: str) -> str:
    return (
        f"team {team_id!r} has neither totp_prior_connection nor device_prior_connection: its client apps "
        "will not prompt by themselves after a Disconnect; the gateway still holds the peers in quarantine "
        "until the member proves"
    )


class GatewayState:
    """All peers, members and team policies of one gateway, and the rules that move peers between states."""

    def __init__(self, config: CoreConfig | None = None) -> None:
        self.config = config or CoreConfig()
        self.teams: dict[str, TeamPolicy] = {}
        self.members: dict[str, Member] = {}
        self.peers: dict[str, Peer] = {}
        # Which peers list a prefix. WireGuard gives a prefix to one peer, but a poll can catch it moving: the
        # one holder's key as it is (a set per prefix would cost ~220 bytes a peer), a set only while several.
        self._listed: dict[str, str | set[str]] = {}
        self._subnets: dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None
        """peer_for_address's index of the listed subnet prefixes; None: to be rebuilt."""
        self._timers: list[tuple[float, str]] = []

    # ---- restoring and reading --------------------------------------------------------------------

    def restore(
        self, teams: Iterable[TeamPolicy], members: Iterable[Member], records: Iterable[PeerRecord],
        now: float | None = None,
    ) -> None:
        """Load persisted state. Only valid on a fresh GatewayState. With `now`, a peer whose stored handshake
        is younger than REJECT_AFTER_TIME keeps its session live (its next rekey is not a new session)."""
        if self.peers or self.members or self.teams:
            raise CoreBug("restore on a used GatewayState")
        for team in teams:
            self.teams[team.team_id] = team
        for member in members:
            self.members[member.member_id] = member
        listed = self._listed
        for rec in records:
            peer = Peer(
                public_key=rec.public_key,
                allowed_ips=rec.allowed_ips,
                state=rec.state,
                owes=rec.owes,
                owes_since=rec.owes_since,
                proven_at=rec.proven_at,
                admitted_at=rec.admitted_at,
                locked_reason=rec.locked_reason,
                session_started_at=rec.session_started_at,
                last_handshake=rec.last_handshake,
                session_live=now is not None and rec.last_handshake is not None
                and now < rec.last_handshake + REJECT_AFTER_TIME,
                step_up=rec.step_up,
                endpoint=rec.endpoint,
                # Assumed still configured until the first read of the interface says otherwise.
                present=bool(rec.allowed_ips),
            )
            self.peers[rec.public_key] = peer
            key = rec.public_key
            for p in rec.allowed_ips:  # _list's bookkeeping without its commands (100,000 peers: 0.2 s less)
                holders = listed.get(p)
                if holders is None:
                    listed[p] = key
                elif isinstance(holders, set):
                    holders.add(key)
                elif holders != key:
                    listed[p] = {holders, key}
        self._subnets = None
        # Every key a member lists has a Peer (until the member lets go of it), which names the member: that
        # is the one key -> member map (no second dict of 100,000 entries).
        for member in self.members.values():
            for key in member.peers:
                owned = self.peers.get(key)
                if owned is None:
                    owned = self.peers[key] = Peer(public_key=key)
                owned.member_id = member.member_id
        # Timers only where _deadline can give one (a live session, or an authorized peer of a team that
        # re-verifies): 100,000 restored peers without either cost no lookups.
        reverifying = {t.team_id for t in self.teams.values() if t.reverify_interval}
        for peer in self.peers.values():
            if peer.session_live or (reverifying and peer.state is A):
                self._arm(peer)

    def tracked_prefixes(self) -> set[str]:
        """Every prefix of a configured, decided peer."""
        peers = self.peers
        out = set()
        for p, holders in self._listed.items():
            for k in (holders,) if isinstance(holders, str) else holders:
                peer = peers[k]
                if peer.present and peer.state is not None:
                    out.add(p)
                    break
        return out

    def enforced_prefixes(self) -> set[str]:
        """Every prefix that belongs in the quarantine sets now."""
        return {p for peer in self.peers.values() if peer.enforced for p in peer.allowed_ips}

    def team_prefixes(self, team_id: str) -> list[str]:
        """The tunnel prefixes of the configured peers of a team's members (what a team Disconnect quarantines)."""
        return [p for m in self.members.values() if m.team_id == team_id for k in m.peers
                if (peer := self.peers.get(k)) is not None and peer.present for p in peer.allowed_ips]

    def peer_for_address(self, address: str) -> Peer | None:
        """The configured peer whose allowed IPs contain `address` (a tunnel source address): a host prefix by
        its key, else the longest subnet prefix that contains it (looked up among subnet prefixes only: an
        address no peer holds must not cost a walk over 100,000 peers, it is the caller anyone can be)."""
        # as caller_address writes it, before parsing it; then in canonical form
        peer = self._present_holder(f"{address}/{128 if ':' in address else 32}")
        if peer is not None:
            return peer
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        peer = self._present_holder(f"{ip}/{ip.max_prefixlen}")
        if peer is not None:
            return peer
        best: tuple[int, Peer] | None = None
        for prefix, net in self._subnet_index().items():
            if (ip.version == net.version and ip in net and (best is None or net.prefixlen > best[0])
                    and (holder := self._present_holder(prefix)) is not None):
                best = (net.prefixlen, holder)
        return best[1] if best else None

    def _present_holder(self, prefix: str) -> Peer | None:
        """A peer on the interface that lists `prefix`."""
        for key in self._holders(prefix):
            if self.peers[key].present:
                return self.peers[key]
        return None

    def _subnet_index(self) -> dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The listed prefixes that are not host prefixes, parsed; rebuilt after one was listed or dropped."""
        if self._subnets is None:
            self._subnets = {p: ipaddress.ip_network(p, strict=False) for p in self._listed if not _is_host(p)}
        return self._subnets

    def member_of(self, peer: Peer) -> Member | None:
        return self.members.get(peer.member_id) if peer.member_id else None

    def policy_of(self, member: Member | None) -> TeamPolicy | None:
        return self.teams.get(member.team_id) if member else None

    # ---- the timer --------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `handle_timer` must next be called, or None."""
        while self._timers:
            when, key = self._timers[0]
            peer = self.peers.get(key)
            if peer is not None and self._deadline(peer) == when:
                return when
            heapq.heappop(self._timers)
        return None

    def handle_timer(self, now: float) -> list[Command]:
        out: list[Command] = []
        while (when := self.next_deadline()) is not None and when <= now:
            _, key = heapq.heappop(self._timers)
            peer = self.peers[key]
            clock = peer.session_clock
            if peer.session_live and clock is not None and now >= clock + REJECT_AFTER_TIME:
                self._end_session(peer, now, out)
            self._reverify_if_stale(peer, now, out)
            self._arm(peer)
        return out

    def _deadline(self, peer: Peer) -> float | None:
        candidates = []
        clock = peer.session_clock
        if peer.session_live and clock is not None:
            candidates.append(clock + REJECT_AFTER_TIME)
        interval = self._reverify_interval(peer)
        since = peer.verified_since
        if peer.state is A and interval and since is not None:
            candidates.append(since + interval)
        return min(candidates) if candidates else None

    def _arm(self, peer: Peer) -> None:
        when = self._deadline(peer)
        if when is not None:
            heapq.heappush(self._timers, (when, peer.public_key))

    def _reverify_interval(self, peer: Peer) -> float:
        team = self.policy_of(self.member_of(peer))
        return team.reverify_interval if team else 0.0

    # ---- events -----------------------------------------------------------------------------------

    def disconnect(self, e: ev.DisconnectRequested, now: float) -> tuple[DisconnectOutcome, list[Command]]:
        """A Disconnect, with its answer for the caller."""
        out: list[Command] = []
        return self._on_disconnect(e, now, out), out

    def apply_policy(self, e: ev.TeamPolicyApplied, now: float) -> tuple[PolicyOutcome, list[Command]]:
        """A new team policy, with its answer for the caller."""
        out: list[Command] = []
        return self._on_policy(e, now, out), out

    def initiated(self, e: ev.HandshakeInitiated, now: float) -> tuple[SessionStart | None, list[Command]]:
        """A handshake initiation waiting for its verdict; the answer says whether (and why) it starts a new
        session. The commands quarantine the peer if that session owes a proof: run them before the verdict."""
        out: list[Command] = []
        return self._on_initiation(e, now, out), out

    def accept_proof(self, e: ev.ProofAccepted, now: float) -> tuple[bool, list[Command]]:
        """A verified factor; the answer says whether it counted toward the peer's demand."""
        out: list[Command] = []
        return self._on_proof_accepted(e, now, out), out

    def handle(self, event: ev.Event, now: float) -> list[Command]:
        """Feed one event; returns the commands to execute, in order. (For a request whose caller waits
        for an answer, use `disconnect`, `apply_policy` or `accept_proof`.)"""
        out: list[Command] = []
        match event:
            case ev.PeerConfigured():
                self._on_peer_configured(event, now, out)
            case ev.PeerUnconfigured():
                self._on_peer_unconfigured(event, out)
            case ev.HandshakeSeen():
                self._on_handshake(event, now, out)
            case ev.HandshakeInitiated():
                self._on_initiation(event, now, out)
            case ev.EndpointChanged():
                self._on_endpoint(event, out)
            case ev.DisconnectRequested():
                self._on_disconnect(event, now, out)
            case ev.StepUpDemanded():
                self._on_step_up_demanded(event, now, out)
            case ev.TeamPolicyApplied():
                self._on_policy(event, now, out)
            case ev.MemberUpserted():
                self._on_member_upserted(event, now, out)
            case ev.MemberRemoved():
                self._on_member_removed(event, now, out)
            case ev.ProofAccepted():
                self._on_proof_accepted(event, now, out)
            case ev.ProofRefused():
                self._on_proof_refused(event, out)
            case _:
                raise CoreBug(f"unknown event {event!r}")
        return out

    def _on_peer_configured(self, e: ev.PeerConfigured, now: float, out: list[Command]) -> None:
        peer = self.peers.get(e.public_key)
        if peer is None:
            # A key no Peer holds is no member's (members' keys always have one).
            peer = self.peers[e.public_key] = Peer(public_key=e.public_key)
        was_present, old_ips = peer.present, peer.allowed_ips
        peer.present = True
        self._list(peer, tuple(e.allowed_ips), out)
        if e.endpoint is not None:
            peer.endpoint = e.endpoint
        if peer.enforced:
            added = tuple(p for p in peer.allowed_ips if p not in old_ips)
            removed = tuple(p for p in old_ips if p not in peer.allowed_ips)
            if added:
                out.append(Quarantine(prefixes=added))
            self._release(peer, removed, out)
        if not was_present:
            out.append(self._publish("peer.configured", peer, allowed_ips=list(peer.allowed_ips)))
        if peer.state is None:
            self._reassess(peer, now, out)
        else:
            out.append(self._save(peer))

    def _on_peer_unconfigured(self, e: ev.PeerUnconfigured, out: list[Command]) -> None:
        peer = self.peers.get(e.public_key)
        if peer is None or not peer.present:
            return
        old_ips = peer.allowed_ips
        peer.present, peer.session_live = False, False
        self._list(peer, (), out)
        if peer.enforced:
            self._release(peer, old_ips, out)
        out.append(self._publish("peer.unconfigured", peer))
        if peer.member_id is None and not peer.owes:
            del self.peers[peer.public_key]
            out.append(ForgetPeer(public_key=peer.public_key))
            return
        # Keep the demand: a peer that comes back still owes what it owed. Its prefixes are forgotten so
        # that they can be reused by another peer.
        out.append(self._save(peer))

    def _on_handshake(self, e: ev.HandshakeSeen, now: float, out: list[Command]) -> None:
        peer = self.peers.get(e.public_key)
        if peer is None or (peer.last_handshake is not None and e.at <= peer.last_handshake):
            return
        previous = peer.last_handshake if peer.session_live else None
        peer.last_handshake = e.at
        if self.config.handshake_detection and peer.keys_at is not None:
            # Client initiations were decided as they arrived. A handshake while no session was live is one the
            # gateway initiated: a new session.
            new_session = not peer.session_live
        else:
            # (No initiation of this peer seen since start-up.) A rekey comes no earlier than REKEY_AFTER_TIME
            # into a live session. Anything else is a new session: the first after an expiry, or a client that
            # restarted and handshook afresh.
            new_session = previous is None or e.at - previous < REKEY_AFTER_TIME
        peer.session_live = now < (peer.session_clock or e.at) + REJECT_AFTER_TIME
        if new_session:
            self._start_session(peer, e.at, now, out)
        out.append(self._save(peer))
        self._arm(peer)

    def _start_session(self, peer: Peer, at: float, now: float, out: list[Command], **data: object) -> None:
        peer.session_started_at = at
        out.append(self._publish("session.started", peer, handshake_at=at, **data))
        if peer.state is A:
            member = self.member_of(peer)
            demand = policy.for_new_session(
                self.policy_of(member), member, quarantine_unknown=self.config.quarantine_unknown_peers)
            if not demand.nothing:
                self._require(peer, demand, now, out, step_up=False)

    def _on_initiation(self, e: ev.HandshakeInitiated, now: float, out: list[Command]) -> SessionStart | None:
        peer = self.peers.get(e.public_key)
        if peer is None or not peer.present:
            return None  # not a peer of the interface: WireGuard drops it
        if not e.by_gateway:
            if e.stamp <= peer.initiation_stamp:
                return None  # a replay: WireGuard drops it too
            peer.initiation_stamp = e.stamp
        previous, peer.last_initiation = peer.last_initiation, e.at
        retry = previous is not None and 0 <= e.at - previous < RETRY_WINDOW
        start = self._session_start(peer, e, retry)
        old_endpoint = peer.endpoint
        if not e.by_gateway:
            peer.endpoint = e.endpoint
        if start is None:
            if not (retry and peer.rekeying):
                peer.keys_at = e.at
            peer.rekeying = True
            self._arm(peer)
            return None
        peer.keys_at, peer.rekeying, peer.session_live = e.at, False, True
        if retry and peer.enforced:
            return start  # a retry of an initiation that already started this session
        self._start_session(peer, e.at, now, out, reason=start.value, endpoint=e.endpoint,
                            previous_endpoint=old_endpoint, initiated_by="gateway" if e.by_gateway else "client")
        out.append(self._save(peer))
        self._arm(peer)
        return start

    def _session_start(self, peer: Peer, e: ev.HandshakeInitiated, retry: bool) -> SessionStart | None:
        """The rule for a new session (README, "How sessions are detected")."""
        keys = peer.session_clock
        if not peer.session_live or keys is None or e.at - keys >= REJECT_AFTER_TIME:
            return SessionStart.NO_SESSION
        if (not e.by_gateway and self.config.new_endpoint_is_new_session and peer.endpoint is not None
                and e.endpoint != peer.endpoint):
            return SessionStart.NEW_ENDPOINT
        if retry and peer.rekeying and e.recent_data:
            return None  # a retried rekey (the answer was lost) while the client still sends on its keys
        if e.at - keys < EARLIEST_REKEY:
            return SessionStart.UNANSWERED if e.by_gateway else SessionStart.EARLY
        if not e.recent_data:
            return SessionStart.UNANSWERED if e.by_gateway else SessionStart.IDLE
        return None

    def _on_endpoint(self, e: ev.EndpointChanged, out: list[Command]) -> None:
        peer = self.peers.get(e.public_key)
        if peer is None or peer.endpoint == e.endpoint:
            return
        old, peer.endpoint = peer.endpoint, e.endpoint
        out.append(self._publish("endpoint.changed", peer, old=old, new=e.endpoint))
        if peer.state is not None:
            out.append(self._save(peer))

    def _end_session(self, peer: Peer, now: float, out: list[Command]) -> None:
        peer.session_live = False
        out.append(self._publish("session.ended", peer, last_handshake=peer.last_handshake))
        if peer.state is A:
            # The next session must pay before its first packet: demand now, while nothing flows.
            member = self.member_of(peer)
            demand = policy.for_new_session(
                self.policy_of(member), member, quarantine_unknown=self.config.quarantine_unknown_peers
            )
            if not demand.nothing:
                self._require(peer, demand, now, out, step_up=False)
        out.append(self._save(peer))

    def _reverify_if_stale(self, peer: Peer, now: float, out: list[Command]) -> None:
        interval = self._reverify_interval(peer)
        since = peer.verified_since
        if peer.state is A and interval and since is not None and now >= since + interval:
            member = self.member_of(peer)
            self._require(peer, policy.for_step_up(self.policy_of(member), member), now, out, step_up=True)
            out.append(self._publish("peer.reverify_due", peer, proven_at=peer.proven_at))

    def _targets(self, member_id: str | None, public_key: str | None, team_id: str | None
                 ) -> tuple[bool, list[tuple[Member | None, list[Peer]]]]:
        """Whether the subject is known, and the peers it names grouped by member."""
        if team_id is not None:
            members = [m for m in self.members.values() if m.team_id == team_id]
            known = bool(members) or team_id in self.teams
            return known, [(m, [self.peers[k] for k in sorted(m.peers) if k in self.peers]) for m in members]
        if member_id is not None:
            member = self.members.get(member_id)
            if member is None:
                return False, []
            return True, [(member, [self.peers[k] for k in sorted(member.peers) if k in self.peers])]
        peer = self.peers.get(public_key or "")
        return (True, [(self.member_of(peer), [peer])]) if peer else (False, [])

    def _on_step_up_demanded(self, e: ev.StepUpDemanded, now: float, out: list[Command]) -> None:
        known, groups = self._targets(e.member_id, e.public_key, e.team_id)
        if not known:
            return

        def owes_it(peer: Peer) -> bool:
            """Whether the peer must still pay this demand: nothing proven since, and not owing since."""
            if peer.proven_at is not None and peer.proven_at >= e.after:
                return False
            return not (peer.enforced and peer.owes_since is not None and peer.owes_since >= e.after)

        due = [(m, [p for p in peers if owes_it(p)]) for m, peers in groups]
        self._step_up(due, now, out, "fleet.demand_applied", {"reason": e.reason, "by": e.by, "after": e.after})

    def _on_disconnect(self, e: ev.DisconnectRequested, now: float, out: list[Command]
                       ) -> DisconnectOutcome:
        known, groups = self._targets(e.member_id, e.public_key, e.team_id)
        if not known:
            return DisconnectOutcome(
                sessions_cut=0, peers_quarantined=0, cause="unknown_subject", warnings=())
        if not any(peers for _, peers in groups):
            return DisconnectOutcome(
                sessions_cut=0, peers_quarantined=0, cause="session_context_not_found", warnings=())
        return self._step_up(groups, now, out, "disconnect.executed",
                             {"reason": e.reason, **({"team_id": e.team_id} if e.team_id else {})})

    def _step_up(self, groups: list[tuple[Member | None, list[Peer]]], now: float, out: list[Command], event: str,
                 details: dict[str, object]) -> DisconnectOutcome:
        """Quarantine the peers until they prove, cutting their sessions; one event per member."""
        warnings: list[str] = []
        cut = quarantined = 0
        for member, targets in groups:
            if not targets:
                continue
            team = self.policy_of(member)
            if member is not None and (team is None or not team.named_proofs()):
                warnings.append(no_connection_policy_warning(member.team_id))
            member_cut = 0
            demand = policy.for_step_up(team, member)
            for peer in targets:
                # disconnect.executed lists the peers: no peer.quarantined event per peer.
                self._require(peer, demand, now, out, step_up=True, announce=False)
                if demand.locked is not None:
                    warnings.append(f"peer {peer.public_key} is locked in quarantine: {demand.locked.value}")
                if peer.present:
                    out.append(ResetPeerSession(public_key=peer.public_key))
                    if peer.allowed_ips:
                        out.append(FlushFlows(prefixes=peer.allowed_ips))
                    if peer.session_live:
                        member_cut += 1
                    peer.session_live = False
                out.append(self._save(peer))
            cut += member_cut
            quarantined += len(targets)
            subject = f"member/{member.member_id}" if member else f"peer/{targets[0].public_key}"
            out.append(Publish(type=event, subject=subject, data={
                **details, "peers": [p.public_key for p in targets], "sessions_cut": member_cut}))
        unique = tuple(dict.fromkeys(warnings))
        if len(unique) > 20:
            unique = (*unique[:20], f"... and {len(unique) - 20} more warnings")
        return DisconnectOutcome(sessions_cut=cut, peers_quarantined=quarantined, cause=None, warnings=unique)

    def _on_policy(self, e: ev.TeamPolicyApplied, now: float, out: list[Command]) -> PolicyOutcome:
        team = e.policy
        current = self.teams.get(team.team_id)
        if current is not None and team.version <= current.version:
            raise CoreBug("stale policy must be refused before it reaches the core")
        self.teams[team.team_id] = team
        out.append(Publish(type="policy.applied", subject=f"team/{team.team_id}", data={
            "version": team.version,
            "scope": team.scope.value,
            "roles": team.roles.value,
            "totp_prior_connection": team.totp_prior_connection,
            "device_prior_connection": team.device_prior_connection,
            "reverify_interval_seconds": team.reverify_interval,
        }))
        quarantined = 0
        for member in self.members.values():
            if member.team_id != team.team_id:
                continue
            for key in sorted(member.peers):
                peer = self.peers.get(key)
                if peer is None:
                    continue
                if peer.state is A and peer.present:
                    demand = policy.for_new_session(team, member,
                                                    quarantine_unknown=self.config.quarantine_unknown_peers)
                    proven_now = (peer.proven_at is not None and peer.session_started_at is not None
                                  and peer.proven_at >= peer.session_started_at)
                    if demand.owes and not proven_now:
                        self._require(peer, demand, now, out, step_up=False)
                        quarantined += 1
                        out.append(self._save(peer))
                else:
                    self._reassess(peer, now, out)
                self._arm(peer)
        warnings = () if team.named_proofs() else (no_connection_policy_warning(team.team_id),)
        return PolicyOutcome(peers_quarantined=quarantined, warnings=warnings)

    def _on_member_upserted(self, e: ev.MemberUpserted, now: float, out: list[Command]) -> None:
        member = e.member
        for key in member.peers:
            held = self.peers.get(key)
            if held is not None and held.member_id is not None and held.member_id != member.member_id:
                raise CoreBug("a peer key mapped to two members must be refused at the edge")
        old = self.members.get(member.member_id)
        self.members[member.member_id] = member
        touched: set[str] = set(member.peers)
        if old is not None:
            touched.update(old.peers)
        out.append(Publish(type="member.upserted", subject=f"member/{member.member_id}", data={
            "team_id": member.team_id,
            "role": member.role.value,
            "peers": sorted(member.peers),
            "factors": sorted(f.value for f in member.factors),
            "locked": member.locked,
        }))
        for key in sorted(touched):
            peer = self.peers.get(key)
            if peer is None:
                if key not in member.peers:
                    continue
                peer = self.peers[key] = Peer(public_key=key)
            if key in member.peers:
                peer.member_id = member.member_id
            elif peer.member_id == member.member_id:
                peer.member_id = None  # a key the member no longer lists
            self._reassess(peer, now, out)

    def _on_member_removed(self, e: ev.MemberRemoved, now: float, out: list[Command]) -> None:
        member = self.members.pop(e.member_id, None)
        if member is None:
            return
        out.append(Publish(type="member.removed", subject=f"member/{member.member_id}", data={}))
        for key in sorted(member.peers):
            peer = self.peers.get(key)
            if peer is None:
                continue
            peer.member_id = None
            if not peer.present and not peer.owes:
                del self.peers[key]
                out.append(ForgetPeer(public_key=key))
                continue
            self._reassess(peer, now, out)

    def _on_proof_accepted(self, e: ev.ProofAccepted, now: float, out: list[Command]) -> bool:
        peer = self.peers.get(e.public_key)
        kind = FACTOR_PROVES[e.factor]
        if peer is None or peer.state is not Q or kind not in peer.owes:
            return False
        if peer.owes_since is None or e.verified_at < peer.owes_since:
            # Verified before the current demand: it answers an older one.
            return False
        peer.proofs = {**peer.proofs, kind: e.verified_at}
        out.append(self._publish("proof.accepted", peer, factor=e.factor.value, kind=kind.value))
        if peer.owes <= peer.proofs.keys():
            peer.proven_at = now
            self._transition(peer, Trigger.SATISFY, out)
            peer.owes, peer.owes_since, peer.proofs, peer.step_up = frozenset(), None, NO_PROOFS, False
            out.append(self._publish("peer.released", peer))
        out.append(self._save(peer))
        self._arm(peer)
        return True

    def _on_proof_refused(self, e: ev.ProofRefused, out: list[Command]) -> None:
        peer = self.peers.get(e.public_key)
        if peer is None:
            return
        out.append(self._publish("proof.refused", peer, factor=e.factor.value, reason=e.reason,
                                 failures=e.failures))

    # ---- helpers ----------------------------------------------------------------------------------

    def _reassess(self, peer: Peer, now: float, out: list[Command]) -> None:
        """Decide or re-decide a peer's state after its member, team or presence changed."""
        member = self.member_of(peer)
        team = self.policy_of(member)
        unknown = self.config.quarantine_unknown_peers
        if peer.state is None or (peer.enforced and not peer.owes):
            demand = policy.for_new_session(team, member, quarantine_unknown=unknown)
            if demand.nothing:
                if peer.state is not A:
                    peer.admitted_at = now
                self._transition(peer, Trigger.WAIVE if peer.state is L else Trigger.ADMIT, out)
                peer.locked_reason = None
            else:
                self._require(peer, demand, now, out, step_up=False)
        elif peer.enforced:
            if member is None:
                demand = policy.Demand(owes=peer.owes, locked=LockedReason.UNKNOWN_PEER)
            else:
                fresh = (policy.for_step_up(team, member) if peer.step_up
                         else policy.for_new_session(team, member, quarantine_unknown=unknown))
                # If the policy stopped naming a proof, what was owed stays owed (fail closed).
                owes = fresh.owes or peer.owes
                demand = policy.Demand(owes=owes, locked=policy.lock_reason(member, owes))
            if demand.owes != peer.owes or demand.locked != peer.locked_reason:
                peer.owes, peer.locked_reason = demand.owes, demand.locked
                peer.proofs = {k: t for k, t in peer.proofs.items() if k in demand.owes}
                self._transition(peer, Trigger.LOCK if demand.locked else Trigger.DEMAND, out)
        elif member is None and unknown:
            self._require(peer, policy.Demand(owes=frozenset(), locked=LockedReason.UNKNOWN_PEER), now, out,
                          step_up=False)
        out.append(self._save(peer))
        self._arm(peer)

    def _require(self, peer: Peer, demand: policy.Demand, now: float, out: list[Command], *,
                 step_up: bool, announce: bool = True) -> None:
        """Make the peer owe `demand` from `now` on: earlier proofs no longer count."""
        peer.owes, peer.owes_since, peer.proofs = demand.owes, now, NO_PROOFS
        peer.locked_reason, peer.step_up = demand.locked, step_up or peer.step_up
        self._transition(peer, Trigger.LOCK if demand.locked else Trigger.DEMAND, out, announce=announce)

    def _transition(self, peer: Peer, trigger: Trigger, out: list[Command], *, announce: bool = True) -> None:
        new = TRANSITIONS.get((peer.state, trigger))
        if new is None:
            raise CoreBug(f"no transition from {peer.state} on {trigger}")
        was_enforced, old = peer.enforced, peer.state
        peer.state = new
        if peer.allowed_ips and peer.enforced != was_enforced:
            if peer.enforced:
                out.append(Quarantine(prefixes=peer.allowed_ips))
            else:
                self._release(peer, peer.allowed_ips, out)
        if announce and (new is not old or trigger in (Trigger.DEMAND, Trigger.LOCK)):
            if new is Q:
                out.append(self._publish("peer.quarantined", peer, owes=sorted(k.value for k in peer.owes)))
            elif new is L and (old is not L or trigger is Trigger.LOCK):
                reason = peer.locked_reason.value if peer.locked_reason else None
                out.append(self._publish("peer.locked", peer, reason=reason))
            elif new is A and trigger is not Trigger.SATISFY:
                out.append(self._publish("peer.admitted", peer))

    def _list(self, peer: Peer, prefixes: tuple[str, ...], out: list[Command]) -> None:
        """Give the peer these prefixes, tracking or untracking prefixes that gain their first holder or lose
        their last one. A new prefix is tracked before the peer's state is decided in the same batch, which
        the runtime turns into one kernel transaction."""
        key, listed = peer.public_key, self._listed
        dropped = []
        for p in peer.allowed_ips:
            holders = listed.get(p)
            if holders == key:
                del listed[p]
                dropped.append(p)
            elif isinstance(holders, set):
                holders.discard(key)
                if len(holders) == 1:
                    listed[p] = next(iter(holders))
        peer.allowed_ips = prefixes
        fresh = []
        for p in prefixes:
            holders = listed.get(p)
            if holders is None:
                listed[p] = key
                fresh.append(p)
            elif isinstance(holders, set):
                holders.add(key)
            elif holders != key:
                listed[p] = {holders, key}
        gone = tuple(p for p in dropped if p not in self._listed)
        if gone:
            out.append(Untrack(prefixes=gone))
        added = tuple(p for p in fresh if p not in dropped)
        if not all(_is_host(p) for p in (*dropped, *fresh)):
            self._subnets = None
        if added:
            out.append(Track(prefixes=added))

    def _holders(self, prefix: str) -> Iterable[str]:
        """The keys of the peers that list a prefix."""
        holders = self._listed.get(prefix)
        if holders is None:
            return ()
        return (holders,) if isinstance(holders, str) else holders

    def _release(self, peer: Peer, prefixes: tuple[str, ...], out: list[Command]) -> None:
        """Release prefixes unless another enforced peer still lists them."""
        free = tuple(p for p in prefixes if not any(
            k != peer.public_key and self.peers[k].enforced for k in self._holders(p)))
        if free:
            out.append(Release(prefixes=free))

    def _publish(self, type_: str, peer: Peer, **data: object) -> Publish:
        data = {"peer": peer.public_key, "member_id": peer.member_id, **data}
        return Publish(type=type_, subject=f"peer/{peer.public_key}", data=data)

    def _save(self, peer: Peer) -> SavePeer:
        if peer.state is None:
            raise CoreBug("saving an undecided peer")
        return SavePeer(record=record_of(peer))



def _is_host(prefix: str) -> bool:
    """A prefix of one address (how WireGuard and the store write them: "10.0.0.1/32", "fd00::1/128")."""
    return (prefix.endswith("/32") and ":" not in prefix) or prefix.endswith("/128")


def record_of(peer: Peer) -> PeerRecord:
    assert peer.state is not None
    return PeerRecord(
        public_key=peer.public_key,
        state=peer.state,
        owes=peer.owes,
        owes_since=peer.owes_since,
        proven_at=peer.proven_at,
        admitted_at=peer.admitted_at,
        locked_reason=peer.locked_reason,
        allowed_ips=peer.allowed_ips,
        session_started_at=peer.session_started_at,
        last_handshake=peer.last_handshake,
        step_up=peer.step_up,
        endpoint=peer.endpoint,
    )
