"""The two gRPC services. Thin: validate and translate (convert), submit the job to the driver, answer.

Reads (ListSessions, GetSession, GetTeamPolicy, GetStatus) look at the core between batches, without a job.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import grpc

from gatewayd.api import convert
from gatewayd.auth import backup, totp
from gatewayd.core.callrate import CallRate
from gatewayd.core.model import Peer
from gatewayd.core.tracking import PeerSnapshot
from gatewayd.errors import Refused, Status
from gatewayd.runtime import control, proofs
from gatewayd.runtime.driver import Driver, EventSubscription
from gatewayd.runtime.fleet import Fleet, prove
from gatewayd.runtime.observability import Metrics
from gatewayd.runtime.proofs import ProofOutcome
from gatewayd.runtime.status import StatusSnapshot
from gatewayd.v1 import challenge_pb2, challenge_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2

MAX_PAGE = 1000
MAX_PREFIXES = 32
MAX_EVENT_STREAMS = 16
"""Open WatchEvents streams, all callers together; one more is refused."""
MAX_STATUS_STREAMS = 4
"""Open WatchStatus streams per peer; a newer one closes the oldest."""


Snapshots = Callable[[str], PeerSnapshot | None]
"""A peer's latest read of the interface (byte counters), by public key."""


class ControlService(control_pb2_grpc.ControlServiceServicer):  # type: ignore[misc]
    def __init__(self, driver: Driver, metrics: Metrics, status: Callable[[], StatusSnapshot],
                 snapshots: Snapshots, fleet: Fleet | None = None) -> None:
        self.driver, self.metrics, self.status, self.snapshots = driver, metrics, status, snapshots
        self.fleet = fleet

    async def GetStatus(self, request: control_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
                        ) -> control_pb2.GatewayStatus:
        return convert.status(self.status())

    async def GetTeamPolicy(self, request: control_pb2.GetTeamPolicyRequest, context: grpc.aio.ServicerContext
                            ) -> control_pb2.TeamPolicy:
        team = self.driver.core.teams.get(convert.ident(request.team_id, "team_id"))
        if team is None:
            raise Refused(Status.NOT_FOUND, f"no policy for team {request.team_id!r}", field="team_id")
        return convert.team_policy_pb(team)

    async def Disconnect(self, request: control_pb2.DisconnectRequest, context: grpc.aio.ServicerContext
                         ) -> control_pb2.DisconnectResponse:
        started = time.perf_counter()
        job = convert.disconnect(request)
        if job.fleet and self.fleet is None:
            raise Refused(Status.FAILED_PRECONDITION, "this gateway is not part of a fleet (no [fleet] section)",
                          field="scope")
        result = await self.driver.submit(job)
        self.metrics.disconnect_seconds.observe(time.perf_counter() - started)
        if job.fleet and self.fleet is not None:
            # Enforced here first (the job above); then recorded for the fleet (a retry with the same key
            # records it again with the first Disconnect's time).
            problem = await self.fleet.demand(*job.fleet_target(), result.at, job.reason)
            result = replace(result, fleet_recorded=problem is None,
                             pending=result.pending + ((problem,) if problem else ()))
        return convert.disconnect_response(result)

    async def ApplyTeamPolicy(self, request: control_pb2.ApplyTeamPolicyRequest,
                              context: grpc.aio.ServicerContext) -> control_pb2.ApplyTeamPolicyResponse:
        outcome = await self.driver.submit(convert.team_policy(request))
        return control_pb2.ApplyTeamPolicyResponse(peers_quarantined=outcome.peers_quarantined,
                                                   warnings=list(outcome.warnings))

    async def UpsertMember(self, request: control_pb2.UpsertMemberRequest, context: grpc.aio.ServicerContext
                           ) -> control_pb2.UpsertMemberResponse:
        job = convert.member_update(request)
        result = await self.driver.submit(job)
        if self.fleet is not None:
            # Step-up demands recorded in the fleet before this member (or these peers) were known here.
            for demand in self.fleet.demands_for(job.member_id, job.team_id, job.peers):
                await self.driver.submit(demand)
        return control_pb2.UpsertMemberResponse(created=result.created, totp_pending=result.totp_pending)

    async def RemoveMember(self, request: control_pb2.RemoveMemberRequest, context: grpc.aio.ServicerContext
                           ) -> control_pb2.RemoveMemberResponse:
        n = await self.driver.submit(control.RemoveMember(member_id=convert.ident(request.member_id, "member_id")))
        return control_pb2.RemoveMemberResponse(peers_unmapped=n)

    async def ResetMfa(self, request: control_pb2.ResetMfaRequest, context: grpc.aio.ServicerContext
                       ) -> control_pb2.ResetMfaResponse:
        await self.driver.submit(control.ResetMfa(member_id=convert.ident(request.member_id, "member_id")))
        return control_pb2.ResetMfaResponse()

    async def UnlockMfa(self, request: control_pb2.UnlockMfaRequest, context: grpc.aio.ServicerContext
                        ) -> control_pb2.UnlockMfaResponse:
        member_id = convert.ident(request.member_id, "member_id")
        if self.fleet is not None:
            # First: an unlock the fleet did not take is not answered OK (the member stays locked everywhere).
            if member_id not in self.driver.core.members:
                raise Refused(Status.NOT_FOUND, f"member {member_id!r} is not known", field="member_id")
            await self.fleet.unlock(member_id)
        await self.driver.submit(control.UnlockMfa(member_id=member_id))
        return control_pb2.UnlockMfaResponse()

    async def ListSessions(self, request: control_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
                           ) -> control_pb2.ListSessionsResponse:
        size = request.page_size or 100
        if size > MAX_PAGE:
            raise Refused(Status.INVALID_ARGUMENT, f"must be at most {MAX_PAGE}", field="page_size")
        if request.page_token:
            convert.public_key(request.page_token, "page_token")
        if request.state and request.state not in convert.STATE_FROM_PB:
            raise Refused(Status.INVALID_ARGUMENT, "unknown state", field="state")
        if request.member_id:
            convert.ident(request.member_id, "member_id")
        if request.team_id:
            convert.ident(request.team_id, "team_id")
        core = self.driver.core
        state = convert.STATE_FROM_PB.get(request.state)
        chosen: list[Peer] = []
        for key in sorted(core.peers):
            if request.page_token and key <= request.page_token:
                continue
            peer = core.peers[key]
            member = core.member_of(peer)
            if peer.state is None or (request.member_id and peer.member_id != request.member_id):
                continue
            if request.team_id and (member is None or member.team_id != request.team_id):
                continue
            if state is not None and peer.state is not state:
                continue
            chosen.append(peer)
            if len(chosen) > size:
                break
        more = len(chosen) > size
        page = chosen[:size]
        return control_pb2.ListSessionsResponse(
            sessions=[convert.session(p, core.member_of(p), self.snapshots(p.public_key)) for p in page],
            next_page_token=page[-1].public_key if more else "")

    async def GetSession(self, request: control_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
                         ) -> types_pb2.Session:
        key = convert.public_key(request.peer_public_key, "peer_public_key")
        peer = self.driver.core.peers.get(key)
        if peer is None or peer.state is None:
            raise Refused(Status.NOT_FOUND, "no such session", field="peer_public_key")
        return convert.session(peer, self.driver.core.member_of(peer), self.snapshots(key))

    async def _check_cursor(self, after: int) -> None:
        """A resume cursor must lie within what the outbox holds: ahead of the newest event (e.g. the gateway's
        database was re-created) or behind what retention kept, the consumer has missed events."""
        outbox = self.driver.store.outbox
        newest = outbox.next_cursor - 1
        first = await outbox.first_cursor()
        oldest = newest + 1 if first is None else first
        if after > newest:
            raise Refused(Status.OUT_OF_RANGE, f"is ahead of the newest event ({newest}); valid: {oldest - 1} to "
                          f"{newest}; events were lost or this is another gateway's cursor", field="after_cursor")
        if after != 0 and after < oldest - 1:  # 0 asks for whatever is retained
            raise Refused(Status.OUT_OF_RANGE, f"is behind the oldest event kept ({oldest}); valid: {oldest - 1} to "
                          f"{newest}; events after {after} up to {oldest - 1} are gone", field="after_cursor")

    async def WatchEvents(self, request: control_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[types_pb2.Event]:
        if len(request.type_prefixes) > MAX_PREFIXES:
            raise Refused(Status.INVALID_ARGUMENT, f"at most {MAX_PREFIXES} prefixes", field="type_prefixes")
        prefixes = tuple(convert.text(p, f"type_prefixes[{i}]", allow_empty=False)
                         for i, p in enumerate(request.type_prefixes))
        if request.HasField("after_cursor"):
            await self._check_cursor(convert.cursor(request.after_cursor, "after_cursor"))
        if len(self.driver.watchers.events) >= MAX_EVENT_STREAMS:
            # Each stream may buffer a team Disconnect's worth of events (100,000) while its reader is slow.
            raise Refused(Status.RESOURCE_EXHAUSTED, f"{MAX_EVENT_STREAMS} event streams are open already; close "
                          "one first (a stream that ended is counted until the gateway sees it gone)")
        sub = EventSubscription()
        self.driver.watchers.events.add(sub)
        try:
            outbox = self.driver.store.outbox
            # Subscribed: tell the caller where the live stream starts, before any event.
            await context.send_initial_metadata([("gatewayd-cursor", str(outbox.next_cursor - 1))])
            last = request.after_cursor if request.HasField("after_cursor") else outbox.next_cursor - 1
            if request.HasField("after_cursor"):
                while page := await outbox.events_after(last):
                    for e in page:
                        last = e.cursor
                        if not prefixes or e.type.startswith(prefixes):
                            yield convert.event(e)
            while True:
                if sub.overflowed.is_set() and sub.queue.empty():
                    raise Refused(Status.RESOURCE_EXHAUSTED,
                                  f"subscriber fell behind; resume with after_cursor={last}")
                e = await sub.queue.get()
                if e.cursor <= last:
                    continue
                last = e.cursor
                if not prefixes or e.type.startswith(prefixes):
                    yield convert.event(e)
        finally:
            self.driver.watchers.events.discard(sub)


def caller_address(context: grpc.aio.ServicerContext) -> str | None:
    """The call's source address (None: not an IP caller, or not parsable)."""
    return address_of_peer(context.peer() or "")


def address_of_peer(peer: str) -> str | None:
    """The address in gRPC's peer string: "ipv4:1.2.3.4:5", "ipv6:%5B2001:db8::1%5D:5" (gRPC percent-encodes the
    brackets, and a zone's "%" as "%25"; older versions wrote "ipv6:[::1]:5"); canonical, v4-mapped as IPv4."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = urllib.parse.unquote(rest.rsplit(":", 1)[0]).removeprefix("[").removesuffix("]").split("%")[0]
    else:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version != (4 if kind == "ipv4" else 6):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class ChallengeService(challenge_pb2_grpc.ChallengeServiceServicer):  # type: ignore[misc]
    def __init__(self, driver: Driver, metrics: Metrics, fleet: Fleet | None = None,
                 call_rate: CallRate | None = None) -> None:
        self.driver, self.metrics, self.fleet = driver, metrics, fleet
        self.call_rate = call_rate

    async def _proof(self, factor: str, proof: proofs.Proof) -> challenge_pb2.ProofResult:
        """Check and commit a proof (through the fleet ledger with a fleet) and count its outcome by factor."""
        try:
            outcome = await prove(self.driver.submit, self.fleet, proof)
        except Refused as exc:
            self.metrics.challenge_results.inc(factor=factor, outcome=exc.status.value.lower())
            raise
        self.metrics.challenge_results.inc(factor=factor, outcome="accepted" if outcome.accepted else "refused")
        return _result(outcome)

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        address = caller_address(context)
        peer = self.driver.core.peer_for_address(address) if address else None
        if address is not None and self.call_rate is not None:
            # A peer's budget is its own whatever address of its prefixes it calls from (a subnet peer could
            # otherwise take a fresh one per address); anyone else's is per address.
            wait = self.call_rate.take(peer.public_key if peer is not None else address, time.monotonic())
            if wait is not None:
                self.metrics.challenge_calls_limited.inc()
                raise Refused(Status.RESOURCE_EXHAUSTED,
                              f"too many calls from this address: retry in {max(wait, 0.1):.1f} s")
        if peer is None:
            raise Refused(Status.PERMISSION_DENIED, "the caller is not a tunnel address of a tracked peer")
        return peer.public_key

    async def GetChallenge(self, request: challenge_pb2.GetChallengeRequest, context: grpc.aio.ServicerContext
                           ) -> challenge_pb2.Challenge:
        view = await self.driver.submit(proofs.GetChallenge(public_key=self._caller(context)))
        return convert.challenge(view)

    async def SubmitTotp(self, request: challenge_pb2.SubmitTotpRequest, context: grpc.aio.ServicerContext
                         ) -> challenge_pb2.ProofResult:
        key = self._caller(context)
        if len(request.code) not in totp.DIGITS:
            raise Refused(Status.INVALID_ARGUMENT, "must be 6 or 8 ASCII digits", field="code")
        return await self._proof("totp", proofs.SubmitTotp(public_key=key, code=request.code))

    async def SubmitBackupCode(self, request: challenge_pb2.SubmitBackupCodeRequest,
                               context: grpc.aio.ServicerContext) -> challenge_pb2.ProofResult:
        key = self._caller(context)
        if not backup.well_formed(request.code):
            raise Refused(Status.INVALID_ARGUMENT, "must be 6 to 64 ASCII letters, digits, '-' or ' '",
                          field="code")
        params = await self.driver.submit(proofs.BackupPrecheck(public_key=key))
        # One KDF evaluation, off the event loop; consumption is then atomic inside the driver.
        derived = await asyncio.to_thread(backup.derive, request.code, params)
        return await self._proof("backup_code", proofs.SubmitBackupCode(public_key=key, derived=derived,
                                                                        params=params))

    async def SubmitDeviceAssertion(self, request: challenge_pb2.SubmitDeviceAssertionRequest,
                                    context: grpc.aio.ServicerContext) -> challenge_pb2.ProofResult:
        key = self._caller(context)
        return await self._proof("device", proofs.SubmitDeviceAssertion(public_key=key,
                                                                        assertion=convert.assertion(request)))

    async def WatchStatus(self, request: challenge_pb2.WatchStatusRequest, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[challenge_pb2.Challenge]:
        key = self._caller(context)
        # A client app needs one stream; a few more cover a reconnect while the old connection is not gone yet.
        # Past that the oldest is closed, so that a peer cannot pile up streams (each one costs a driver job at
        # every change of its status) while its newest caller is always served.
        watch = self.driver.watchers.watch(key, MAX_STATUS_STREAMS)
        try:
            last = None
            while not watch.superseded:
                view = convert.challenge(await self.driver.submit(proofs.GetChallenge(public_key=key,
                                                                                      issue_nonce=False)))
                if view != last:
                    yield view
                    last = view
                await watch.changed.wait()
                watch.changed.clear()
            raise Refused(Status.RESOURCE_EXHAUSTED, f"this peer opened more than {MAX_STATUS_STREAMS} status "
                          "streams: this one, the oldest, is closed")
        finally:
            self.driver.watchers.unwatch(key, watch)


def _result(outcome: ProofOutcome) -> challenge_pb2.ProofResult:
    return challenge_pb2.ProofResult(accepted=outcome.accepted, status=convert.challenge(outcome.status),
                                     backup_codes_remaining=outcome.backup_remaining)
