"""Someone else changes gatewayd's nftables table while a peer is quarantined and floods the server: the
daemon notices at once (nftables notifications), restores the table in one transaction, and after the repair
not one datagram of the quarantined peer reaches the server. Each kind of drift a firewall manager or an
operator can cause, including Debian's own nftables.service reload (its /etc/nftables.conf starts with
`flush ruleset`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import Lab, run
from gatewayd.v1 import control_pb2, types_pb2
from tests.e2e.conftest import UDP, Agent, Sink
from tests.e2e.test_gateway import disconnect, enroll, of, wait_state

pytestmark = pytest.mark.kernel

DEBIAN_CONF = Path("/etc/nftables.conf")
LABFW = ("table inet labfw {\n chain forward_other {\n type filter hook forward priority 0; policy accept;\n"
         " ct state established,related counter accept\n }\n}\n")


def drift_commands(kind: str, tunnel_ip: str) -> list[list[str]]:
    return {
        "table deleted": [["nft", "delete", "table", "inet", "gatewayd"]],
        "quarantine set flushed": [["nft", "flush", "set", "inet", "gatewayd", "quarantine4"]],
        "one element deleted": [["nft", "delete", "element", "inet", "gatewayd", "quarantine4", f"{{ {tunnel_ip} }}"]],
        "forward chain flushed": [["nft", "flush", "chain", "inet", "gatewayd", "forward_quarantine"]],
        "flush ruleset": [["nft", "flush", "ruleset"]],
        "Debian nftables.service reload": [["nft", "-f", str(DEBIAN_CONF)]],
    }[kind]


def holds(lab: Lab, tunnel_ip: str) -> bool:
    listing = run("nft", "list", "table", "inet", "gatewayd", ns=lab.gw_ns, check=False)
    return listing.returncode == 0 and tunnel_ip in listing.stdout and "ip saddr @quarantine4 reject" in listing.stdout


@pytest.mark.parametrize("kind", ["table deleted", "quarantine set flushed", "one element deleted",
                                  "forward chain flushed", "flush ruleset", "Debian nftables.service reload"])
def test_drift_is_repaired_at_once(lab: Lab, gateway: LabGateway, agent: Agent, sink: Sink, kind: str) -> None:
    if kind.startswith("Debian") and not DEBIAN_CONF.exists():
        pytest.fail("Debian's /etc/nftables.conf is missing (the nftables package installs it)")
    p1 = lab.peers[0]
    enroll(gateway, "alice", p1)
    wait_state(gateway, p1, types_pb2.PEER_STATE_AUTHORIZED)
    disconnect(gateway, "alice", f"drift-{kind}")
    assert holds(lab, p1.tunnel_ip)
    flood = agent.background(p1.ns, "flood", "--to", UDP, "--tag", "p1", "--rate", "500", "--duration", "3",
                             log="flood-drift.log")
    try:
        time.sleep(0.5)
        started = time.time()
        for cmd in drift_commands(kind, p1.tunnel_ip):
            run(*cmd, ns=lab.gw_ns)
        changed = time.time()
        while not holds(lab, p1.tunnel_ip):
            assert time.time() - changed < 2, f"not repaired within 2 s ({kind})"
            time.sleep(0.005)
        repaired = time.time()
        flood.wait(20)
    finally:
        if kind in ("flush ruleset", "Debian nftables.service reload"):
            run("nft", "delete", "table", "inet", "filter", ns=lab.gw_ns, check=False)
            run("nft", "-f", "-", ns=lab.gw_ns, input_=LABFW)  # the lab's other firewall, flushed too
    got = of(sink.collect()["datagrams"], "p1")
    late = [d for d in got if d["received"] > repaired]
    assert late == [], f"{len(late)} datagrams of the quarantined peer reached the server after the repair"
    assert repaired - started < 1.0
    status = gateway.control().GetStatus(control_pb2.GetStatusRequest(), timeout=5)
    assert status.enforcement_healthy and status.enforcement_verified_at.ToNanoseconds() / 1e9 >= changed - 1
    assert "enforcement drift repaired" in gateway.log_tail(50)
