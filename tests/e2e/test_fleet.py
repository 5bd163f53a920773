"""Fleet mode end to end: three real gatewayd processes on a real 3-member etcd cluster (mTLS), client apps
calling each gateway's challenge API from their tunnel addresses, nftables in a namespace (gatewayd.lab.fleet).

Each test uses its own members and slots, so that the module's one fleet serves them all; a test that breaks
something (etcd members, a gateway) puts it back before it ends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pyotp
import pytest

from gatewayd.auth import backup
from gatewayd.lab.fleet import FleetGateway, FleetLab, random_key, tunnel_ip
from gatewayd.lab.netlab import run
from gatewayd.v1 import control_pb2, types_pb2
from tests.conftest import kernel_missing, require_tools

pytestmark = pytest.mark.kernel

# No delays between failures (the fleet's count is the subject here, not the local backoff).
AUTH = {"max_failures": 10, "free_failures": 10}


@pytest.fixture(scope="module")
def fleet() -> Iterator[FleetLab]:
    if kernel_missing():
        pytest.skip("the fleet lab needs the kernel")
    require_tools("etcd", "etcdctl", package="etcd-server, etcd-client")
    lab = FleetLab(3, auth=AUTH)
    with lab.running():
        for g in lab.gateways:
            g.gw.start()
        for team, prior in (("guarded", True), ("open", False)):
            for g in lab.gateways:
                g.gw.control().ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
                    team_id=team, version=1, scope=types_pb2.MFA_SCOPE_BOTH, roles=types_pb2.MFA_ROLES_ALL,
                    totp_prior_connection=prior)))
        yield lab


def enroll(lab: FleetLab, member: str, *, team: str = "guarded", secret: bytes | None = None,
           backup_codes: control_pb2.BackupCodeSet | None = None, slot: int, connect: bool = True) -> list[str]:
    """The member, with one peer per gateway (the same slot everywhere), enrolled at every gateway; returns the
    peer keys by gateway."""
    keys = [random_key() for _ in lab.gateways]
    for g in lab.gateways:
        g.gw.control().UpsertMember(control_pb2.UpsertMemberRequest(
            member_id=member, team_id=team, role=types_pb2.MEMBER_ROLE_MEMBER, peer_public_keys=keys,
            totp=control_pb2.TotpEnrollment(secret=secret, digits=6) if secret else None,
            backup_codes=backup_codes))
    if connect:
        for g, key in zip(lab.gateways, keys, strict=True):
            lab.connect(g, key, slot)
        for g, key in zip(lab.gateways, keys, strict=True):
            wait_state(g, key, types_pb2.PEER_STATE_QUARANTINED if team == "guarded"
                       else types_pb2.PEER_STATE_AUTHORIZED)
    return keys


def session(g: FleetGateway, key: str) -> types_pb2.Session | None:
    try:
        s: types_pb2.Session = g.gw.control().GetSession(control_pb2.GetSessionRequest(peer_public_key=key))
        return s
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.NOT_FOUND:
            return None
        raise


def wait_state(g: FleetGateway, key: str, state: int, timeout: float = 10) -> types_pb2.Session:
    """Until the peer is in `state` (and configured, if the lab configured it)."""
    deadline = time.monotonic() + timeout
    while True:
        s = session(g, key)
        if s is not None and s.state == state and (key not in g.peers or list(s.tunnel_ips)):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"gateway {g.index}: {key} is {s.state if s else None}, not {state}")
        time.sleep(0.1)


def code(secret: bytes, at: float | None = None) -> str:
    return pyotp.TOTP(base64.b32encode(secret).decode()).at(at or time.time())


def wrong_code(secret: bytes) -> str:
    valid = {code(secret, time.time() + d) for d in (-60, -30, 0, 30, 60)}
    return next(c for c in ("000000", "111111", "222222") if c not in valid)


def backup_set(codes: list[str]) -> control_pb2.BackupCodeSet:
    salt = os.urandom(16)
    hashes = [hashlib.scrypt(backup.normalize(c), salt=salt, n=2**10, r=8, p=1, dklen=32) for c in codes]
    return control_pb2.BackupCodeSet(salt=salt, n=2**10, r=8, p=1, hashes=hashes)


def events(g: FleetGateway, type_: str) -> list[dict[str, Any]]:
    """The gateway's retained events of one type."""
    out = []
    stream = g.gw.control().WatchEvents(control_pb2.WatchEventsRequest(after_cursor=0, type_prefixes=[type_]),
                                        timeout=1.5)
    try:
        for e in stream:
            out.append(json.loads(e.data_json))
    except grpc.RpcError as exc:
        assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED, exc
    return out


