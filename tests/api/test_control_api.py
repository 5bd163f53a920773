"""ControlService over real gRPC: mTLS, authorization, validation, no partial writes, idempotency, events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gatewayd.scheduling import Pause, no_pause
from gatewayd.v1 import control_pb2, types_pb2
from tests.harness import SECRET, Harness, eventually, gw, key, start, stop
from tests.pki import Authority

__all__ = ["gw"]


def disconnect(member: str = "alice", idem: str = "k1", reason: str = "siem") -> control_pb2.DisconnectRequest:
    return control_pb2.DisconnectRequest(member_id=member, reason=reason, idempotency_key=idem)


async def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("call succeeded")


# ---- mTLS and authorization ------------------------------------------------------------------------

async def test_valid_certificate_with_permission(gw: Harness) -> None:
    await gw.control().UpsertMember(control_pb2.UpsertMemberRequest(
        member_id="alice", team_id="t", role=types_pb2.MEMBER_ROLE_MEMBER))
    assert "alice" in gw.daemon.core.members


@pytest.mark.parametrize("kind", ["no certificate", "foreign CA", "expired"])
async def test_handshake_rejections(gw: Harness, kind: str) -> None:
    stub = {
        "no certificate": lambda: gw.control(certificate=False),
        "foreign CA": lambda: gw.control(ca=Authority("someone else's CA")),
        "expired": lambda: gw.control(expired=True),
    }[kind]()
    code, _ = await status_of(stub.ListSessions(control_pb2.ListSessionsRequest(), timeout=5))
    assert code is grpc.StatusCode.UNAVAILABLE


async def test_valid_certificate_without_permission_is_denied(gw: Harness) -> None:
    reader = gw.control("reader.test")
    await reader.ListSessions(control_pb2.ListSessionsRequest())
    code, details = await status_of(reader.Disconnect(disconnect()))
    assert code is grpc.StatusCode.PERMISSION_DENIED and "reader.test" in details
    code, _ = await status_of(gw.control("stranger.test").ListSessions(control_pb2.ListSessionsRequest()))
    assert code is grpc.StatusCode.PERMISSION_DENIED


async def test_principal_is_never_taken_from_metadata(gw: Harness) -> None:
    reader = gw.control("reader.test")
    code, _ = await status_of(reader.Disconnect(disconnect(), metadata=[("x-principal", "controlplane.test")]))
    assert code is grpc.StatusCode.PERMISSION_DENIED


async def test_unix_socket_has_the_configured_mode(gw: Harness) -> None:
    mode = (gw.tmp / "control.sock").stat().st_mode & 0o777
    assert mode == 0o660


async def test_health_and_reflection_on_every_listener(gw: Harness) -> None:
    for target, creds in (
        (f"unix:{gw.tmp / 'control.sock'}", grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)),
        (f"127.0.0.1:{gw.daemon.challenge_ports[0]}", None),
    ):
        ch = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
        gw.channels.append(ch)
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = [a async for a in refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        names = {s.name for s in answers[0].list_services_response.service}
        assert "grpc.health.v1.Health" in names
        assert names & {"gatewayd.v1.ControlService", "gatewayd.v1.ChallengeService"}


# ---- validation and no partial writes ----------------------------------------------------------------

@pytest.mark.parametrize(("request_", "field"), [
    (control_pb2.DisconnectRequest(peer_public_key="abc", idempotency_key="k"), "peer_public_key"),
    (control_pb2.DisconnectRequest(peer_public_key="AAAA" * 8, idempotency_key="k"), "peer_public_key"),
    (control_pb2.DisconnectRequest(member_id="", idempotency_key="k"), "member_id"),
    (control_pb2.DisconnectRequest(member_id="a", idempotency_key=""), "idempotency_key"),
    (control_pb2.DisconnectRequest(member_id="a", idempotency_key="k", reason="x" * 300), "reason"),
    (control_pb2.DisconnectRequest(idempotency_key="k"), "target"),
    (control_pb2.DisconnectRequest(member_id="a", idempotency_key="k", scope=7), "scope"),  # type: ignore[arg-type]
    (control_pb2.DisconnectRequest(member_id="a", idempotency_key="k", scope=-1), "scope"),  # type: ignore[arg-type]
])
async def test_disconnect_validation_names_the_field(gw: Harness, request_: control_pb2.DisconnectRequest,
                                                     field: str) -> None:
    code, details = await status_of(gw.local().Disconnect(request_))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details


async def test_fleet_scope_without_a_fleet_is_refused_and_changes_nothing(gw: Harness) -> None:
    await gw.enroll("alice", (key(1),))
    await gw.poll()
    code, details = await status_of(gw.local().Disconnect(control_pb2.DisconnectRequest(
        member_id="alice", idempotency_key="f", scope=control_pb2.DISCONNECT_SCOPE_FLEET)))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and details.startswith("scope") and "fleet" in details
    assert not gw.daemon.adapters.enforcer.quarantined()
    # The default scope is local: the same key may then be used for a local Disconnect.
    answer = await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="f"))
    assert answer.peers_quarantined == 1 and not answer.fleet_demand_recorded and not answer.replayed


async def test_non_canonical_base64_key_is_refused(gw: Harness) -> None:
    k = key(5)
    assert k.endswith("U=")
    non_canonical = k[:-2] + "V="  # same 32 bytes, different padding bits
    code, details = await status_of(gw.local().UpsertMember(control_pb2.UpsertMemberRequest(
        member_id="a", team_id="t", role=types_pb2.MEMBER_ROLE_MEMBER, peer_public_keys=[non_canonical])))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "canonical" in details and "peer_public_keys[0]" in details


async def test_upsert_with_one_bad_part_writes_nothing(gw: Harness) -> None:
    req = control_pb2.UpsertMemberRequest(member_id="alice", team_id="t", role=types_pb2.MEMBER_ROLE_MEMBER,
                                          totp=control_pb2.TotpEnrollment(secret=SECRET, digits=6),
                                          backup_codes=control_pb2.BackupCodeSet(salt=b"s" * 16, n=1000, r=8, p=1,
                                                                                 hashes=[b"h" * 32]))
    code, details = await status_of(gw.local().UpsertMember(req))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("backup_codes.n")
    assert not await gw.daemon.store.state.member_exists("alice")
    code, details = await status_of(gw.local().UpsertMember(control_pb2.UpsertMemberRequest(
        member_id="alice", team_id="t", role=types_pb2.MEMBER_ROLE_MEMBER,
        totp=control_pb2.TotpEnrollment(secret=b"short", digits=6))))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("totp.secret")


async def test_refusal_after_reads_rolls_back_every_write(gw: Harness) -> None:
    await gw.enroll("alice", (key(1),))
    before = await gw.daemon.store.state.member_auth("alice")
    # bob claims alice's peer and brings a TOTP secret: refused as a whole.
    code, _ = await status_of(gw.enroll("bob", (key(2), key(1)), secret=b"B" * 20))
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert not await gw.daemon.store.state.member_exists("bob")
    assert await gw.daemon.store.state.member_auth("alice") == before
    assert await gw.daemon.store.state.owners([key(2)]) == {}


async def test_message_size_cap(gw: Harness) -> None:
    code, _ = await status_of(gw.local().Disconnect(disconnect(reason="x" * 70_000)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- policy -----------------------------------------------------------------------------------------

async def test_policy_versions_and_warning(gw: Harness) -> None:
    res = await gw.policy(2)
    assert res.warnings and "will not prompt" in res.warnings[0]
    code, details = await status_of(gw.policy(2, totp=True))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "not newer" in details
    code, _ = await status_of(gw.policy(1, totp=True))
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    res = await gw.policy(3, totp=True)
    assert not res.warnings
    code, details = await status_of(gw.local().ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(
        policy=control_pb2.TeamPolicy(team_id="t", version=9, roles=types_pb2.MFA_ROLES_ALL))))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("policy.scope")


# ---- Disconnect --------------------------------------------------------------------------------------

async def test_disconnect_is_idempotent_per_key(gw: Harness) -> None:
    gw.source.add(key(1), "10.9.0.2/32", handshake=gw.clock() - 1)
    await gw.enroll("alice", (key(1),))
    await gw.poll()
    first = await gw.local().Disconnect(disconnect(idem="once"))
    assert (first.sessions_cut, first.peers_quarantined, first.replayed) == (1, 1, False)
    assert "10.9.0.2/32" in gw.enforcer.held
    again = await gw.local().Disconnect(disconnect(idem="once"))
    assert again.replayed and again.peers_quarantined == 1
    assert gw.source.resets == [key(1)]  # not cut twice
    code, details = await status_of(gw.local().Disconnect(disconnect(idem="once", reason="other")))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "idempotency_key" in details


async def test_disconnect_causes(gw: Harness) -> None:
    res = await gw.local().Disconnect(disconnect(member="nobody"))
    assert res.cause == control_pb2.DISCONNECT_CAUSE_UNKNOWN_SUBJECT and res.peers_quarantined == 0
    await gw.enroll("alice", ())
    res = await gw.local().Disconnect(disconnect(idem="k2"))
    assert res.cause == control_pb2.DISCONNECT_CAUSE_SESSION_CONTEXT_NOT_FOUND


async def test_disconnect_answers_only_after_enforcement(gw: Harness) -> None:
    gw.source.add(key(1), "10.9.0.2/32", handshake=gw.clock() - 1)
    await gw.enroll("alice", (key(1),))
    await gw.poll()
    gw.enforcer.fail_next = True
    code, details = await status_of(gw.local().Disconnect(disconnect()))
    assert code is grpc.StatusCode.UNAVAILABLE and "enforcement" in details
    # The daemon reconciled right after: the quarantine holds anyway (fail closed).
    assert "10.9.0.2/32" in gw.enforcer.held


# ---- reads -------------------------------------------------------------------------------------------

async def test_list_sessions_filters_and_pages(gw: Harness) -> None:
    for i in range(1, 8):
        gw.source.add(key(i), f"10.9.0.{i}/32", handshake=gw.clock())
    await gw.enroll("alice", tuple(key(i) for i in range(1, 4)))
    await gw.poll()
    await gw.local().Disconnect(disconnect())
    seen, token = [], ""
    while True:
        page = await gw.control("reader.test").ListSessions(control_pb2.ListSessionsRequest(page_size=3,
                                                                                            page_token=token))
        seen += [s.peer_public_key for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(key(i) for i in range(1, 8))
    q = await gw.local().ListSessions(control_pb2.ListSessionsRequest(state=types_pb2.PEER_STATE_QUARANTINED))
    assert {s.member_id for s in q.sessions} == {"alice"} and len(q.sessions) == 3
    locked = await gw.local().ListSessions(control_pb2.ListSessionsRequest(state=types_pb2.PEER_STATE_LOCKED))
    assert len(locked.sessions) == 4 and {s.locked_reason for s in locked.sessions} == {"unknown_peer"}
    one = await gw.local().GetSession(control_pb2.GetSessionRequest(peer_public_key=key(1)))
    assert one.tunnel_ips == ["10.9.0.1/32"] and one.owes == [types_pb2.PROOF_KIND_OTP]
    code, _ = await status_of(gw.local().GetSession(control_pb2.GetSessionRequest(peer_public_key=key(99))))
    assert code is grpc.StatusCode.NOT_FOUND
    code, details = await status_of(gw.local().ListSessions(control_pb2.ListSessionsRequest(page_size=5000)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("page_size")


async def test_watch_events_live_and_resumed(gw: Harness) -> None:
    stream = gw.local().WatchEvents(control_pb2.WatchEventsRequest())
    metadata = dict(await stream.initial_metadata())  # subscribed
    assert metadata["gatewayd-cursor"] == "0"
    await gw.enroll("alice", (key(1),))
    first = await asyncio.wait_for(stream.read(), 5)
    assert first.type == "factor.enrolled" and first.subject == "member/alice"
    assert SECRET.decode() not in first.data_json
    second = await asyncio.wait_for(stream.read(), 5)
    assert second.type == "member.upserted" and second.cursor == first.cursor + 1
    stream.cancel()
    await gw.local().Disconnect(disconnect())
    resumed = gw.local().WatchEvents(control_pb2.WatchEventsRequest(after_cursor=second.cursor,
                                                                    type_prefixes=["disconnect."]))
    e = await asyncio.wait_for(resumed.read(), 5)
    assert e.type == "disconnect.executed" and json.loads(e.data_json)["reason"] == "siem"
    resumed.cancel()
    everything = gw.local().WatchEvents(control_pb2.WatchEventsRequest(after_cursor=0))
    assert (await asyncio.wait_for(everything.read(), 5)).cursor == 1
    everything.cancel()


async def test_event_streams_are_bounded_and_a_closed_one_frees_its_place(gw: Harness) -> None:
    """At most 16 WatchEvents streams at once (each may buffer 100,000 events behind a slow reader): the 17th is
    RESOURCE_EXHAUSTED at once and changes nothing; once one is closed a new one is served; the 16 hear events."""
    streams = []
    for _ in range(16):
        streams.append(stream := gw.local().WatchEvents(control_pb2.WatchEventsRequest()))
        await stream.initial_metadata()  # subscribed
    code, details = await status_of(gw.local().WatchEvents(control_pb2.WatchEventsRequest()).read())
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "16 event streams" in details
    assert len(gw.daemon.driver.watchers.events) == 16
    streams.pop(0).cancel()
    await eventually(lambda: len(gw.daemon.driver.watchers.events) < 16)
    streams.append(stream := gw.local().WatchEvents(control_pb2.WatchEventsRequest()))
    await stream.initial_metadata()
    await gw.enroll("alice", (key(1),))
    for stream in streams:
        assert (await asyncio.wait_for(stream.read(), 5)).type == "factor.enrolled"
        stream.cancel()


# ---- restart -----------------------------------------------------------------------------------------

async def test_quarantine_survives_restart_and_is_reconciled(tmp_path: Path) -> None:
    ca = Authority("ca")
    h = await start(tmp_path, ca)
    h.source.add(key(1), "10.9.0.2/32", handshake=h.clock() - 1)
    await h.enroll("alice", (key(1),))
    await h.poll()
    await h.local().Disconnect(disconnect())
    config, source = h.daemon.config, h.source
    await stop(h)
    h2 = await start(tmp_path, ca, config=config, source=source)
    try:
        assert h2.enforcer.reconciles == 1 and h2.enforcer.held == {"10.9.0.2/32"}
        assert h2.daemon.core.peers[key(1)].state.value == "quarantined"  # type: ignore[union-attr]
    finally:
        await stop(h2)


async def test_daemon_starts_while_the_interface_is_missing(tmp_path: Path) -> None:
    from tests.fakes import MemorySource

    class Missing(MemorySource):
        async def read(self, pause: Pause = no_pause) -> dict:  # type: ignore[type-arg]
            raise FileNotFoundError("/var/run/wireguard/wgtest.sock")

    h = await start(tmp_path, Authority("ca"), source=Missing())
    try:
        assert h.daemon.ready.is_set() and h.enforcer.reconciles == 1
    finally:
        await stop(h)


async def test_disconnect_while_wireguard_is_down_says_what_holds_and_what_is_pending(gw: Harness) -> None:
    """The quarantine holds and is committed; only the session keys wait for WireGuard: the answer says so (it
    is not an error), and the keys are dropped once the interface answers again."""
    gw.source.add(key(1), "10.6.0.1/32", handshake=gw.clock() - 1)
    await gw.enroll("alice", (key(1),))
    await gw.poll()
    gw.source.unreachable = ConnectionRefusedError(111, "Connection refused")
    res = await gw.local().Disconnect(disconnect(idem="wg-down"))
    assert res.peers_quarantined == 1 and gw.enforcer.held == {"10.6.0.1/32"}
    assert len(res.pending) == 1 and "session keys of 1 peers not dropped yet" in res.pending[0]
    assert "Connection refused" in res.pending[0] and gw.source.resets == []
    gw.source.unreachable = None
    await gw.poll()
    assert gw.source.resets == [key(1)] and not gw.daemon.driver.pending_resets
