"""`make demo`: the real gatewayd on a WireGuard gateway built in network namespaces on this machine.

Alice's laptop and Bob's laptop are WireGuard peers (each its own wireguard-go); an upstream server sits behind
the gateway. A SIEM asks for a step-up of Alice: the Disconnect cuts her session at once, her client app can
reach only the challenge, she proves with TOTP, and she is released. Bob never notices. Then her team gets TOTP
Prior Connection and her client restarts: held from its first packet until she proves again. Every step is
timed.
Everything the demo creates (namespaces, processes, files) is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Any

import pyotp

from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import GATEWAY_TUNNEL_IP, SERVER_IP, Lab, LabPeer
from gatewayd.v1 import control_pb2, types_pb2

CHALLENGE = f"{GATEWAY_TUNNEL_IP}:9443"
ALICE_SECRET = os.urandom(20)
T0 = time.monotonic()


OUTPUT = threading.Lock()  # the event follower prints from its own thread


def say(text: str, *, took: float | None = None) -> None:
    timing = f"  ({took * 1000:.1f} ms)" if took is not None else ""
    with OUTPUT:
        print(f"[{time.monotonic() - T0:7.3f}s] {text}{timing}", flush=True)


def detail(text: str) -> None:
    with OUTPUT:
        print(f"            {text}", flush=True)


def agent(lab: Lab, ns: str, *args: str) -> dict[str, Any]:
    result = lab.python(ns, "gatewayd.lab.agent", *args)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip())
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def client_app(lab: Lab, peer: LabPeer, code: str) -> tuple[bool, float, list[str]]:
    """The member's client app (gatewayd-client, the reference client) answering with `code` as if typed:
    (authorized, seconds from start to authorized, what it told the member)."""
    started = time.monotonic()
    result = subprocess.run(["ip", "netns", "exec", peer.ns, sys.executable, "-m", "gatewayd_client", "--gateway",
                             CHALLENGE, "--once"], input=code + "\n", capture_output=True, text=True, timeout=60,
                            check=False)
    return result.returncode == 0, time.monotonic() - started, result.stderr.strip().splitlines()


def reach(lab: Lab, peer: LabPeer, to: str = f"{SERVER_IP}:5001") -> str:
    result: str = agent(lab, peer.ns, "probe", "--to", to)["result"]
    return "reaches it" if result == "connected" else f"blocked ({result})"


def gatewayctl(lab: Lab, *args: str) -> None:
    """Show what an operator sees: `gatewayctl ARGS` against the daemon's local socket."""
    result = subprocess.run([sys.executable, "-m", "gatewayd.ctl", "--socket", str(lab.workdir / "control.sock"),
                             *args], capture_output=True, text=True, timeout=30, check=False)
    detail(f"$ gatewayctl {' '.join(args)}")
    for line in (result.stdout or result.stderr).splitlines():
        detail(f"  {line}")


