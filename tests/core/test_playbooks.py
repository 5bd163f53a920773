"""The state machine as playbooks: events in, commands out."""

from __future__ import annotations

import pytest

from gatewayd.core import events as ev
from gatewayd.core.commands import FlushFlows, Publish
from gatewayd.core.model import Factor, PeerState, ProofKind, Role, Roles, Scope
from gatewayd.core.state import REJECT_AFTER_TIME, TRANSITIONS, CoreBug, DisconnectOutcome, Trigger
from tests.core.playbook import K1, K2, Play, member, published, quarantined, released, resets, team

IP1, IP2 = "10.0.0.2/32", "10.0.0.3/32"


def connected(play: Play, *, policy_totp: bool = False, factors: frozenset[Factor] = frozenset({Factor.TOTP}),
              peers: tuple[str, ...] = (K1,)) -> None:
    play(ev.TeamPolicyApplied(policy=team(totp=policy_totp)))
    play(ev.MemberUpserted(member=member(peers=peers, factors=factors)))
    for i, k in enumerate(peers):
        play(ev.PeerConfigured(public_key=k, allowed_ips=(f"10.0.0.{i + 2}/32",)))
        play(ev.HandshakeSeen(public_key=k, at=play.now - 1))


def test_member_peer_without_policy_is_authorized() -> None:
    play = Play()
    connected(play)
    assert play.state() == "authorized"
    assert not play.gw.enforced_prefixes()


def test_unknown_peer_is_locked_in_quarantine_and_owes_nothing_until_mapped() -> None:
    play = Play()
    out = play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    assert quarantined(out) == {IP1}
    assert play.state() == "locked" and play.gw.peers[K1].owes == frozenset()
    out = play(ev.MemberUpserted(member=member()))
    assert released(out) == {IP1}
    assert play.state() == "authorized"


def test_unknown_peer_allowed_by_config() -> None:
    play = Play(quarantine_unknown=False)
    out = play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    assert not quarantined(out) and play.state() == "authorized"


def test_disconnect_quarantines_resets_and_flushes_then_totp_releases() -> None:
    play = Play()
    connected(play)
    answer, out = play.disconnect(ev.DisconnectRequested(member_id="alice", reason="siem"))
    assert quarantined(out) == {IP1}
    assert resets(out) == [K1]
    assert any(isinstance(c, FlushFlows) and c.prefixes == (IP1,) for c in out)
    assert "disconnect.executed" in published(out)
    assert answer.sessions_cut == 1 and answer.peers_quarantined == 1 and answer.cause is None
    assert any("will not prompt" in w for w in answer.warnings)
    assert play.gw.peers[K1].owes == {ProofKind.OTP}
    out = play(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=play.now + 1), at=play.now + 1)
    assert released(out) == {IP1}
    assert play.state() == "authorized"
    assert "peer.released" in published(out)


def test_disconnect_causes() -> None:
    play = Play()
    answer, _ = play.disconnect(ev.DisconnectRequested(member_id="ghost"))
    assert answer == DisconnectOutcome(
        sessions_cut=0, peers_quarantined=0, cause="unknown_subject", warnings=())
    play(ev.MemberUpserted(member=member(peers=())))
    answer, _ = play.disconnect(ev.DisconnectRequested(member_id="alice"))
    assert answer.cause == "session_context_not_found"


def test_disconnect_of_absent_mapped_peer_holds_when_it_appears() -> None:
    play = Play()
    play(ev.MemberUpserted(member=member()))
    answer, out = play.disconnect(ev.DisconnectRequested(member_id="alice"))
    assert answer.peers_quarantined == 1
    assert resets(out) == []
    out = play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    assert quarantined(out) == {IP1} and play.state() == "quarantined"


def test_fleet_demand_quarantines_peers_not_proven_since_and_is_idempotent() -> None:
    play = Play()
    connected(play)
    demand = ev.StepUpDemanded(member_id="alice", after=play.now + 5, reason="siem", by="gw-a")
    out = play(demand, at=play.now + 6)
    assert quarantined(out) == {IP1} and resets(out) == [K1] and "fleet.demand_applied" in published(out)
    applied = next(c for c in out if isinstance(c, Publish) and c.type == "fleet.demand_applied")
    assert applied.data["by"] == "gw-a" and applied.data["peers"] == [K1]
    assert play.gw.peers[K1].owes == {ProofKind.OTP} and play.gw.peers[K1].step_up
    # The same demand again (a watch replay, a restart): nothing more.
    assert play(demand, at=play.now + 1) == []
    play(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=play.now + 1), at=play.now + 1)
    assert play.state() == "authorized"
    # Proven after the demand: it is paid here.
    assert play(demand, at=play.now + 1) == []