def test_one_backup_code_submitted_to_three_gateways_at_once_is_accepted_once(fleet: FleetLab) -> None:
    enroll(fleet, "bk", backup_codes=backup_set(["SAME-CODE-0001", "NEXT-CODE-0002"]), slot=1)
    racers = [fleet.client_background(g, 1, "backup", "--code", "SAME-CODE-0001") for g in fleet.gateways]
    answers = [json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1]) for p in racers]
    assert [a["ok"] for a in answers] == [True, True, True], answers
    winners = [i for i, a in enumerate(answers) if a.get("accepted")]
    assert len(winners) == 1, answers
    # The losers saw a used code (a failure); the other code still works for them.
    for i, a in enumerate(answers):
        if i not in winners:
            assert a["status"]["state"] == "PEER_STATE_QUARANTINED"
            again = fleet.client(fleet.gateways[i], 1, "backup", "--code", "SAME-CODE-0001")
            assert not again.get("accepted")
    loser = next(i for i in range(3) if i not in winners)
    assert fleet.client(fleet.gateways[loser], 1, "backup", "--code", "NEXT-CODE-0002").get("accepted")
    used = events(fleet.gateways[winners[0]], "backup_code.used")
    assert used and used[-1]["code_id"].endswith(":0") and "SAME" not in json.dumps(used)


def test_totp_code_accepted_at_a_is_refused_at_b(fleet: FleetLab) -> None:
    secret = os.urandom(20)
    enroll(fleet, "tp", secret=secret, slot=2)
    a, b, _ = fleet.gateways
    now = code(secret)
    assert fleet.client(a, 2, "totp", "--code", now).get("accepted")
    refused = fleet.client(b, 2, "totp", "--code", now)
    assert refused["ok"] and not refused.get("accepted")
    assert refused["status"]["state"] == "PEER_STATE_QUARANTINED"
    # A later step's code is new everywhere.
    assert fleet.client(b, 2, "totp", "--code", code(secret, time.time() + 30)).get("accepted")


def test_ten_failures_spread_over_three_gateways_lock_the_member_everywhere(fleet: FleetLab) -> None:
    secret = os.urandom(20)
    keys = enroll(fleet, "lk", secret=secret, slot=3)
    a, b, c = fleet.gateways
    bad = wrong_code(secret)
    for g, n in ((a, 4), (b, 3)):
        for _ in range(n):
            assert not fleet.client(g, 3, "totp", "--code", bad).get("accepted")
    # C has seen none of them, and knows the count.
    assert fleet.client(c, 3, "challenge")["attempts_left"] == 3
    for _ in range(3):
        assert not fleet.client(c, 3, "totp", "--code", bad).get("accepted")
    for g, key in zip(fleet.gateways, keys, strict=True):
        wait_state(g, key, types_pb2.PEER_STATE_LOCKED)
        refused = fleet.client(g, 3, "totp", "--code", code(secret))
        assert refused["code"] == "PERMISSION_DENIED", refused
    # One unlock, at any gateway, is the fleet's.
    b.gw.control().UnlockMfa(control_pb2.UnlockMfaRequest(member_id="lk"))
    wait_state(c, keys[2], types_pb2.PEER_STATE_QUARANTINED)
    assert fleet.client(c, 3, "totp", "--code", code(secret)).get("accepted")


def test_mfa_reset_completed_at_a_makes_the_old_totp_fail_at_b(fleet: FleetLab) -> None:
    old, new = os.urandom(20), os.urandom(20)
    enroll(fleet, "rs", secret=old, slot=4)
    for g in fleet.gateways:
        ctl = g.gw.control()
        ctl.ResetMfa(control_pb2.ResetMfaRequest(member_id="rs"))
        pending = ctl.UpsertMember(control_pb2.UpsertMemberRequest(
            member_id="rs", team_id="guarded", role=types_pb2.MEMBER_ROLE_MEMBER,
            peer_public_keys=[k for k, s in g.peers.items() if s == 4],
            totp=control_pb2.TotpEnrollment(secret=new, digits=6)))
        assert pending.totp_pending
    a, b, _ = fleet.gateways
    assert fleet.client(a, 4, "totp", "--code", code(new)).get("accepted")  # confirms the reset
    refused = fleet.client(b, 4, "totp", "--code", code(old))
    assert refused["ok"] and not refused.get("accepted"), refused
    assert fleet.client(b, 4, "totp", "--code", code(new, time.time() + 30)).get("accepted")


