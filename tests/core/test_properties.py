"""Hypothesis properties of the core over random event sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core import events as ev
from gatewayd.core.model import FACTOR_PROVES, Factor, PeerState, ProofKind
from gatewayd.core.state import GatewayState, record_of
from tests.core.playbook import member, team

KEYS = ["k1", "k2", "k3"]
FACTORS = st.frozensets(st.sampled_from(list(Factor)))


def event_strategy() -> st.SearchStrategy[tuple[float, ev.Event]]:
    key = st.sampled_from(KEYS)
    events = st.one_of(
        st.builds(lambda k, n: ev.PeerConfigured(public_key=k, allowed_ips=(f"10.0.{n}.1/32",)), key,
                  st.integers(0, 3)),
        st.builds(lambda k: ev.PeerUnconfigured(public_key=k), key),
        st.builds(lambda k, d: ev.HandshakeSeen(public_key=k, at=d), key, st.floats(0, 1000)),
        st.builds(lambda k: ev.DisconnectRequested(public_key=k), key),
        st.builds(lambda: ev.DisconnectRequested(member_id="alice")),
        st.builds(lambda v, t, d, r: ev.TeamPolicyApplied(policy=team(v, totp=t, device=d, reverify=r)),
                  st.integers(1, 10**6), st.booleans(), st.booleans(), st.sampled_from([0.0, 100.0])),
        st.builds(lambda ks, fs, lk: ev.MemberUpserted(member=member(peers=tuple(ks), factors=fs, locked=lk)),
                  st.sets(key), FACTORS, st.booleans()),
        st.builds(lambda: ev.MemberRemoved(member_id="alice")),
        st.builds(lambda k, f, back: ev.ProofAccepted(public_key=k, factor=f, verified_at=-back), key,
                  st.sampled_from(list(Factor)), st.one_of(st.just(0.0), st.floats(0, 300))),
    )
    return st.tuples(st.floats(0, 400), events)


def demand_strategy() -> st.SearchStrategy[tuple[float, ev.Event]]:
    """Events that renew or answer a demand (Disconnects, proofs of each kind, policies, handshakes) on one
    peer, so that sequences such as "proof, renewed demand, proof of the other kind" are common."""
    proof = st.builds(lambda f, back: ev.ProofAccepted(public_key="k1", factor=f, verified_at=-back),
                      st.sampled_from([Factor.DEVICE, Factor.TOTP, Factor.BACKUP_CODE]),
                      st.one_of(st.just(0.0), st.floats(0, 60)))
    events = st.one_of(
        proof, st.just(ev.DisconnectRequested(public_key="k1")), st.just(ev.DisconnectRequested(member_id="alice")),
        st.builds(lambda v, t, d: ev.TeamPolicyApplied(policy=team(v, totp=t, device=d)),
                  st.integers(2, 10**6), st.booleans(), st.booleans()),
        st.builds(lambda d: ev.HandshakeSeen(public_key="k1", at=d), st.floats(0, 1000)),
    )
    return st.tuples(st.one_of(st.just(0.0), st.floats(0, 200)), events)


def setup(totp: bool = False, device: bool = False) -> list[tuple[float, ev.Event]]:
    """A gateway where every peer is mapped and configured, so random sequences reach the interesting states."""
    return [
        (0.0, ev.TeamPolicyApplied(policy=team(1, totp=totp, device=device))),
        (0.0, ev.MemberUpserted(member=member(peers=tuple(KEYS), factors=frozenset(Factor)))),
        *[(0.0, ev.PeerConfigured(public_key=k, allowed_ips=(f"10.1.0.{i}/32",))) for i, k in enumerate(KEYS)],
    ]


@settings(max_examples=500, deadline=None)
@given(st.lists(event_strategy(), max_size=40), st.booleans(), st.booleans())
def test_no_release_without_fresh_proofs(steps: list[tuple[float, ev.Event]], totp: bool, device: bool) -> None:
    check_no_release_without_fresh_proofs(steps, totp, device)


@settings(max_examples=2500, deadline=None)
@given(st.lists(demand_strategy(), min_size=2, max_size=20), st.booleans(), st.booleans())
def test_no_release_without_fresh_proofs_under_renewed_demands(steps: list[tuple[float, ev.Event]], totp: bool,
                                                               device: bool) -> None:
    check_no_release_without_fresh_proofs(steps, totp, device)


def check_no_release_without_fresh_proofs(steps: list[tuple[float, ev.Event]], totp: bool, device: bool) -> None:
    """No sequence of events releases a peer that owes a proof without, for every owed kind, an accepted proof
    verified no earlier than the demand it answers.

    The test keeps its own record of every proof fed (key, kind, verified_at) and checks a release against
    the demand the peer was under just before it, so a core that kept a proof across a renewed demand fails."""
    gw = GatewayState()
    now = 1000.0
    proofs: list[tuple[str, ProofKind, float]] = []
    for delta, event in setup(totp, device) + steps:
        now += delta
        if isinstance(event, ev.ProofAccepted):
            event = ev.ProofAccepted(public_key=event.public_key, factor=event.factor,
                                     verified_at=now + event.verified_at)
        if isinstance(event, ev.HandshakeSeen):
            event = ev.HandshakeSeen(public_key=event.public_key, at=now - event.at / 10)
        if isinstance(event, ev.TeamPolicyApplied) and "t" in gw.teams and \
                event.policy.version <= gw.teams["t"].version:
            continue
        gw.handle_timer(now)
        demands = {k: (p.state, p.owes, p.owes_since) for k, p in gw.peers.items()}
        if isinstance(event, ev.ProofAccepted):
            proofs.append((event.public_key, FACTOR_PROVES[event.factor], event.verified_at))
        gw.handle(event, now)
        for key, peer in gw.peers.items():
            prev = demands.get(key)
            if prev is None or prev[0] is not PeerState.QUARANTINED or peer.state is not PeerState.AUTHORIZED:
                continue
            owed, since = prev[1], prev[2]
            assert owed and since is not None
            assert isinstance(event, ev.ProofAccepted) and event.public_key == key
            fresh = {kind for k, kind, at in proofs if k == key and at >= since}
            assert owed <= fresh, f"released {key} owing {owed} with fresh proofs of {fresh} only"


def test_a_proof_given_before_a_renewed_demand_does_not_count() -> None:
    """The playbook that the property above reduces to: OTP proven, Disconnect again, device proven: still owes OTP."""
    gw = GatewayState()
    for _, e in setup():
        gw.handle(e, 1000.0)
    gw.handle(ev.TeamPolicyApplied(policy=team(2, totp=True, device=True)), 1000.0)
    gw.handle(ev.DisconnectRequested(public_key="k1"), 1001.0)
    gw.handle(ev.ProofAccepted(public_key="k1", factor=Factor.TOTP, verified_at=1002.0), 1002.0)
    gw.handle(ev.DisconnectRequested(public_key="k1"), 1003.0)
    gw.handle(ev.ProofAccepted(public_key="k1", factor=Factor.DEVICE, verified_at=1004.0), 1004.0)
    assert gw.peers["k1"].state is PeerState.QUARANTINED and gw.peers["k1"].owes == {ProofKind.OTP, ProofKind.DEVICE}


@settings(max_examples=200, deadline=None)
@given(st.lists(event_strategy(), max_size=40))
def test_enforcement_commands_track_state(steps: list[tuple[float, ev.Event]]) -> None:
    """The Quarantine/Release and Track/Untrack commands emitted, replayed in order, always equal the enforced
    and tracked prefixes; and a restore from the records rebuilds the same enforcement."""
    from gatewayd.core.commands import Quarantine, Release, Track, Untrack

    gw = GatewayState()
    held: set[str] = set()
    tracked: set[str] = set()
    now = 1000.0
    for delta, event in steps:
        now += delta
        if isinstance(event, ev.TeamPolicyApplied) and "t" in gw.teams and \
                event.policy.version <= gw.teams["t"].version:
            continue
        if isinstance(event, ev.HandshakeSeen):
            event = ev.HandshakeSeen(public_key=event.public_key, at=now - event.at / 10)
        for cmd in [*gw.handle_timer(now), *gw.handle(event, now)]:
            if isinstance(cmd, Quarantine):
                held |= set(cmd.prefixes)
            elif isinstance(cmd, Release):
                held -= set(cmd.prefixes)
            elif isinstance(cmd, Track):
                tracked |= set(cmd.prefixes)
            elif isinstance(cmd, Untrack):
                tracked -= set(cmd.prefixes)
        assert held == gw.enforced_prefixes()
        assert tracked == gw.tracked_prefixes()
    fresh = GatewayState()
    fresh.restore(gw.teams.values(), gw.members.values(),
                  [record_of(p) for p in gw.peers.values() if p.state is not None])
    assert fresh.enforced_prefixes() == gw.enforced_prefixes()


@settings(max_examples=200, deadline=None)
@given(st.lists(event_strategy(), max_size=30))
def test_owing_peers_are_always_enforced(steps: list[tuple[float, ev.Event]]) -> None:
    gw = GatewayState()
    now = 1000.0
    for delta, event in steps:
        now += delta
        if isinstance(event, ev.TeamPolicyApplied) and "t" in gw.teams and \
                event.policy.version <= gw.teams["t"].version:
            continue
        gw.handle_timer(now)
        gw.handle(event, now)
        for peer in gw.peers.values():
            if peer.owes:
                assert peer.state in (PeerState.QUARANTINED, PeerState.LOCKED)
            if peer.state is PeerState.AUTHORIZED:
                assert not peer.owes
