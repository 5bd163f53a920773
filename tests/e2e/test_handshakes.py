"""Sessions decided at the handshake, on a real WireGuard gateway (wireguard-go in namespaces): a client whose
new session owes a proof has not one packet forwarded, whatever the gap since its last handshake, and a running
client that rekeys keeps its session. A fresh lab per test (clients are restarted and cloned here)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pyotp
import pytest

from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import GATEWAY_TUNNEL_IP, Lab, LabPeer, run
from gatewayd.v1 import control_pb2, types_pb2
from tests.conftest import kernel_missing
from tests.e2e.conftest import UDP, Agent, Sink

pytestmark = pytest.mark.kernel

SECRET = b"e2e-handshake-secret"
CHALLENGE = f"{GATEWAY_TUNNEL_IP}:9443"
AUTHORIZED, QUARANTINED = types_pb2.PEER_STATE_AUTHORIZED, types_pb2.PEER_STATE_QUARANTINED


@pytest.fixture
def lab() -> Iterator[Lab]:
    if kernel_missing():
        pytest.skip("the lab needs the kernel")  # turned into a failure by the kernel marker in CI
    lab = Lab(peers_wanted=2)
    with lab.running():
        yield lab


@pytest.fixture
def gateway(lab: Lab) -> Iterator[LabGateway]:
    gw = LabGateway(lab)
    gw.start()
    gw.control().ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
        team_id="green", version=1, scope=types_pb2.MFA_SCOPE_CLIENT_APP, roles=types_pb2.MFA_ROLES_ALL,
        totp_prior_connection=True)))
    try:
        yield gw
    finally:
        code = gw.stop()
        assert code == 0, f"gatewayd exited with {code}: {gw.log_tail()}"


def enroll(gw: LabGateway, member: str, peer: LabPeer, team: str = "green") -> None:
    gw.control().UpsertMember(control_pb2.UpsertMemberRequest(
        member_id=member, team_id=team, role=types_pb2.MEMBER_ROLE_MEMBER, peer_public_keys=[peer.public_key],
        totp=control_pb2.TotpEnrollment(secret=SECRET, digits=6)))


def state(gw: LabGateway, peer: LabPeer) -> int:
    s: int = gw.control().GetSession(control_pb2.GetSessionRequest(peer_public_key=peer.public_key)).state
    return s


_used: dict[str, str] = {}


def prove(agent: Agent, peer: LabPeer, member: str) -> None:
    """Submit a TOTP code the member has not used yet (a code counts once: wait for the next step if needed)."""
    totp = pyotp.TOTP(base64.b32encode(SECRET).decode())
    while (code := totp.now()) == _used.get(member):
        time.sleep(0.5)
    _used[member] = code
    answer = agent(peer.ns, "totp", "--gateway", CHALLENGE, "--code", code)
    assert answer.get("accepted"), answer


def sessions(lab: Lab, peer: LabPeer) -> list[dict[str, Any]]:
    """The session.started events gatewayd logged for the peer, oldest first."""
    out = []
    for line in (lab.workdir / "gatewayd.log").read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        msg = json.loads(line).get("msg", "")
        if msg.startswith(f"event session.started peer/{peer.public_key} "):
            out.append(json.loads(msg.split(" ", 3)[3]))
    return out


def flood(agent: Agent, peer: LabPeer, tag: str, *, rate: int = 500, duration: float = 2.0) -> int:
    sent: int = agent(peer.ns, "flood", "--to", UDP, "--tag", tag, "--rate", str(rate),
                      "--duration", str(duration))["sent"]
    return sent


def tagged(datagrams: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    return [d for d in datagrams if d["tag"] == tag]


def fresh_session(lab: Lab, gw: LabGateway, agent: Agent, peer: LabPeer, member: str) -> float:
    """Enroll the member, restart its client, prove: returns the time of the session's handshake."""
    enroll(gw, member, peer)
    before = lab.handshake_of(peer)
    lab.restart_client(peer)  # it waits until a new handshake falls in a later second (wg's resolution)
    handshake = lab.wait_handshake(peer, after=before, timeout=15)
    assert state(gw, peer) == QUARANTINED
    prove(agent, peer, member)
    assert state(gw, peer) == AUTHORIZED
    return handshake