def test_fleet_disconnect_at_a_follows_the_member_to_other_gateways(fleet: FleetLab) -> None:
    keys = enroll(fleet, "dc", team="open", secret=os.urandom(20), slot=5, connect=False)
    a, b, c = fleet.gateways
    for g in (a, c):  # connected at A and C; B later
        fleet.connect(g, keys[g.index], 5)
        wait_state(g, keys[g.index], types_pb2.PEER_STATE_AUTHORIZED)
    answer = a.gw.control().Disconnect(control_pb2.DisconnectRequest(
        member_id="dc", reason="SIEM: impossible travel", idempotency_key="dc-1",
        scope=control_pb2.DISCONNECT_SCOPE_FLEET))
    assert answer.fleet_demand_recorded and not answer.pending
    assert tunnel_ip(0, 5) in fleet.quarantined(a)
    # C enforces it through its watch, B when the member connects there.
    s = wait_state(c, keys[2], types_pb2.PEER_STATE_QUARANTINED)
    assert list(s.owes) == [types_pb2.PROOF_KIND_OTP]
    assert tunnel_ip(2, 5) in fleet.quarantined(c)
    fleet.connect(b, keys[1], 5)
    s = wait_state(b, keys[1], types_pb2.PEER_STATE_QUARANTINED)
    assert list(s.owes) == [types_pb2.PROOF_KIND_OTP]
    deadline = time.monotonic() + 5
    while tunnel_ip(1, 5) not in fleet.quarantined(b):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    applied = events(c, "fleet.demand_applied")
    assert applied and applied[-1]["by"] == a.gw_id and applied[-1]["reason"] == "SIEM: impossible travel"


def test_fleet_disconnect_of_a_team_or_of_one_device_key(fleet: FleetLab) -> None:
    """Scope FLEET with the other two targets: a team (every member's peers at every gateway) and one peer key
    (the same device connects to two gateways)."""
    a, b, c = fleet.gateways
    for g in fleet.gateways:
        g.gw.control().ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
            team_id="red", version=1, scope=types_pb2.MFA_SCOPE_BOTH, roles=types_pb2.MFA_ROLES_ALL)))
    team_keys = enroll(fleet, "red1", team="red", secret=os.urandom(20), slot=11)
    answer = b.gw.control().Disconnect(control_pb2.DisconnectRequest(
        team_id="red", idempotency_key="red-1", scope=control_pb2.DISCONNECT_SCOPE_FLEET))
    assert answer.fleet_demand_recorded
    for g, key in zip(fleet.gateways, team_keys, strict=True):
        wait_state(g, key, types_pb2.PEER_STATE_QUARANTINED)
    device = random_key()
    for g in (a, c):
        g.gw.control().UpsertMember(control_pb2.UpsertMemberRequest(
            member_id="pk", team_id="open", role=types_pb2.MEMBER_ROLE_MEMBER, peer_public_keys=[device],
            totp=control_pb2.TotpEnrollment(secret=os.urandom(20), digits=6)))
        fleet.connect(g, device, 12)
        wait_state(g, device, types_pb2.PEER_STATE_AUTHORIZED)
    answer = a.gw.control().Disconnect(control_pb2.DisconnectRequest(
        peer_public_key=device, idempotency_key="pk-1", scope=control_pb2.DISCONNECT_SCOPE_FLEET))
    assert answer.fleet_demand_recorded and answer.peers_quarantined == 1
    wait_state(c, device, types_pb2.PEER_STATE_QUARANTINED)
    assert tunnel_ip(2, 12) in fleet.quarantined(c)


def test_a_member_enrolled_at_a_gateway_after_the_demand_owes_it_there(fleet: FleetLab) -> None:
    a, _, c = fleet.gateways
    key_a, key_c = random_key(), random_key()
    request = control_pb2.UpsertMemberRequest(member_id="late", team_id="open", role=types_pb2.MEMBER_ROLE_MEMBER,
                                              peer_public_keys=[key_a, key_c],
                                              totp=control_pb2.TotpEnrollment(secret=os.urandom(20), digits=6))
    a.gw.control().UpsertMember(request)
    answer = a.gw.control().Disconnect(control_pb2.DisconnectRequest(
        member_id="late", idempotency_key="late-1", scope=control_pb2.DISCONNECT_SCOPE_FLEET))
    assert answer.fleet_demand_recorded
    time.sleep(0.5)  # C has seen the demand for a member it does not know yet
    c.gw.control().UpsertMember(request)
    fleet.connect(c, key_c, 10)
    s = wait_state(c, key_c, types_pb2.PEER_STATE_QUARANTINED)
    assert list(s.owes) == [types_pb2.PROOF_KIND_OTP]


