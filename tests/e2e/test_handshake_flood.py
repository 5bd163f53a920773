"""A handshake flood from one source (garbage, right-mac1 junk and replayed initiations at 20,000 packets/s)
while 100 other peers handshake and Disconnects run: nftables cuts the flood to the per-source rate before the
queue, the other peers' handshakes all complete, the Disconnects are enforced, and the replayed initiation
changes nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import WG_PORT, Lab
from gatewayd.v1 import control_pb2, types_pb2
from tests.conftest import kernel_missing
from tests.e2e.conftest import Agent

pytestmark = pytest.mark.kernel

PEERS = 100


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if kernel_missing():
        pytest.skip("the lab needs the kernel")  # turned into a failure by the kernel marker in CI
    lab = Lab(peers_wanted=PEERS)
    with lab.running():
        yield lab


def test_a_flood_from_one_source_does_not_stop_other_handshakes_or_disconnects(lab: Lab, agent: Agent) -> None:
    gw = LabGateway(lab)
    gw.start()
    try:
        peers = lab.peers[:PEERS]
        control = gw.control()
        for i, p in enumerate(peers):
            control.UpsertMember(control_pb2.UpsertMemberRequest(
                member_id=f"m{i}", team_id="blue", role=types_pb2.MEMBER_ROLE_MEMBER, peer_public_keys=[p.public_key],
                totp=control_pb2.TotpEnrollment(secret=b"flood-test-secret-01", digits=6)))

        def rehandshake_all(timeout: float) -> None:
            before = {p.public_key: lab.handshake_of(p) for p in peers}
            for p in peers:
                lab.restart_client(p)
            for p in peers:
                lab.wait_handshake(p, after=before[p.public_key], timeout=timeout)

        rehandshake_all(60)  # gatewayd has now seen an initiation of every peer
        victim = peers[1]
        attacker = lab.add_clone(peers[0])  # a machine of its own on the underlay (its WireGuard stays quiet)
        flood = agent.background(attacker.ns, "handshakes", "--to", f"{attacker.underlay_gw}:{WG_PORT}",
                                 "--gateway-key", lab.gw_public, "--peer-key", victim.private_key, "--kind", "mix",
                                 "--rate", "20000", "--duration", "25", log="handshake-flood.log")
        time.sleep(2)
        cut = peers[50:60]
        for i in range(50, 60):
            res = control.Disconnect(control_pb2.DisconnectRequest(member_id=f"m{i}", reason="flood test",
                                                                   idempotency_key=f"flood-{i}"))
            assert res.peers_quarantined == 1
        rehandshake_all(60)
        assert flood.poll() is None, "the flood ended before the handshakes did"
        flood.wait(60)
        report = json.loads((lab.workdir / "handshake-flood.log").read_text().strip().splitlines()[-1])
        assert report["sent"] >= 100_000, report  # at least 4,000/s for 25 s on this 2-core machine
        for p in peers:
            want = types_pb2.PEER_STATE_QUARANTINED if p in cut else types_pb2.PEER_STATE_AUTHORIZED
            got = control.GetSession(control_pb2.GetSessionRequest(peer_public_key=p.public_key))
            assert got.state == want, (p.index, got)
        # The replayed initiation did not move the victim: its endpoint is still its own machine's.
        victim_session = control.GetSession(control_pb2.GetSessionRequest(peer_public_key=victim.public_key))
        assert victim_session.endpoint.startswith(victim.underlay + ":"), victim_session.endpoint
    finally:
        assert gw.stop() == 0, gw.log_tail()