def test_a_client_restarted_5s_after_its_handshake_is_held_from_its_first_packet(
        lab: Lab, gateway: LabGateway, agent: Agent, sink: Sink) -> None:
    p = lab.peers[0]
    handshake = fresh_session(lab, gateway, agent, p, "alice")
    time.sleep(max(0.0, handshake + 5 - time.time()))
    lab.restart_client(p)
    sent = flood(agent, p, "restarted")  # its first packet starts the handshake
    assert state(gateway, p) == QUARANTINED
    assert sessions(lab, p)[-1]["reason"] == "early"
    prove(agent, p, "alice")
    flood(agent, p, "proven", rate=200, duration=1)
    got = sink.collect()["datagrams"]
    assert sent > 500 and tagged(got, "restarted") == [], "a packet of the restarted client was forwarded"
    assert len(tagged(got, "proven")) > 100


def test_a_key_used_from_a_second_machine_is_held_while_the_first_is_idle(
        lab: Lab, gateway: LabGateway, agent: Agent, sink: Sink) -> None:
    p = lab.peers[0]
    fresh_session(lab, gateway, agent, p, "alice")
    lab.set_client_keepalive(p, 0)
    clone = lab.add_clone(p)
    sent = flood(agent, clone, "clone")
    assert state(gateway, p) == QUARANTINED
    started = sessions(lab, p)[-1]
    assert started["reason"] == "new_endpoint" and started["endpoint"].startswith(clone.underlay + ":")
    got = sink.collect()["datagrams"]
    assert sent > 500 and tagged(got, "clone") == [], "a packet from the second machine was forwarded"


def test_between_rekey_and_reject_time_an_idle_reconnect_is_held_and_a_running_rekey_is_not(
        lab: Lab, gateway: LabGateway, agent: Agent, sink: Sink) -> None:
    """The 120-180 s window. An idle client (no keepalive) that reconnects 130 s after its handshake owes a
    proof; a client that keeps sending rekeys at ~120 s (data from its endpoint the moment before) keeps its
    session and loses nothing."""
    idle, busy = lab.peers[:2]
    lab.set_client_keepalive(idle, 0)
    t_idle = fresh_session(lab, gateway, agent, idle, "ivan")
    t_busy = fresh_session(lab, gateway, agent, busy, "bea")
    steady = agent.background(busy.ns, "flood", "--to", UDP, "--tag", "busy", "--rate", "20",
                              "--duration", "150", log="busy.log")
    time.sleep(max(0.0, t_idle + 130 - time.time()))
    lab.restart_client(idle)
    sent = flood(agent, idle, "idle-reconnect")
    assert state(gateway, idle) == QUARANTINED
    assert sessions(lab, idle)[-1]["reason"] == "idle"
    steady.wait(timeout=200)
    assert lab.handshake_of(busy) >= t_busy + 110, "the busy client did not rekey"
    assert state(gateway, busy) == AUTHORIZED
    assert all(s["handshake_at"] < t_busy + 5 for s in sessions(lab, busy)), sessions(lab, busy)
    got = sink.collect()["datagrams"]
    assert sent > 500 and tagged(got, "idle-reconnect") == []
    assert len(tagged(got, "busy")) >= 0.97 * 150 * 20