def test_a_gateway_restarted_while_a_demand_was_written_enforces_it(fleet: FleetLab) -> None:
    keys = enroll(fleet, "rd", team="open", secret=os.urandom(20), slot=6)
    a, _, c = fleet.gateways
    c.gw.stop()
    try:
        a.gw.control().Disconnect(control_pb2.DisconnectRequest(
            member_id="rd", idempotency_key="rd-1", scope=control_pb2.DISCONNECT_SCOPE_FLEET))
    finally:
        c.gw.start()
    s = session(c, keys[2])  # right after READY
    assert s is not None and s.state == types_pb2.PEER_STATE_QUARANTINED, s
    assert tunnel_ip(2, 6) in fleet.quarantined(c)


def test_one_etcd_member_killed_mid_run_changes_nothing(fleet: FleetLab) -> None:
    codes = [f"KILL-CODE-{i:04d}" for i in range(6)]
    enroll(fleet, "km", backup_codes=backup_set(codes), slot=7)
    a, b, c = fleet.gateways
    victim = fleet.etcd.members[0]
    accepted = []
    try:
        for i, used in enumerate(codes[:3]):
            if i == 1:
                fleet.etcd.kill(victim)
            answer = fleet.client((a, b, c)[i], 7, "backup", "--code", used)
            accepted.append(bool(answer.get("accepted")))
        # What was spent before and after the kill stays spent.
        assert not fleet.client(c, 7, "backup", "--code", codes[0]).get("accepted")
        assert not fleet.client(a, 7, "backup", "--code", codes[2]).get("accepted")
    finally:
        fleet.etcd.start_member(victim)
        fleet.etcd.wait_healthy()
    assert accepted == [True, True, True]


def test_quorum_lost_refuses_proofs_keeps_quarantine_and_recovers(fleet: FleetLab) -> None:
    secret = os.urandom(20)
    keys = enroll(fleet, "qr", secret=secret, slot=8)
    a = fleet.gateways[0]
    lost = fleet.etcd.members[1:]
    try:
        for m in lost:
            fleet.etcd.kill(m)
        refused = fleet.client(a, 8, "totp", "--code", code(secret))
        assert refused["code"] == "UNAVAILABLE" and "fleet ledger" in refused["details"], refused
        assert tunnel_ip(0, 8) in fleet.quarantined(a)
        assert session(a, keys[0]).state == types_pb2.PEER_STATE_QUARANTINED  # type: ignore[union-attr]
        # Disconnect works locally; the fleet demand is reported as not recorded.
        local = a.gw.control().Disconnect(control_pb2.DisconnectRequest(member_id="qr", idempotency_key="qr-1"))
        assert local.peers_quarantined == 3  # its peers at every gateway are enrolled here
        fl = a.gw.control().Disconnect(control_pb2.DisconnectRequest(
            member_id="qr", idempotency_key="qr-2", scope=control_pb2.DISCONNECT_SCOPE_FLEET), timeout=30)
        assert not fl.fleet_demand_recorded and any("not recorded" in p for p in fl.pending), fl
        with pytest.raises(grpc.RpcError) as unlock:
            a.gw.control().UnlockMfa(control_pb2.UnlockMfaRequest(member_id="qr"), timeout=30)
        assert unlock.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        for m in lost:
            fleet.etcd.start_member(m)
        fleet.etcd.wait_healthy()
    deadline = time.monotonic() + 20
    while True:
        answer = fleet.client(a, 8, "totp", "--code", code(secret))
        if answer.get("accepted"):
            break
        assert answer.get("code") == "UNAVAILABLE" and time.monotonic() < deadline, answer
        time.sleep(0.5)
    # The retried fleet Disconnect (same idempotency key) records the demand now.
    again = a.gw.control().Disconnect(control_pb2.DisconnectRequest(
        member_id="qr", idempotency_key="qr-2", scope=control_pb2.DISCONNECT_SCOPE_FLEET))
    assert again.replayed and again.fleet_demand_recorded


