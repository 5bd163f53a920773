"""When a session starts, decided from handshake initiations as they arrive (README, "How sessions are
detected"). Each rule is played from both sides."""

from __future__ import annotations

import itertools

from gatewayd.core import events as ev
from gatewayd.core.commands import Publish
from gatewayd.core.model import Factor
from gatewayd.core.state import (
    EARLIEST_REKEY,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    RETRY_WINDOW,
    SessionStart,
)
from tests.core.playbook import K1, Play, member, published, quarantined, team

IP1 = "10.0.0.2/32"
HOME, ELSEWHERE = "192.0.2.10:40000", "203.0.113.7:40000"
_stamps = itertools.count(1)


def initiation(at: float, *, endpoint: str = HOME, recent: bool = True, stamp: bytes | None = None,
               key: str = K1) -> ev.HandshakeInitiated:
    return ev.HandshakeInitiated(public_key=key, endpoint=endpoint, at=at, recent_data=recent,
                                 stamp=stamp if stamp is not None else next(_stamps).to_bytes(12, "big"))


def proven_session(*, new_endpoint: bool = True) -> tuple[Play, float]:
    """A member of a team with TOTP prior connection whose first session was proven; returns the play and the
    time of that session's initiation."""
    play = Play(detection=True, new_endpoint=new_endpoint)
    play(ev.TeamPolicyApplied(policy=team(totp=True)))
    play(ev.MemberUpserted(member=member()))
    play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,), endpoint=HOME))
    start = play.now + 1
    why, _ = play.initiate(initiation(start, recent=False))
    assert why is SessionStart.NO_SESSION
    assert play.state() == "quarantined"
    counted, _ = play.prove(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=start + 1))
    assert counted and play.state() == "authorized"
    return play, start


def test_the_first_initiation_of_a_peer_is_a_new_session_held_before_its_verdict() -> None:
    play = Play(detection=True)
    play(ev.TeamPolicyApplied(policy=team(totp=True)))
    play(ev.MemberUpserted(member=member()))
    play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    assert play.gw.enforced_prefixes() == {IP1}  # owed from the moment the peer is configured
    why, out = play.initiate(initiation(play.now + 1, recent=False))
    assert why is SessionStart.NO_SESSION
    assert play.gw.enforced_prefixes() == {IP1}
    assert "session.started" in published(out)


def test_a_restart_earlier_than_any_rekey_is_a_new_session_even_with_recent_data() -> None:
    play, start = proven_session()
    why, out = play.initiate(initiation(start + 5))
    assert why is SessionStart.EARLY and quarantined(out) == {IP1}
    assert play.state() == "quarantined"


def test_a_running_client_that_sends_and_rekeys_on_time_keeps_its_session() -> None:
    play, start = proven_session()
    why, out = play.initiate(initiation(start + REKEY_AFTER_TIME + 0.05, recent=True))
    assert why is None and out == []
    assert play.state() == "authorized"
    # And the next rekey counts from this one, not from the first handshake.
    why, _ = play.initiate(initiation(start + 2 * REKEY_AFTER_TIME + 0.1, recent=True))
    assert why is None and play.state() == "authorized"


def test_the_rekey_margin_is_the_earliest_rekey_and_no_earlier() -> None:
    play, start = proven_session()
    assert play.initiate(initiation(start + EARLIEST_REKEY, recent=True))[0] is None
    play, start = proven_session()
    assert play.initiate(initiation(start + EARLIEST_REKEY - 0.01, recent=True))[0] is SessionStart.EARLY


def test_an_idle_client_reconnecting_between_rekey_and_reject_time_is_a_new_session() -> None:
    """The 120-180 s window: without data from its endpoint lately, the client has no keys to send with."""
    for after in (REKEY_AFTER_TIME + 1, 129.0, 150.0, REJECT_AFTER_TIME - 1):
        play, start = proven_session()
        why, out = play.initiate(initiation(start + after, recent=False))
        assert why is SessionStart.IDLE, after
        assert quarantined(out) == {IP1}


def test_an_initiation_from_another_endpoint_is_a_new_session_unless_configured_off() -> None:
    play, start = proven_session()
    why, out = play.initiate(initiation(start + REKEY_AFTER_TIME + 1, endpoint=ELSEWHERE, recent=True))
    assert why is SessionStart.NEW_ENDPOINT and quarantined(out) == {IP1}
    event = next(c for c in out if isinstance(c, Publish) and c.type == "session.started")
    assert event.data["endpoint"] == ELSEWHERE and event.data["previous_endpoint"] == HOME
    play, start = proven_session(new_endpoint=False)
    why, _ = play.initiate(initiation(start + REKEY_AFTER_TIME + 1, endpoint=ELSEWHERE, recent=True))
    assert why is None and play.state() == "authorized"


def test_after_the_session_ended_any_initiation_is_a_new_session() -> None:
    play, start = proven_session()
    play.timer(start + REJECT_AFTER_TIME + 1)
    assert play.state() == "quarantined"  # the session ended: the next one owes its proof already
    play, start = proven_session()
    why, _ = play.initiate(initiation(start + REJECT_AFTER_TIME + 0.5, recent=True))
    assert why is SessionStart.NO_SESSION


