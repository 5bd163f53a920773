from __future__ import annotations

from gatewayd.core.model import PeerState
from gatewayd.v1 import challenge_pb2, control_pb2, types_pb2
from tests.harness import Harness, gw, key

__all__ = ["gw"]


async def test_disconnect_then_totp_releases(gw: Harness) -> None:
    gw.source.add(key(1), "127.0.0.1/32", handshake=gw.clock() - 5)
    await gw.enroll("alice", (key(1),))
    await gw.policy(1)
    await gw.poll()
    assert gw.daemon.core.peers[key(1)].state is PeerState.AUTHORIZED
    res = await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", reason="siem",
                                                                    idempotency_key="k1"))
    assert res.peers_quarantined == 1 and res.sessions_cut == 1
    assert "127.0.0.1/32" in gw.enforcer.held
    assert gw.source.resets == [key(1)]
    ch = gw.challenge()
    c = await ch.GetChallenge(challenge_pb2.GetChallengeRequest())
    assert c.state == types_pb2.PEER_STATE_QUARANTINED
    r = await ch.SubmitTotp(challenge_pb2.SubmitTotpRequest(code=gw.code()))
    assert r.accepted
    assert "127.0.0.1/32" not in gw.enforcer.held
