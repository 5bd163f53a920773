"""gatewayd-client over a real WireGuard tunnel (wireguard-go in namespaces): it releases a quarantined peer with
a TOTP code typed at a terminal (a pseudo-terminal: the code is read without echo), a backup code, and a
device assertion; then the peer reaches the server again."""

from __future__ import annotations

import base64
import hashlib
import os
import pty
import select
import subprocess
import sys
import time

import pyotp
import pytest

from gatewayd.auth import backup
from gatewayd.lab.authenticator import SoftAuthenticator
from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import GATEWAY_TUNNEL_IP, SERVER_IP, Lab, LabPeer
from gatewayd.v1 import control_pb2, types_pb2
from tests.e2e.conftest import Agent

pytestmark = pytest.mark.kernel

CHALLENGE = f"{GATEWAY_TUNNEL_IP}:9443"
SECRET = b"client-app-secret-01"
BLOCKED = ("EHOSTUNREACH", "timeout")


def client(peer: LabPeer, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", peer.ns, sys.executable, "-m", "gatewayd_client", "--gateway",
                           CHALLENGE, "--once", *args], input=stdin, capture_output=True, text=True, timeout=60,
                          check=False)


def quarantine(gw: LabGateway, member: str, peer: LabPeer, key: str, **enroll: object) -> None:
    gw.control().UpsertMember(control_pb2.UpsertMemberRequest(
        member_id=member, team_id="apps", role=types_pb2.MEMBER_ROLE_MEMBER, peer_public_keys=[peer.public_key],
        **enroll))  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while gw.control().GetSession(control_pb2.GetSessionRequest(peer_public_key=peer.public_key)).state \
            != types_pb2.PEER_STATE_AUTHORIZED:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    gw.control().Disconnect(control_pb2.DisconnectRequest(member_id=member, idempotency_key=key))


def test_totp_typed_at_a_terminal_releases_the_peer(lab: Lab, gateway: LabGateway, agent: Agent) -> None:
    peer = lab.peers[0]
    quarantine(gateway, "tess", peer, "pty", totp=control_pb2.TotpEnrollment(secret=SECRET, digits=6))
    assert agent.probe(peer, f"{SERVER_IP}:5001") in BLOCKED
    pid, fd = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pseudo-terminal
        os.execvp("ip", ["ip", "netns", "exec", peer.ns, sys.executable, "-m", "gatewayd_client", "--gateway",  # noqa: S606
                         CHALLENGE, "--once"])
    screen = b""

    def until(text: bytes, timeout: float = 30) -> None:
        nonlocal screen
        deadline = time.monotonic() + timeout
        while text not in screen:
            assert time.monotonic() < deadline, screen.decode(errors="replace")
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    screen += os.read(fd, 4096)
                except OSError:
                    break

    try:
        until(b"attempts left): ")
        assert b"authenticator code" in screen
        typed = str(pyotp.TOTP(base64.b32encode(SECRET).decode()).now())
        os.write(fd, typed.encode() + b"\r")
        until(b"authorized: the tunnel is open")
        assert typed.encode() not in screen  # not echoed
        assert b"accepted" in screen
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
    assert agent.probe(peer, f"{SERVER_IP}:5001") in ("connected", "ECONNREFUSED")


def test_a_backup_code_releases_the_peer(lab: Lab, gateway: LabGateway, agent: Agent) -> None:
    peer = lab.peers[1]
    salt = os.urandom(16)
    hashes = [hashlib.scrypt(backup.normalize(c), salt=salt, n=2**10, r=8, p=1, dklen=32)
              for c in ("BKUP-1111-AAAA", "BKUP-2222-BBBB")]
    quarantine(gateway, "bart", peer, "bk", backup_codes=control_pb2.BackupCodeSet(
        salt=salt, n=2**10, r=8, p=1, hashes=hashes))
    assert agent.probe(peer, f"{SERVER_IP}:5001") in BLOCKED
    done = client(peer, stdin="bkup-2222-bbbb\n")
    assert done.returncode == 0, done.stderr
    assert "accepted (1 backup codes left)" in done.stderr and "backup code" in done.stderr
    assert agent.probe(peer, f"{SERVER_IP}:5001") in ("connected", "ECONNREFUSED")


def test_a_device_assertion_releases_the_peer(lab: Lab, gateway: LabGateway, agent: Agent) -> None:
    peer = lab.peers[1]
    auth = SoftAuthenticator()
    quarantine(gateway, "dana", peer, "dev", replace_device_credentials=True, device_credentials=[
        control_pb2.DeviceCredential(credential_id=auth.credential_id, cose_public_key=auth.cose_public_key,
                                     user_handle=auth.user_handle)])
    assert agent.probe(peer, f"{SERVER_IP}:5001") in BLOCKED
    key_file = lab.workdir / "dana.pem"
    key_file.write_bytes(auth.private_pem())
    done = client(peer, "--software-key", str(key_file), "--credential-id", auth.credential_id.hex(),
                  "--user-handle", auth.user_handle.hex())
    assert done.returncode == 0, done.stderr
    assert "confirm with your security key" in done.stderr and "accepted" in done.stderr
    assert agent.probe(peer, f"{SERVER_IP}:5001") in ("connected", "ECONNREFUSED")
