"""Playbook helpers: feed events to a GatewayState at given times and look at the commands that come out."""

from __future__ import annotations

from gatewayd.core import events as ev
from gatewayd.core.commands import Command, Publish, Quarantine, Release, ResetPeerSession
from gatewayd.core.model import Factor, Member, Role, Roles, Scope, TeamPolicy
from gatewayd.core.state import CoreConfig, DisconnectOutcome, GatewayState, SessionStart

K1, K2, K3 = "peer-one", "peer-two", "peer-three"


def team(version: int = 1, *, totp: bool = False, device: bool = False, reverify: float = 0.0,
         scope: Scope = Scope.BOTH, roles: Roles = Roles.ALL) -> TeamPolicy:
    return TeamPolicy(team_id="t", version=version, scope=scope, roles=roles, totp_prior_connection=totp,
                      device_prior_connection=device, reverify_interval=reverify)


def member(mid: str = "alice", peers: tuple[str, ...] = (K1,), factors: frozenset[Factor] = frozenset({Factor.TOTP}),
           role: Role = Role.MEMBER, locked: bool = False) -> Member:
    return Member(member_id=mid, team_id="t", role=role, peers=tuple(peers), factors=factors, locked=locked)


class Play:
    def __init__(self, *, quarantine_unknown: bool = True, detection: bool = False, new_endpoint: bool = True) -> None:
        self.gw = GatewayState(CoreConfig(quarantine_unknown_peers=quarantine_unknown, handshake_detection=detection,
                                          new_endpoint_is_new_session=new_endpoint))
        self.now = 1_000_000.0
        self.log: list[Command] = []

    def __call__(self, event: ev.Event, at: float | None = None) -> list[Command]:
        if at is not None:
            self.now = at
        out = self.gw.handle(event, self.now)
        self.log += out
        return out

    def disconnect(self, event: ev.DisconnectRequested, at: float | None = None
                   ) -> tuple[DisconnectOutcome, list[Command]]:
        """A Disconnect and the answer its caller gets."""
        if at is not None:
            self.now = at
        answer, out = self.gw.disconnect(event, self.now)
        self.log += out
        return answer, out

    def prove(self, event: ev.ProofAccepted) -> tuple[bool, list[Command]]:
        """A verified proof and whether it counted."""
        answer, out = self.gw.accept_proof(event, self.now)
        self.log += out
        return answer, out

    def initiate(self, event: ev.HandshakeInitiated) -> tuple[SessionStart | None, list[Command]]:
        """A handshake initiation at its arrival time, and why it starts a session (None: it does not)."""
        self.now = event.at
        answer, out = self.gw.initiated(event, self.now)
        self.log += out
        return answer, out

    def timer(self, at: float) -> list[Command]:
        self.now = at
        out = self.gw.handle_timer(at)
        self.log += out
        return out

    def state(self, key: str = K1) -> str | None:
        s = self.gw.peers[key].state
        return s.value if s else None


def kinds(out: list[Command]) -> list[str]:
    return [type(c).__name__ for c in out]


def published(out: list[Command]) -> list[str]:
    return [c.type for c in out if isinstance(c, Publish)]


def quarantined(out: list[Command]) -> set[str]:
    return {p for c in out if isinstance(c, Quarantine) for p in c.prefixes}


def released(out: list[Command]) -> set[str]:
    return {p for c in out if isinstance(c, Release) for p in c.prefixes}


def resets(out: list[Command]) -> list[str]:
    return [c.public_key for c in out if isinstance(c, ResetPeerSession)]