def test_fleet_demand_older_than_the_latest_proof_changes_nothing() -> None:
    play = Play()
    connected(play)
    play.disconnect(ev.DisconnectRequested(member_id="alice"))
    play(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=play.now + 1), at=play.now + 1)
    assert play(ev.StepUpDemanded(member_id="alice", after=play.now - 10), at=play.now + 1) == []
    assert play.state() == "authorized"


def test_fleet_demand_for_unknown_subjects_or_absent_peers() -> None:
    play = Play()
    assert play(ev.StepUpDemanded(member_id="ghost", after=1.0)) == []
    assert play(ev.StepUpDemanded(team_id="ghosts", after=1.0)) == []
    play(ev.MemberUpserted(member=member()))
    play(ev.StepUpDemanded(public_key=K1, after=play.now))  # not connected here yet
    out = play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    assert quarantined(out) == {IP1} and play.state() == "quarantined"


def test_proof_older_than_demand_is_refused() -> None:
    play = Play()
    connected(play)
    play(ev.DisconnectRequested(member_id="alice"), at=2_000_000.0)
    counted, _ = play.prove(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=1_999_999.0))
    assert counted is False
    assert play.state() == "quarantined"


def test_second_disconnect_renews_the_demand() -> None:
    play = Play()
    connected(play)
    play(ev.DisconnectRequested(member_id="alice"), at=2_000_000.0)
    play(ev.DisconnectRequested(member_id="alice"), at=2_000_010.0)
    play(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=2_000_005.0))
    assert play.state() == "quarantined"


def test_disconnect_of_member_without_factor_locks_with_reason() -> None:
    play = Play()
    connected(play, factors=frozenset())
    answer, out = play.disconnect(ev.DisconnectRequested(member_id="alice"))
    assert play.state() == "locked" and play.gw.peers[K1].locked_reason.value == "no_factor"  # type: ignore[union-attr]
    assert any("no_factor" in w for w in answer.warnings)
    # Enrolling a factor turns the lock into an ordinary quarantine that the member can pay.
    out = play(ev.MemberUpserted(member=member(factors=frozenset({Factor.TOTP}))))
    assert play.state() == "quarantined" and not released(out)


def test_device_only_member_owes_device_proof_after_disconnect() -> None:
    play = Play()
    connected(play, factors=frozenset({Factor.DEVICE}))
    play(ev.DisconnectRequested(member_id="alice"))
    assert play.gw.peers[K1].owes == {ProofKind.DEVICE}
    play(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=play.now))
    assert play.state() == "quarantined"
    play(ev.ProofAccepted(public_key=K1, factor=Factor.DEVICE, verified_at=play.now))
    assert play.state() == "authorized"


def test_both_policies_demand_both_proofs() -> None:
    play = Play()
    play(ev.TeamPolicyApplied(policy=team(totp=True, device=True)))
    play(ev.MemberUpserted(member=member(factors=frozenset({Factor.TOTP, Factor.DEVICE}))))
    play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    assert play.gw.peers[K1].owes == {ProofKind.OTP, ProofKind.DEVICE}
    play(ev.ProofAccepted(public_key=K1, factor=Factor.BACKUP_CODE, verified_at=play.now))
    assert play.state() == "quarantined"
    out = play(ev.ProofAccepted(public_key=K1, factor=Factor.DEVICE, verified_at=play.now))
    assert play.state() == "authorized" and released(out) == {IP1}


def test_prior_connection_fresh_peer_is_quarantined_from_the_start() -> None:
    play = Play()
    play(ev.TeamPolicyApplied(policy=team(totp=True)))
    play(ev.MemberUpserted(member=member()))
    out = play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    assert quarantined(out) == {IP1}
    assert play.state() == "quarantined"


def test_prior_connection_session_end_requarantines_before_next_session() -> None:
    play = Play()
    connected(play, policy_totp=True)
    play(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=play.now))
    assert play.state() == "authorized"
    hs = play.gw.peers[K1].last_handshake
    assert hs is not None
    assert play.gw.next_deadline() == hs + REJECT_AFTER_TIME
    # A rekey within the session keeps it going.
    play(ev.HandshakeSeen(public_key=K1, at=hs + 125), at=hs + 125)
    assert play.state() == "authorized"
    out = play.timer(hs + 125 + REJECT_AFTER_TIME)
    assert quarantined(out) == {IP1} and "session.ended" in published(out)
    assert play.state() == "quarantined"


def test_prior_connection_restarted_client_owes_a_new_proof() -> None:
    play = Play()
    connected(play, policy_totp=True)
    play(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=play.now))
    hs = play.gw.peers[K1].last_handshake
    assert hs is not None
    out = play(ev.HandshakeSeen(public_key=K1, at=hs + 20), at=hs + 20)  # too early for a rekey: new session
    assert quarantined(out) == {IP1} and play.state() == "quarantined"


