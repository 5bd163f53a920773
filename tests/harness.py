"""A gatewayd daemon on loopback with in-memory kernel ports, a settable clock, and clients for its APIs."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pyotp
import pytest
import pytest_asyncio

from gatewayd.auth.limits import AttemptPolicy
from gatewayd.config import (
    ChallengeSection,
    Config,
    ControlSection,
    GatewaySection,
    MetricsSection,
    WireGuardSection,
)
from gatewayd.daemon import Adapters, Daemon
from gatewayd.runtime.control import Heartbeat
from gatewayd.runtime.tracker import Tracker
from gatewayd.v1 import challenge_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2
from tests.fakes import MemoryEnforcer, MemoryFlows, MemorySource
from tests.pki import Authority, write_server_files

SECRET = b"0123456789abcdef0123"  # 160 bits


async def eventually(check: Callable[[], bool]) -> None:
    """Until `check` holds, for at most 10 s."""
    deadline = asyncio.get_running_loop().time() + 10
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


def key(n: int) -> str:
    """A distinct, valid WireGuard public key."""
    return base64.b64encode(n.to_bytes(32, "big")).decode()


class Clock:
    def __init__(self) -> None:
        self.t = float(int(time.time()) // 30 * 30 + 1)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Harness:
    daemon: Daemon
    enforcer: MemoryEnforcer
    source: MemorySource
    flows: MemoryFlows
    clock: Clock
    tmp: Path
    ca: Authority
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def control(self, name: str = "controlplane.test", *, ca: Authority | None = None,
                expired: bool = False, certificate: bool = True) -> control_pb2_grpc.ControlServiceStub:
        issuer = ca or self.ca
        cert, pkey = issuer.issue(name, expired=expired) if certificate else (None, None)
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca.pem, private_key=pkey,
                                             certificate_chain=cert)
        ch = grpc.aio.secure_channel(f"127.0.0.1:{self.daemon.control_port}", creds,
                                     options=[("grpc.ssl_target_name_override", "localhost")])
        self.channels.append(ch)
        return control_pb2_grpc.ControlServiceStub(ch)

    def local(self) -> control_pb2_grpc.ControlServiceStub:
        ch = grpc.aio.secure_channel(f"unix:{self.tmp / 'control.sock'}",
                                     grpc.local_channel_credentials(grpc.LocalConnectionType.UDS))
        self.channels.append(ch)
        return control_pb2_grpc.ControlServiceStub(ch)

    def challenge(self, host: str = "127.0.0.1") -> challenge_pb2_grpc.ChallengeServiceStub:
        port = self.daemon.challenge_ports[0 if host == "127.0.0.1" else 1]
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        ch = grpc.aio.insecure_channel(target)
        self.channels.append(ch)
        return challenge_pb2_grpc.ChallengeServiceStub(ch)

    @property
    def tracker(self) -> Tracker:
        assert self.daemon.tracker is not None
        return self.daemon.tracker

    async def poll(self) -> None:
        await self.tracker.poll_once()

    async def tick(self) -> None:
        """Run the driver's timers at the current (fake) time."""
        await self.daemon.driver.submit(Heartbeat())

    def code(self, offset_steps: int = 0, secret: bytes = SECRET) -> str:
        totp = pyotp.TOTP(base64.b32encode(secret).decode())
        return str(totp.at(self.clock() + 30 * offset_steps))

    async def enroll(self, member: str = "alice", peers: tuple[str, ...] = (), *, team: str = "team-1",
                     secret: bytes | None = SECRET, **extra: Any) -> control_pb2.UpsertMemberResponse:
        req = control_pb2.UpsertMemberRequest(member_id=member, team_id=team, role=types_pb2.MEMBER_ROLE_MEMBER,
                                              peer_public_keys=list(peers), **extra)
        if secret is not None:
            req.totp.CopyFrom(control_pb2.TotpEnrollment(secret=secret, digits=6))
        result: control_pb2.UpsertMemberResponse = await self.local().UpsertMember(req)
        return result

    async def policy(self, version: int = 1, *, team: str = "team-1", totp: bool = False,
                     device: bool = False, reverify: int = 0) -> control_pb2.ApplyTeamPolicyResponse:
        result: control_pb2.ApplyTeamPolicyResponse = await self.local().ApplyTeamPolicy(
            control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
                team_id=team, version=version, scope=types_pb2.MFA_SCOPE_BOTH, roles=types_pb2.MFA_ROLES_ALL,
                totp_prior_connection=totp, device_prior_connection=device,
                reverify_interval_seconds=reverify)))
        return result


def config_for(tmp: Path, ca: Authority, **auth: Any) -> Config:
    cert, pkey, ca_path = write_server_files(tmp, ca)
    key_file = tmp / "secrets.key"
    key_file.write_bytes(os.urandom(32))
    return Config(
        gateway=GatewaySection(id="gw-test", database=tmp / "state.db", secrets_key_file=key_file),
        wireguard=WireGuardSection(interface="wgtest"),
        control=ControlSection(
            listen="127.0.0.1:0", tls_cert_file=cert, tls_key_file=pkey, client_ca_file=ca_path,
            unix_socket=tmp / "control.sock", unix_principal="local-ops",
            authorization={"controlplane.test": ["*"], "local-ops": ["*"], "reader.test": ["ListSessions"]}),
        metrics=MetricsSection(listen="127.0.0.1:0"),
        challenge=ChallengeSection(listen=["127.0.0.1:0", "[::1]:0"]),
        auth=AttemptPolicy(**auth),
    )


def write_config(config: Config, path: Path) -> Path:
    """The config as a TOML file (for reload tests)."""
    import dataclasses

    from gatewayd.lab.gateway import dump_toml

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if value is None:
            return ""
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    path.write_text(dump_toml(plain(dataclasses.asdict(config))))
    return path


async def start(tmp: Path, ca: Authority, config: Config | None = None,
                source: MemorySource | None = None, enforcer: MemoryEnforcer | None = None,
                clock: Clock | None = None, config_path: Path | None = None, workers: int | None = None
                ) -> Harness:
    """A started daemon; `workers`: serve the challenge API from that many worker processes (gatewayd.api.relay)."""
    config = config or config_for(tmp, ca)
    if workers is not None:
        config = replace(config, challenge=replace(config.challenge, workers=workers))
    enforcer = enforcer or MemoryEnforcer()
    source = source or MemorySource()
    flows = MemoryFlows()
    clock = clock or Clock()
    daemon = Daemon(config, Adapters(enforcer=enforcer, source=source, flows=flows),
                    clock=clock, autopoll=False, config_path=config_path)
    try:
        await daemon.start()
    except BaseException:
        await daemon.stop()  # what start opened is closed, as Daemon.serve does
        raise
    return Harness(daemon, enforcer, source, flows, clock, tmp, ca)


async def stop(h: Harness) -> None:
    for ch in h.channels:
        await ch.close()
    await h.daemon.stop()


@pytest_asyncio.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start(tmp_path, Authority("gatewayd test CA"))
    try:
        yield h
    finally:
        await stop(h)


@pytest_asyncio.fixture(name="gw", params=[0, 2], ids=["in-process", "worker-processes"])
async def gw_either_challenge_server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """`gw` twice: the challenge API served by the daemon itself, then by two worker processes."""
    h = await start(tmp_path, Authority("gatewayd test CA"), workers=request.param)
    try:
        yield h
    finally:
        await stop(h)
