"""Hypothesis properties of the core over random event sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.core import events as ev
from gatewayd.core.model import Factor, PeerState, ProofKind
from gatewayd.core.session import Gateway, record_of
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
                  st.sampled_from(list(Factor)), st.floats(0, 300)),
    )
    return st.tuples(st.floats(0, 400), events)


def setup() -> list[tuple[float, ev.Event]]:
    """A gateway where every peer is mapped and configured, so random sequences reach the interesting states."""
    return [
        (0.0, ev.TeamPolicyApplied(policy=team(1))),
        (0.0, ev.MemberUpserted(member=member(peers=tuple(KEYS), factors=frozenset(Factor)))),
        *[(0.0, ev.PeerConfigured(public_key=k, allowed_ips=(f"10.1.0.{i}/32",))) for i, k in enumerate(KEYS)],
    ]


@settings(max_examples=500, deadline=None)
@given(st.lists(event_strategy(), max_size=40))
def test_no_release_without_fresh_proofs(steps: list[tuple[float, ev.Event]]) -> None:
    """No sequence of events releases a peer that owes a proof without, for every owed kind, an accepted proof
    verified no earlier than the demand."""
    gw = Gateway()
    now = 1000.0
    steps = setup() + steps
    for delta, event in steps:
        now += delta
        if isinstance(event, ev.ProofAccepted):
            event = ev.ProofAccepted(public_key=event.public_key, factor=event.factor,
                                     verified_at=now + event.verified_at)
        if isinstance(event, ev.HandshakeSeen):
            event = ev.HandshakeSeen(public_key=event.public_key, at=now - event.at / 10)
        if isinstance(event, ev.TeamPolicyApplied) and "t" in gw.teams and \
                event.policy.version <= gw.teams["t"].version:
            continue
        before = {k: (p.state, p.owes, p.owes_since) for k, p in gw.peers.items()}
        gw.handle_timer(now)
        mid = {k: (p.state, p.owes, p.owes_since) for k, p in gw.peers.items()}
        gw.handle(event, now)
        for key, peer in gw.peers.items():
            prev = mid.get(key) or before.get(key)
            if prev is None or prev[0] is not PeerState.QUARANTINED or peer.state is not PeerState.AUTHORIZED:
                continue
            owed, since = prev[1], prev[2]
            assert owed and since is not None
            assert isinstance(event, ev.ProofAccepted) and event.public_key == key
            assert event.verified_at >= since
            # every owed kind has been proven since the demand
            proven = {ProofKind.OTP if event.factor is not Factor.DEVICE else ProofKind.DEVICE}
            assert owed <= proven | set(gw_proofs_before(steps, key))


def gw_proofs_before(steps: list[tuple[float, ev.Event]], key: str) -> set[ProofKind]:
    # Conservative: any kind proven anywhere in the sequence for this key (the core keeps the exact record).
    out = set()
    for _, e in steps:
        if isinstance(e, ev.ProofAccepted) and e.public_key == key:
            out.add(ProofKind.DEVICE if e.factor is Factor.DEVICE else ProofKind.OTP)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(event_strategy(), max_size=40))
def test_enforcement_commands_track_state(steps: list[tuple[float, ev.Event]]) -> None:
    """The Quarantine/Release and Track/Untrack commands emitted, replayed in order, always equal the enforced
    and tracked prefixes; and a restore from the records rebuilds the same enforcement."""
    from gatewayd.core.commands import Quarantine, Release, Track, Untrack

    gw = Gateway()
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
    fresh = Gateway()
    fresh.restore(gw.teams.values(), gw.members.values(),
                  [record_of(p) for p in gw.peers.values() if p.state is not None])
    assert fresh.enforced_prefixes() == gw.enforced_prefixes()


@settings(max_examples=200, deadline=None)
@given(st.lists(event_strategy(), max_size=30))
def test_owing_peers_are_always_enforced(steps: list[tuple[float, ev.Event]]) -> None:
    gw = Gateway()
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