def test_policy_scope_and_roles() -> None:
    assert not team(scope=Scope.CONTROL_PANEL).applies_to(Role.MEMBER)
    assert team(roles=Roles.ADMINS).applies_to(Role.ADMIN)
    assert not team(roles=Roles.ADMINS).applies_to(Role.MEMBER)
    assert team(roles=Roles.MEMBERS).applies_to(Role.MEMBER)
    play = Play()
    play(ev.TeamPolicyApplied(policy=team(totp=True, scope=Scope.CONTROL_PANEL)))
    play(ev.MemberUpserted(member=member()))
    play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    assert play.state() == "authorized"


@pytest.mark.parametrize("scope", list(Scope))
def test_scope_decides_what_a_new_session_owes_and_never_what_a_disconnect_does(scope: Scope) -> None:
    """As the proto documents MfaScope: CLIENT_APP and BOTH enforce the connection policies on a new session,
    CONTROL_PANEL does not; with no connection policy nothing is owed at connection; a Disconnect always is."""
    for totp in (True, False):
        play = Play()
        play(ev.TeamPolicyApplied(policy=team(totp=totp, scope=scope)))
        play(ev.MemberUpserted(member=member()))
        play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
        enforced = totp and scope is not Scope.CONTROL_PANEL
        assert play.state() == ("quarantined" if enforced else "authorized")
        play.disconnect(ev.DisconnectRequested(member_id="alice"))
        assert play.state() == "quarantined" and play.gw.peers[K1].owes == {ProofKind.OTP}


def test_reverify_interval_counts_from_admission_for_a_peer_that_never_proved() -> None:
    """A peer admitted without a proof (its team asked nothing at connection) is not exempt from a
    re-verification interval: it owes a proof once the interval has passed since its admission."""
    play = Play()
    play(ev.TeamPolicyApplied(policy=team(reverify=3600.0)), at=1_000_000.0)
    play(ev.MemberUpserted(member=member()))
    play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    assert play.state() == "authorized" and play.gw.peers[K1].proven_at is None
    assert play.gw.next_deadline() == 1_003_600.0
    out = play.timer(1_003_600.0)
    assert play.state() == "quarantined" and "peer.reverify_due" in published(out)


def test_policy_turned_on_quarantines_unproven_sessions() -> None:
    play = Play()
    connected(play, peers=(K1, K2))
    answer, _ = play.gw.apply_policy(ev.TeamPolicyApplied(policy=team(2, totp=True)), play.now)
    assert answer.peers_quarantined == 2
    assert play.state(K1) == play.state(K2) == "quarantined"


def test_reverify_interval() -> None:
    play = Play()
    play(ev.TeamPolicyApplied(policy=team(reverify=3600)))
    play(ev.MemberUpserted(member=member()))
    play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    play(ev.DisconnectRequested(member_id="alice"))
    play(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=play.now))
    proven = play.gw.peers[K1].proven_at
    assert proven is not None and play.gw.next_deadline() == proven + 3600
    assert play.timer(proven + 3599) == []
    out = play.timer(proven + 3600)
    assert quarantined(out) == {IP1} and play.state() == "quarantined"


def test_member_lock_moves_owing_peers_to_locked_and_unlock_back() -> None:
    play = Play()
    connected(play)
    play(ev.DisconnectRequested(member_id="alice"))
    play(ev.MemberUpserted(member=member(locked=True)))
    assert play.state() == "locked"
    play(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=play.now))
    assert play.state() == "locked"
    play(ev.MemberUpserted(member=member(locked=False)))
    assert play.state() == "quarantined"


def test_removed_member_peer_keeps_its_debt_when_remapped() -> None:
    play = Play()
    connected(play)
    play(ev.DisconnectRequested(member_id="alice"))
    play(ev.MemberRemoved(member_id="alice"))
    assert play.state() == "locked"
    out = play(ev.MemberUpserted(member=member()))
    assert play.state() == "quarantined" and not released(out)


def test_peer_unconfigured_and_back_keeps_quarantine() -> None:
    play = Play()
    connected(play)
    play(ev.DisconnectRequested(member_id="alice"))
    out = play(ev.PeerUnconfigured(public_key=K1))
    assert released(out) == {IP1}  # the prefix is no longer this peer's
    out = play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP2,)))
    assert quarantined(out) == {IP2} and play.state() == "quarantined"


def test_allowed_ips_change_moves_enforcement() -> None:
    play = Play()
    play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    out = play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP2,)))
    assert quarantined(out) == {IP2} and released(out) == {IP1}