def test_a_replayed_initiation_changes_nothing() -> None:
    play, start = proven_session()
    stamp = (10**9).to_bytes(12, "big")
    assert play.initiate(initiation(start + REKEY_AFTER_TIME, stamp=stamp))[0] is None
    # The same initiation again from elsewhere, or an older one, early: WireGuard drops it, and so must we.
    for replay in (stamp, (10**9 - 1).to_bytes(12, "big")):
        why, out = play.initiate(initiation(start + REKEY_AFTER_TIME + 2, endpoint=ELSEWHERE, stamp=replay))
        assert why is None and out == []
    assert play.state() == "authorized"
    assert play.gw.peers[K1].endpoint == HOME


def test_a_retried_rekey_continues_it_but_a_retried_restart_does_not_release() -> None:
    play, start = proven_session()
    rekey = start + REKEY_AFTER_TIME + 0.1
    assert play.initiate(initiation(rekey, recent=True))[0] is None
    # The answer was lost: the client retries 5 s later, still sending on its old keys.
    assert play.initiate(initiation(rekey + RETRY_WINDOW - 1, recent=True))[0] is None
    assert play.state() == "authorized"
    # A "retry" with no data from the endpoint is a restarted client.
    assert play.initiate(initiation(rekey + RETRY_WINDOW - 0.5, recent=False))[0] is SessionStart.EARLY
    # Its own retries keep the demand (no second demand that would void a proof given meanwhile).
    since = play.gw.peers[K1].owes_since
    why, out = play.initiate(initiation(play.now + 5, recent=False))
    assert why is SessionStart.EARLY and out == [] and play.gw.peers[K1].owes_since == since


def test_a_read_that_reports_the_handshake_after_its_initiation_does_not_start_it_again() -> None:
    play, start = proven_session()
    # The poll catches up with the handshake the queue already decided (and the member already proved).
    out = play(ev.HandshakeSeen(public_key=K1, at=start + 0.01), at=start + 20)
    assert "session.started" not in published(out) and play.state() == "authorized"
    # A rekey the queue saw keeps the session alive past the polled handshake's reject time.
    play.initiate(initiation(start + REKEY_AFTER_TIME + 0.1, recent=True))
    play.timer(start + REJECT_AFTER_TIME + 1)
    assert play.state() == "authorized"


def test_without_the_queue_a_read_still_decides_restarts_by_time() -> None:
    play = Play(detection=False)
    play(ev.TeamPolicyApplied(policy=team(totp=True)))
    play(ev.MemberUpserted(member=member()))
    play(ev.PeerConfigured(public_key=K1, allowed_ips=(IP1,)))
    play(ev.HandshakeSeen(public_key=K1, at=play.now))
    play.prove(ev.ProofAccepted(public_key=K1, factor=Factor.TOTP, verified_at=play.now + 1))
    out = play(ev.HandshakeSeen(public_key=K1, at=play.now + 5), at=play.now + 6)
    assert quarantined(out) == {IP1}


def test_an_initiation_for_a_peer_not_on_the_interface_is_ignored() -> None:
    play = Play(detection=True)
    play(ev.MemberUpserted(member=member()))
    why, out = play.initiate(initiation(play.now + 1))
    assert why is None and out == []


def by_gateway(at: float, *, recent: bool) -> ev.HandshakeInitiated:
    return ev.HandshakeInitiated(public_key=K1, endpoint=HOME, at=at, recent_data=recent, stamp=b"", by_gateway=True)


def test_the_gateway_reinitiating_a_live_session_its_client_stopped_answering_is_a_new_session() -> None:
    """WireGuard on the gateway initiates when it sent data and heard nothing for 15 s: the client restarted (a
    silent one answers this initiation with fresh keys) or its path broke. Either way whoever answers owes."""
    play, start = proven_session()
    why, out = play.initiate(by_gateway(start + 20, recent=False))
    assert why is SessionStart.UNANSWERED and quarantined(out) == {IP1}
    event = next(c for c in out if isinstance(c, Publish) and c.type == "session.started")
    assert event.data["initiated_by"] == "gateway"
    assert play.gw.peers[K1].endpoint == HOME
    # Its retries every 5 s do not demand again.
    since = play.gw.peers[K1].owes_since
    assert play.initiate(by_gateway(start + 25, recent=False)) == (SessionStart.UNANSWERED, [])
    assert play.gw.peers[K1].owes_since == since


def test_the_gateway_rekeying_a_session_it_initiated_with_a_responsive_client_keeps_it() -> None:
    play, start = proven_session()
    assert play.initiate(by_gateway(start + REKEY_AFTER_TIME + 0.2, recent=True))[0] is None
    assert play.state() == "authorized"
    # The gateway's initiations carry no readable stamp: a later client initiation is judged on its own.
    assert play.initiate(initiation(start + 2 * REKEY_AFTER_TIME, recent=True))[0] is None
