"""`make demo`: the real gatewayd on a WireGuard gateway built in network namespaces on this machine.

Alice's laptop and Bob's laptop are WireGuard peers (each its own wireguard-go); an upstream server sits behind
the gateway. A SIEM asks for a step-up of Alice: the Disconnect cuts her session at once, her client app can
reach only the challenge, she proves with TOTP, and she is released. Bob never notices. Every step is timed.
Everything the demo creates (namespaces, processes, files) is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

import pyotp

from gatewayd.lab.gateway import Gateway
from gatewayd.lab.netlab import GATEWAY_TUNNEL_IP, SERVER_IP, Lab, LabPeer
from gatewayd.v1 import control_pb2, types_pb2

CHALLENGE = f"{GATEWAY_TUNNEL_IP}:9443"
ALICE_SECRET = os.urandom(20)
T0 = time.monotonic()


def say(text: str, *, took: float | None = None) -> None:
    timing = f"  ({took * 1000:.1f} ms)" if took is not None else ""
    print(f"[{time.monotonic() - T0:7.3f}s] {text}{timing}", flush=True)


def detail(text: str) -> None:
    print(f"            {text}", flush=True)


def agent(lab: Lab, ns: str, *args: str) -> dict[str, Any]:
    result = lab.python(ns, "gatewayd.lab.agent", *args)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def reach(lab: Lab, peer: LabPeer, to: str = f"{SERVER_IP}:5001") -> str:
    result: str = agent(lab, peer.ns, "probe", "--to", to)["result"]
    return "reaches it" if result == "connected" else f"blocked ({result})"


def sessions_table(gw: Gateway, names: dict[str, str]) -> None:
    listed = gw.control().ListSessions(control_pb2.ListSessionsRequest())
    detail(f"{'member':8} {'device':13} {'tunnel IPs':26} {'state':12} owes")
    for s in listed.sessions:
        state = types_pb2.PeerState.Name(s.state).removeprefix("PEER_STATE_").lower()
        owes = ",".join(types_pb2.ProofKind.Name(k).removeprefix("PROOF_KIND_").lower() for k in s.owes) or "-"
        detail(f"{s.member_id or '-':8} {names.get(s.peer_public_key, '?'):13} {', '.join(s.tunnel_ips):26} "
               f"{state:12} {owes}")


def run_demo(lab: Lab) -> None:
    started = time.monotonic()
    lab.up()
    alice, bob = lab.peers
    names = {alice.public_key: "alice-laptop", bob.public_key: "bob-laptop"}
    say(f"lab up: gateway, server {SERVER_IP}, two peers with their own wireguard-go",
        took=time.monotonic() - started)
    gw = Gateway(lab)
    ready = gw.start()
    say("gatewayd running (config/gatewayd.toml defaults), nftables reconciled, READY=1 to systemd", took=ready)
    ctl = gw.control()
    t = time.monotonic()
    res = ctl.ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
        team_id="acme", version=1, scope=types_pb2.MFA_SCOPE_BOTH, roles=types_pb2.MFA_ROLES_ALL)))
    say("control plane: team 'acme' MFA policy v1 (no connection policy)", took=time.monotonic() - t)
    for w in res.warnings:
        detail(f"warning: {w}")
    for member, peer, secret in (("alice", alice, ALICE_SECRET), ("bob", bob, os.urandom(20))):
        t = time.monotonic()
        ctl.UpsertMember(control_pb2.UpsertMemberRequest(
            member_id=member, team_id="acme", role=types_pb2.MEMBER_ROLE_MEMBER, peer_public_keys=[peer.public_key],
            totp=control_pb2.TotpEnrollment(secret=secret, digits=6)))
        say(f"control plane: member {member} enrolled (TOTP), device {names[peer.public_key]}",
            took=time.monotonic() - t)
    for peer in (alice, bob):
        lab.wait_handshake(peer)
    sink = lab.spawn(lab.srv_ns, sys.executable, "-m", "gatewayd.lab.agent", "sink", "--out",
                     str(lab.workdir / "sink.json"), log="sink.log")
    time.sleep(0.5)
    say(f"alice and bob are connected; the server {reach(lab, alice)} from alice, {reach(lab, bob)} from bob")
    sessions_table(gw, names)

    flood = lab.spawn(alice.ns, sys.executable, "-m", "gatewayd.lab.agent", "flood", "--to", f"{SERVER_IP}:5000",
                      "--tag", "alice", "--rate", "1000", "--duration", "4", log="flood.log")
    watch = lab.spawn(alice.ns, sys.executable, "-m", "gatewayd.lab.agent", "watch", "--gateway", CHALLENGE,
                      "--count", "3", log="watch.log")
    time.sleep(1.5)
    say("alice streams 1000 datagrams/s to the server; her client app watches its status at the gateway")
    asked = time.time()
    t = time.monotonic()
    res = ctl.Disconnect(control_pb2.DisconnectRequest(
        member_id="alice", reason="SIEM: login from an unusual country", idempotency_key="siem-4711"))
    answered = time.time()
    say(f"SIEM -> Disconnect(alice): {res.sessions_cut} session cut, {res.peers_quarantined} peer quarantined, "
        "keys dropped, flows flushed, committed", took=time.monotonic() - t)
    for w in res.warnings:
        detail(f"warning: {w}")
    say(f"alice: server {reach(lab, alice)}; gateway SSH {reach(lab, alice, f'{GATEWAY_TUNNEL_IP}:22')}; "
        f"challenge {reach(lab, alice, CHALLENGE)}")
    say(f"bob: server {reach(lab, bob)} (untouched)")
    challenge = agent(lab, alice.ns, "challenge", "--gateway", CHALLENGE)
    say(f"alice's app asks what it owes: {challenge.get('owes')} with {challenge.get('accepted_factors')}, "
        f"{challenge.get('attempts_left')} attempts left")
    code = str(pyotp.TOTP(base64.b32encode(ALICE_SECRET).decode()).now())
    t = time.monotonic()
    proof = agent(lab, alice.ns, "totp", "--gateway", CHALLENGE, "--code", code)
    say(f"alice enters her TOTP code: accepted={proof.get('accepted', False)}, released",
        took=time.monotonic() - t)
    say(f"alice: server {reach(lab, alice)} again")
    flood.wait(30)
    watch.wait(30)
    Lab.stop(sink)
    datagrams = json.loads((lab.workdir / "sink.json").read_text())["datagrams"]
    mine = [d for d in datagrams if d["tag"] == "alice"]
    before = sum(1 for d in mine if d["received"] < asked)
    late = sum(1 for d in mine if asked <= d["received"] and d["sent"] <= answered)
    after = sum(1 for d in mine if d["sent"] > answered)
    say(f"server saw {before} of alice's datagrams before the Disconnect, {after} sent after its answer "
        f"(must be 0), {late} in flight while it ran")
    for line in (lab.workdir / "watch.log").read_text().splitlines():
        if line.startswith("{"):
            status = json.loads(line)
            detail(f"alice's app was told: {status.get('state', status.get('error'))}")
    sessions_table(gw, names)
    events = gw.control().WatchEvents(control_pb2.WatchEventsRequest(after_cursor=0), timeout=2)
    said = []
    try:
        for e in events:
            said.append(f"{e.type} {e.subject}")
    except Exception:  # noqa: S110 - the stream ends at its deadline
        pass
    say(f"security events recorded ({len(said)}), as the SOC sees them:")
    for line in said:
        detail(line)
    code_ = gw.stop()
    say(f"gatewayd stopped (exit {code_}); its nftables table stays in place (fail closed)")
    if after:
        raise SystemExit(f"FAILED: {after} datagrams passed after the Disconnect")


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces, nftables, wireguard-go)", file=sys.stderr)
        return 1

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    lab = Lab(peers_wanted=2)
    try:
        run_demo(lab)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        lab.down()
        left = ", ".join(lab.namespaces()) or "none left"
        say(f"cleaned up: namespaces {left}, processes stopped, scratch files removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