def test_endpoint_change_is_published() -> None:
    play = Play()
    connected(play)
    out = play(ev.EndpointChanged(public_key=K1, endpoint="198.51.100.7:4000"))
    assert published(out) == ["endpoint.changed"]
    assert play(ev.EndpointChanged(public_key=K1, endpoint="198.51.100.7:4000")) == []


def test_proof_for_nothing_owed_changes_nothing() -> None:
    play = Play()
    connected(play)
    counted, out = play.prove(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=play.now))
    assert counted is False and out == [] and play.state() == "authorized"


def test_transition_table_has_one_way_out_of_quarantine() -> None:
    exits = {(s, t) for (s, t), new in TRANSITIONS.items()
             if s is PeerState.QUARANTINED and new is PeerState.AUTHORIZED}
    assert exits == {(PeerState.QUARANTINED, Trigger.SATISFY)}


def test_unknown_event_is_a_bug() -> None:
    with pytest.raises(CoreBug):
        Play()(ev.Event())


def test_restore_rebuilds_state_and_timers() -> None:
    from gatewayd.core.state import GatewayState, record_of

    play = Play()
    connected(play, policy_totp=True)
    records = [record_of(p) for p in play.gw.peers.values()]
    fresh = GatewayState()
    fresh.restore(play.gw.teams.values(), play.gw.members.values(), records)
    assert fresh.enforced_prefixes() == play.gw.enforced_prefixes() == {IP1}
    assert fresh.peers[K1].owes == {ProofKind.OTP}


def test_team_disconnect_covers_every_member() -> None:
    play = Play()
    connected(play)
    play(ev.MemberUpserted(member=member("bob", peers=(K2,))))
    play(ev.PeerConfigured(public_key=K2, allowed_ips=(IP2,)))
    answer, out = play.disconnect(ev.DisconnectRequested(team_id="t", reason="incident"))
    assert answer.peers_quarantined == 2 and quarantined(out) == {IP1, IP2}
    assert [c.subject for c in out if isinstance(c, Publish) and c.type == "disconnect.executed"] == [
        "member/alice", "member/bob"]
    assert play.disconnect(ev.DisconnectRequested(team_id="nobody"))[0].cause == "unknown_subject"


def test_a_prefix_caught_moving_between_peers_stays_enforced_while_any_holder_is() -> None:
    from collections.abc import Sequence

    from gatewayd.core.commands import Track, Untrack

    def untracked(out: Sequence[object]) -> set[str]:
        return {p for c in out if isinstance(c, Untrack) for p in c.prefixes}

    play = Play()
    play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))  # unknown: locked, IP1 quarantined
    out = play(ev.PeerConfigured(public_key=K2, allowed_ips=(IP1,)))  # a read caught IP1 on both
    assert not any(isinstance(c, Track) for c in out) and play.state(K2) == "locked"
    out = play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP2,)))
    assert quarantined(out) == {IP2} and released(out) == set() and untracked(out) == set()
    out = play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1, IP2)))  # back to two holders of IP1
    assert released(out) == set() and untracked(out) == set()
    out = play(ev.PeerUnconfigured(public_key=K2))
    assert released(out) == set() and untracked(out) == set()  # K1 still holds IP1, locked
    out = play(ev.PeerUnconfigured(public_key=K1))
    assert released(out) == {IP1, IP2} and untracked(out) == {IP1, IP2}
    assert play.gw.tracked_prefixes() == set() and play.gw.peer_for_address("10.0.0.2") is None


def test_the_caller_of_an_address_is_the_longest_prefix_of_a_configured_peer() -> None:
    """Host prefixes by key; subnets (site-to-site peers) by longest match, kept current as peers' allowed IPs
    change; an address nobody holds, or held only by a peer gone from the interface, is nobody's."""
    play = Play()
    play(ev.PeerConfigured(public_key=K1, allowed_ips=("10.1.0.0/16", "fd00:1::/64")))
    play(ev.PeerConfigured(public_key=K2, allowed_ips=("10.1.2.0/24", "10.9.0.7/32")))
    def found(address: str) -> str | None:
        peer = play.gw.peer_for_address(address)
        return peer.public_key if peer else None

    assert [found(a) for a in
            ("10.1.2.3", "10.1.3.3", "10.9.0.7", "fd00:1::5", "10.2.0.1", "fd00:2::1", "not an address", "")] \
        == [K2, K1, K2, K1, None, None, None, None]
    play(ev.PeerConfigured(public_key=K2, allowed_ips=("10.9.0.7/32",)))  # K2 lets go of its /24
    assert found("10.1.2.3") == K1
    play(ev.PeerConfigured(public_key=K1, allowed_ips=("10.3.0.0/16",)))
    assert found("10.1.2.3") is None and found("10.3.4.5") == K1
    play(ev.PeerUnconfigured(public_key=K1))
    assert found("10.3.4.5") is None and found("10.9.0.7") == K2