def follow_events(lab: Lab) -> subprocess.Popen[str]:
    """`gatewayctl events --follow`, printed live into the timeline as an operator would see it."""
    proc = subprocess.Popen([sys.executable, "-m", "gatewayd.ctl", "--socket", str(lab.workdir / "control.sock"),
                             "events", "--follow"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            fields = line.split(None, 4)
            if len(fields) >= 4:
                detail(f"| gatewayctl events --follow: {fields[2]:20} {fields[3][:56]}")

    threading.Thread(target=pump, daemon=True).start()
    return proc


def run_demo(lab: Lab) -> None:
    started = time.monotonic()
    lab.up()
    alice, bob = lab.peers
    say(f"lab up: gateway, server {SERVER_IP}, two peers with their own wireguard-go",
        took=time.monotonic() - started)
    gw = LabGateway(lab)
    ready = gw.start()
    say("gatewayd running (config/gatewayd.toml defaults), nftables reconciled, READY=1 to systemd", took=ready)
    ctl = gw.control()
    events = follow_events(lab)
    time.sleep(0.5)
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
        say(f"control plane: member {member} enrolled (TOTP), device {peer.public_key[:12]}…",
            took=time.monotonic() - t)
    for peer in (alice, bob):
        lab.wait_handshake(peer)
    sink = lab.spawn(lab.srv_ns, sys.executable, "-m", "gatewayd.lab.agent", "sink", "--out",
                     str(lab.workdir / "sink.json"), log="sink.log")
    time.sleep(0.5)
    say(f"alice and bob are connected; the server {reach(lab, alice)} from alice, {reach(lab, bob)} from bob")
    gatewayctl(lab, "sessions")

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
    gatewayctl(lab, "sessions", "--state", "quarantined")
    say(f"alice: server {reach(lab, alice)}; gateway SSH {reach(lab, alice, f'{GATEWAY_TUNNEL_IP}:22')}; "
        f"challenge {reach(lab, alice, CHALLENGE)}")
    say(f"bob: server {reach(lab, bob)} (untouched)")
    challenge = agent(lab, alice.ns, "challenge", "--gateway", CHALLENGE)
    say(f"alice's app asks what it owes: {challenge.get('owes')} with {challenge.get('accepted_factors')}, "
        f"{challenge.get('attempts_left')} attempts left")
    code = str(pyotp.TOTP(base64.b32encode(ALICE_SECRET).decode()).now())
    released, took, told = client_app(lab, alice, code)
    say(f"alice's client app (gatewayd-client) prompts her; she types her TOTP code: authorized={released} "
        "(app start to authorized)", took=took)
    for line in told:
        detail(f"gatewayd-client: {line}")
    say(f"alice: server {reach(lab, alice)} again")
    flood.wait(30)
    try:
        watch.wait(15)
    except subprocess.TimeoutExpired:  # the app saw fewer changes (e.g. two in quick succession as one): say so
        Lab.stop(watch)
        detail("alice's app stopped watching before it saw three states")
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
    held = restart_held_from_first_packet(lab, ctl, alice, code)
    gatewayctl(lab, "sessions")
    gatewayctl(lab, "status")
    time.sleep(0.3)
    Lab.stop(events)
    code_ = gw.stop()
    say(f"gatewayd stopped (exit {code_}); its nftables table stays in place (fail closed)")
    if after:
        raise SystemExit(f"FAILED: {after} datagrams passed after the Disconnect")
    if held:
        raise SystemExit(f"FAILED: {held} datagrams of alice's restarted client passed before her proof")


def session_reason(lab: Lab, peer: LabPeer) -> str:
    """Why gatewayd's latest session.started for the peer was a new session (from its log)."""
    reason = "?"
    for line in (lab.workdir / "gatewayd.log").read_text(errors="replace").splitlines():
        msg = json.loads(line).get("msg", "") if line.startswith("{") else ""
        if msg.startswith(f"event session.started peer/{peer.public_key} "):
            reason = json.loads(msg.split(" ", 3)[3]).get("reason", "?")
    return reason


def restart_held_from_first_packet(lab: Lab, ctl: Any, alice: LabPeer, used_code: str) -> int:
    """Part two: TOTP Prior Connection, and alice's client restarts. Returns how many of the restarted
    client's datagrams reached the server before her proof (must be 0)."""
    t = time.monotonic()
    ctl.ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
        team_id="acme", version=2, scope=types_pb2.MFA_SCOPE_BOTH, roles=types_pb2.MFA_ROLES_ALL,
        totp_prior_connection=True)))
    say("control plane: team 'acme' policy v2, TOTP Prior Connection (alice proved in this session and keeps it; "
        "bob owes his proof now)", took=time.monotonic() - t)
    sink = lab.spawn(lab.srv_ns, sys.executable, "-m", "gatewayd.lab.agent", "sink", "--out",
                     str(lab.workdir / "sink2.json"), log="sink2.log")
    time.sleep(0.5)
    lab.restart_client(alice)
    t = time.monotonic()
    flood = agent(lab, alice.ns, "flood", "--to", f"{SERVER_IP}:5000", "--tag", "restarted", "--rate", "500",
                  "--duration", "2")
    say(f"alice's client restarts (same key and port, no session keys) and sends {flood['sent']} datagrams "
        f"from its first packet; gatewayd opened her handshake initiation, decided a new session "
        f"({session_reason(lab, alice)}) and quarantined her before the initiation went on",
        took=time.monotonic() - t)
    say(f"alice: server {reach(lab, alice)}; challenge {reach(lab, alice, CHALLENGE)}")
    totp = pyotp.TOTP(base64.b32encode(ALICE_SECRET).decode())
    if totp.now() == used_code:
        detail("waiting for alice's next TOTP code (a code counts once)")
    while (code := totp.now()) == used_code:
        time.sleep(0.5)
    released, took, _ = client_app(lab, alice, code)
    say(f"alice proves again with gatewayd-client: authorized={released}; server {reach(lab, alice)}", took=took)
    Lab.stop(sink)
    datagrams = json.loads((lab.workdir / "sink2.json").read_text())["datagrams"]
    held = sum(1 for d in datagrams if d["tag"] == "restarted")
    say(f"server saw {held} of the restarted client's datagrams before her proof (must be 0)")
    return held


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces, nftables, wireguard-go)", file=sys.stderr)
        return 1

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both end the demo through its cleanup, however it was started (a background job
    # from a script starts with SIGINT ignored).
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
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