def test_etcd_refuses_a_client_without_the_fleet_certificate(fleet: FleetLab) -> None:
    """mTLS: the ledger is not readable without a certificate of the fleet's CA."""
    result = run("etcdctl", "--endpoints", "https://127.0.0.1:2379", "--cacert", str(fleet.ca_file),
                 "--command-timeout", "2s", "get", "--prefix", "/gatewayd/", ns=fleet.ns, check=False)
    assert result.returncode != 0
    assert "/gatewayd/" not in result.stdout


def test_nothing_secret_is_in_the_ledger(fleet: FleetLab) -> None:
    secret = os.urandom(20)
    enroll(fleet, "sc", secret=secret, backup_codes=backup_set(["SECRET-CODE-1"]), slot=9)
    a = fleet.gateways[0]
    assert fleet.client(a, 9, "totp", "--code", code(secret)).get("accepted")
    dump = fleet.etcd.etcdctl("get", "--prefix", "/gatewayd/", "-w", "json").stdout
    raw = base64.b64decode
    values = [raw(kv["key"]) + raw(kv.get("value", "")) for kv in json.loads(dump).get("kvs", [])]
    assert values, dump
    for needle in (secret, base64.b32encode(secret), secret.hex().encode(), b"SECRET-CODE-1"):
        assert not any(needle in v for v in values)


def test_two_gateways_on_one_broker_list_lose_no_event_when_the_first_broker_dies() -> None:
    """Two gateways publish to brokers [first, second]; the first dies mid-stream (and comes back only at the end,
    so that its persistent subscriber can drain what it had accepted): every event of both outboxes reaches a
    subscriber."""
    if kernel_missing():
        pytest.skip("the fleet lab needs the kernel")
    from tests.mosquitto import Broker

    lab = FleetLab(2, mqtt={"host": "127.0.0.1", "port": 1883, "brokers": ["127.0.0.1:1884"], "keepalive": 5})
    with lab.running():
        first, second = Broker(netns=lab.ns, port=1883), Broker(netns=lab.ns, port=1884)
        first.start()
        second.start()
        out = lab.workdir / "collected.json"
        collector = subprocess.Popen(["ip", "netns", "exec", lab.ns, sys.executable, "-m", "gatewayd.lab.agent",
                                      "collect", "--broker", "127.0.0.1:1883", "--broker", "127.0.0.1:1884",
                                      "--out", str(out)], stdout=subprocess.PIPE, text=True)
        try:
            assert collector.stdout is not None and collector.stdout.readline().strip() == "ready"
            time.sleep(1)  # both sessions subscribed
            for g in lab.gateways:
                g.gw.start()
            version = 0
            for round_ in range(30):
                if round_ == 10:
                    first.stop()  # dies mid-stream; the gateways move to the second broker
                version += 1
                for g in lab.gateways:
                    g.gw.control().ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
                        team_id="t", version=version, scope=types_pb2.MFA_SCOPE_BOTH, roles=types_pb2.MFA_ROLES_ALL)))
                time.sleep(0.05)
            deadline = time.monotonic() + 30
            while any(g.gw.control().GetStatus(control_pb2.GetStatusRequest()).outbox_unpublished
                      for g in lab.gateways):
                assert time.monotonic() < deadline, "the gateways did not publish everything to the second broker"
                time.sleep(0.2)
            expected = set().union(*(outbox_ids(g) for g in lab.gateways))
            assert len(expected) >= 60
            first.start()  # its persistent subscriber drains what it accepted before dying
            time.sleep(3)
        finally:
            collector.terminate()
            collector.wait(20)
            if collector.stdout is not None:
                collector.stdout.close()
            first.stop()
            second.stop()
        received = set(json.loads(out.read_text())["ids"])
        assert expected <= received, f"{len(expected - received)} of {len(expected)} events never arrived"
        for g in lab.gateways:
            assert "trying the next broker" in (g.lab.workdir / "gatewayd.log").read_text()


def outbox_ids(g: FleetGateway) -> set[str]:
    """Every event id the gateway's outbox retains."""
    ids = set()
    try:
        for e in g.gw.control().WatchEvents(control_pb2.WatchEventsRequest(after_cursor=0), timeout=1.5):
            ids.add(e.id)
    except grpc.RpcError as exc:
        assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED, exc
    return ids
