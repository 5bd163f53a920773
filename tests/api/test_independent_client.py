"""A client generated from proto/ alone, in its own process that cannot import gatewayd's package, drives
UpsertMember, ApplyTeamPolicy, Disconnect, ListSessions and WatchEvents over mTLS."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

from tests.harness import Harness, gw, key
from tests.test_proto import generate

__all__ = ["gw"]

CLIENT = textwrap.dedent('''
    import sys, grpc
    sys.path.insert(0, sys.argv[1])
    from gatewayd.v1 import control_pb2, control_pb2_grpc, types_pb2
    assert control_pb2.__file__.startswith(sys.argv[1]), control_pb2.__file__
    port, ca, cert, key, peer = sys.argv[2:7]
    creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(), open(cert, "rb").read())
    with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        stub = control_pb2_grpc.ControlServiceStub(ch)
        events = stub.WatchEvents(control_pb2.WatchEventsRequest(type_prefixes=["disconnect."]))
        dict(events.initial_metadata())
        stub.ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
            team_id="blue", version=1, scope=types_pb2.MFA_SCOPE_BOTH, roles=types_pb2.MFA_ROLES_ALL,
            totp_prior_connection=True)))
        stub.UpsertMember(control_pb2.UpsertMemberRequest(
            member_id="carol", team_id="blue", role=types_pb2.MEMBER_ROLE_ADMIN, peer_public_keys=[peer],
            totp=control_pb2.TotpEnrollment(secret=b"k" * 20, digits=6)))
        res = stub.Disconnect(control_pb2.DisconnectRequest(member_id="carol", reason="test", idempotency_key="i"))
        sessions = stub.ListSessions(control_pb2.ListSessionsRequest(member_id="carol")).sessions
        event = next(events)
        print(res.peers_quarantined, sessions[0].state == types_pb2.PEER_STATE_QUARANTINED, event.type)
''')


async def test_client_generated_from_proto_alone(gw: Harness, tmp_path: Path) -> None:
    out = tmp_path / "generated"
    out.mkdir()
    generate(out)
    for package in (out / "gatewayd", out / "gatewayd" / "v1"):
        (package / "__init__.py").write_text("")
    cert, pkey = gw.ca.issue("controlplane.test")
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "c.key").write_bytes(pkey)
    (tmp_path / "client.py").write_text(CLIENT)
    gw.source.add(key(1), "10.7.0.2/32", handshake=gw.clock())
    await gw.poll()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", str(tmp_path / "client.py"), str(out), str(gw.daemon.control_port),
        str(gw.tmp / "ca.pem"), str(tmp_path / "c.pem"), str(tmp_path / "c.key"), key(1),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=tmp_path)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    assert stdout.decode().split() == ["1", "True", "disconnect.executed"]