def test_with_gatewayd_stopped_new_initiations_are_dropped_and_running_sessions_go_on(
        lab: Lab, agent: Agent, sink: Sink) -> None:
    running, new = lab.peers[:2]
    gw = LabGateway(lab)
    gw.start()
    for member, peer in (("rita", running), ("ned", new)):
        enroll(gw, member, peer, team="blue")  # no policy: authorized, nothing owed
    lab.set_client_keepalive(new, 0)
    lab.wait_handshake(running)
    steady = agent.background(running.ns, "flood", "--to", UDP, "--tag", "running", "--rate", "50",
                              "--duration", "14", log="running.log")
    time.sleep(1)
    assert gw.stop() == 0
    stopped = time.time()
    before = lab.handshake_of(new)
    lab.restart_client(new)
    lost = flood(agent, new, "while-down", rate=100, duration=6)  # its initiations go nowhere meanwhile
    assert lab.handshake_of(new) == before, "a session started while gatewayd was down"
    gw.start()
    restarted = time.time()
    assert lab.wait_handshake(new, after=before, timeout=15) > before  # the client's retry gets through now
    steady.wait(timeout=30)
    got = sink.collect()["datagrams"]
    # None arrived while gatewayd was down (those wireguard-go kept queued go out once the handshake completes).
    assert lost > 300 and [d for d in tagged(got, "while-down") if d["received"] < restarted] == []
    during = [d for d in tagged(got, "running") if stopped < d["sent"] < restarted]
    assert len(during) >= 0.95 * 50 * (restarted - stopped - 1), "the running session stalled"
    assert gw.stop() == 0


def test_with_bypass_initiations_pass_unseen_while_gatewayd_is_down(lab: Lab, agent: Agent) -> None:
    new = lab.peers[0]
    gw = LabGateway(lab, handshake={"daemon_down": "bypass"})
    gw.start()
    enroll(gw, "bo", new, team="blue")
    assert gw.stop() == 0
    before = lab.handshake_of(new)
    lab.restart_client(new)
    assert lab.wait_handshake(new, after=before, timeout=10) > before


def test_a_silent_restarted_client_that_answers_the_gateways_initiation_is_held(
        lab: Lab, gateway: LabGateway, agent: Agent, sink: Sink) -> None:
    """The client restarts and keeps quiet; the server keeps sending to it. The gateway's WireGuard encrypts with
    keys the client lost, hears nothing back, and after 15 s initiates again - the restarted client answers. That
    initiation is the gateway's own: it is queued on the way out and decided like a client's."""
    p = lab.peers[0]
    fresh_session(lab, gateway, agent, p, "sam")
    lab.restart_client(p, keepalive=0)
    before = lab.handshake_of(p)
    to_client = agent.background(lab.srv_ns, "flood", "--to", f"{p.tunnel_ip}:6000", "--tag", "to-client",
                                 "--rate", "20", "--duration", "40", log="to-client.log")
    deadline = time.monotonic() + 40
    while lab.handshake_of(p) <= before:
        assert time.monotonic() < deadline, "the gateway did not initiate again"
        time.sleep(0.2)
    assert state(gateway, p) == QUARANTINED
    started = sessions(lab, p)[-1]
    assert started["reason"] == "unanswered" and started["initiated_by"] == "gateway", started
    sent = flood(agent, p, "answered")
    Lab.stop(to_client)
    got = sink.collect()["datagrams"]
    assert sent > 500 and tagged(got, "answered") == []


def test_a_deleted_queue_rule_is_put_back_at_once(lab: Lab, gateway: LabGateway) -> None:
    """The queue rule lives outside gatewayd's table (iptables-nft's mangle table here): deleting it is noticed
    through the nftables notifications and it is back within moments, not at the next 30 s check."""
    rule = ["-m", "mark", "--mark", "0x4000000/0x4000000", "-m", "comment", "--comment", "gatewayd handshake queue",
            "-j", "NFQUEUE", "--queue-num", "5182"]
    for chain in ("INPUT", "OUTPUT"):
        run("iptables-nft", "-t", "mangle", "-C", chain, *rule, ns=lab.gw_ns)
    run("iptables-nft", "-t", "mangle", "-D", "INPUT", *rule, ns=lab.gw_ns)
    deleted = time.monotonic()
    while run("iptables-nft", "-t", "mangle", "-C", "INPUT", *rule, ns=lab.gw_ns, check=False).returncode != 0:
        assert time.monotonic() - deleted < 5, "the queue rule was not put back"
        time.sleep(0.1)
    while "put back" not in gateway.log_tail(40):  # logged once the other chains are checked too
        assert time.monotonic() - deleted < 5, gateway.log_tail(40)
        time.sleep(0.1)
