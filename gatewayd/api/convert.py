"""Translation between protobuf messages and the domain, with the edge validation of each field.

Requests become validated driver jobs (gatewayd.runtime.control, .proofs); domain results become messages.
Every check names the offending field; nothing here touches state. Checks that need state (a stale policy
version, a peer key owned by another member) are the jobs'.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from gatewayd import __version__
from gatewayd.auth import backup, device, totp
from gatewayd.auth.fields import FieldError
from gatewayd.core.model import Factor, Member, Peer, PeerState, ProofKind, Role, Roles, Scope, TeamPolicy
from gatewayd.core.tracking import PeerSnapshot
from gatewayd.errors import invalid
from gatewayd.ports import DeviceCredential, StoredEvent
from gatewayd.runtime.control import ApplyTeamPolicy, Disconnect, DisconnectResult, UpsertMember
from gatewayd.runtime.proofs import ChallengeView
from gatewayd.runtime.status import StatusSnapshot
from gatewayd.v1 import challenge_pb2, control_pb2, types_pb2

MAX_ID = 128
MAX_REASON = 256
MAX_INT64 = 2**63 - 1
"""Versions and cursors are stored as SQLite INTEGER (signed 64-bit); a larger uint64 is refused at the edge."""


def cursor(value: int, field: str) -> int:
    if value > MAX_INT64:
        raise invalid(field, f"must be at most {MAX_INT64}")
    return value


def text(value: str, field: str, *, allow_empty: bool = True, limit: int = MAX_ID) -> str:
    """Printable text (no NUL or control characters) of at most `limit` characters."""
    if not value and not allow_empty:
        raise invalid(field, "must not be empty")
    if len(value) > limit:
        raise invalid(field, f"must be at most {limit} characters")
    if not value.isprintable():
        raise invalid(field, "must be printable text (no NUL or control characters)")
    return value


def ident(value: str, field: str) -> str:
    """An id: 1 to MAX_ID printable characters."""
    return text(value, field, allow_empty=False)


def public_key(value: str, field: str) -> str:
    """A WireGuard public key: canonical base64 of exactly 32 bytes."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, f"{value[:60]!r} is not base64") from None
    if len(raw) != 32:
        raise invalid(field, f"must decode to 32 bytes, not {len(raw)}")
    if base64.b64encode(raw).decode() != value:
        raise invalid(field, "is not canonical base64")
    return value


def prefix(value: str, field: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise invalid(field, f"{value[:60]!r} is not an IP address or prefix") from None


_SCOPES = {types_pb2.MFA_SCOPE_CONTROL_PANEL: Scope.CONTROL_PANEL, types_pb2.MFA_SCOPE_CLIENT_APP: Scope.CLIENT_APP,
           types_pb2.MFA_SCOPE_BOTH: Scope.BOTH}
_ROLES = {types_pb2.MFA_ROLES_ADMINS: Roles.ADMINS, types_pb2.MFA_ROLES_MEMBERS: Roles.MEMBERS,
          types_pb2.MFA_ROLES_ALL: Roles.ALL}
_ROLE = {types_pb2.MEMBER_ROLE_ADMIN: Role.ADMIN, types_pb2.MEMBER_ROLE_MEMBER: Role.MEMBER}
_ALGS = {control_pb2.TOTP_ALGORITHM_UNSPECIFIED: totp.Algorithm.SHA1,
         control_pb2.TOTP_ALGORITHM_SHA1: totp.Algorithm.SHA1,
         control_pb2.TOTP_ALGORITHM_SHA256: totp.Algorithm.SHA256,
         control_pb2.TOTP_ALGORITHM_SHA512: totp.Algorithm.SHA512}
STATE_TO_PB = {PeerState.AUTHORIZED: types_pb2.PEER_STATE_AUTHORIZED,
               PeerState.QUARANTINED: types_pb2.PEER_STATE_QUARANTINED,
               PeerState.LOCKED: types_pb2.PEER_STATE_LOCKED}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}
KIND_TO_PB = {ProofKind.OTP: types_pb2.PROOF_KIND_OTP, ProofKind.DEVICE: types_pb2.PROOF_KIND_DEVICE}
FACTOR_TO_PB = {Factor.TOTP: types_pb2.FACTOR_TOTP, Factor.BACKUP_CODE: types_pb2.FACTOR_BACKUP_CODE,
                Factor.DEVICE: types_pb2.FACTOR_DEVICE}
CAUSE_TO_PB = {None: control_pb2.DISCONNECT_CAUSE_UNSPECIFIED,
               "unknown_subject": control_pb2.DISCONNECT_CAUSE_UNKNOWN_SUBJECT,
               "session_context_not_found": control_pb2.DISCONNECT_CAUSE_SESSION_CONTEXT_NOT_FOUND}


def team_policy(req: control_pb2.ApplyTeamPolicyRequest) -> ApplyTeamPolicy:
    if not req.HasField("policy"):
        raise invalid("policy", "is required")
    p = req.policy
    if not 1 <= p.version <= MAX_INT64:
        raise invalid("policy.version", f"must be 1 to {MAX_INT64}")
    if p.scope not in _SCOPES:
        raise invalid("policy.scope", "must be CONTROL_PANEL, CLIENT_APP or BOTH")
    if p.roles not in _ROLES:
        raise invalid("policy.roles", "must be ADMINS, MEMBERS or ALL")
    if p.reverify_interval_seconds and p.reverify_interval_seconds < 60:
        raise invalid("policy.reverify_interval_seconds", "must be 0 (never) or at least 60")
    return ApplyTeamPolicy(policy=TeamPolicy(
        team_id=ident(p.team_id, "policy.team_id"), version=p.version, scope=_SCOPES[p.scope], roles=_ROLES[p.roles],
        totp_prior_connection=p.totp_prior_connection, device_prior_connection=p.device_prior_connection,
        reverify_interval=float(p.reverify_interval_seconds)))


def member_update(req: control_pb2.UpsertMemberRequest) -> UpsertMember:
    member_id = ident(req.member_id, "member_id")
    team_id = ident(req.team_id, "team_id")
    if req.role not in _ROLE:
        raise invalid("role", "must be ADMIN or MEMBER")
    if len(req.peer_public_keys) > 64:
        raise invalid("peer_public_keys", "at most 64 peers per member")
    keys = [public_key(k, f"peer_public_keys[{i}]") for i, k in enumerate(req.peer_public_keys)]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise invalid(f"peer_public_keys[{i}]", "repeats an earlier key")
    peers = frozenset(keys)
    factor = None
    if req.HasField("totp"):
        t = req.totp
        if t.algorithm not in _ALGS:
            raise invalid("totp.algorithm", "unknown algorithm")
        period = t.period_seconds or 30
        try:
            totp.validate_enrollment(t.secret, _ALGS[t.algorithm], t.digits, period)
        except FieldError as exc:
            raise invalid(exc.field, exc.message) from None
        factor = totp.TotpFactor(secret=t.secret, algorithm=_ALGS[t.algorithm], digits=t.digits, period=period)
    codes = None
    if req.HasField("backup_codes"):
        s = req.backup_codes
        hashes = list(s.hashes)
        params = backup.KdfParams(salt=s.salt, n=s.n, r=s.r, p=s.p, dklen=len(hashes[0]) if hashes else 0)
        try:
            backup.validate_set(params, hashes)
        except FieldError as exc:
            raise invalid(exc.field, exc.message) from None
        codes = (params, tuple(hashes))
    devices = None
    if req.replace_device_credentials or req.device_credentials:
        if not req.replace_device_credentials:
            raise invalid("replace_device_credentials", "must be true when device_credentials are given")
        devices = tuple(_device(c, i) for i, c in enumerate(req.device_credentials))
        if len({d.credential_id for d in devices}) != len(devices):
            raise invalid("device_credentials", "credential ids must be distinct")
    return UpsertMember(member_id=member_id, team_id=team_id, role=_ROLE[req.role], peers=peers, totp=factor,
                        backup=codes, devices=devices)


def _device(c: control_pb2.DeviceCredential, i: int) -> DeviceCredential:
    f = f"device_credentials[{i}]"
    if not 16 <= len(c.credential_id) <= 1023:
        raise invalid(f"{f}.credential_id", "must be 16 to 1023 bytes")
    if not 1 <= len(c.user_handle) <= 64:
        raise invalid(f"{f}.user_handle", "must be 1 to 64 bytes")
    if not 16 <= len(c.cose_public_key) <= 2048:
        raise invalid(f"{f}.cose_public_key", "must be a COSE_Key of 16 to 2048 bytes")
    try:
        device.check_public_key(c.cose_public_key)
    except device.KeyError_ as exc:
        raise invalid(f"{f}.cose_public_key", str(exc)) from None
    return DeviceCredential(credential_id=c.credential_id, cose_public_key=c.cose_public_key,
                            sign_count=c.sign_count, user_handle=c.user_handle)


def assertion(req: challenge_pb2.SubmitDeviceAssertionRequest) -> device.Assertion:
    for name, low, high in (("credential_id", 1, 1023), ("authenticator_data", 37, 4096),
                            ("client_data_json", 2, 8192), ("signature", 16, 1024), ("user_handle", 0, 64)):
        if not low <= len(getattr(req, name)) <= high:
            raise invalid(name, f"must be {low} to {high} bytes")
    return device.Assertion(credential_id=req.credential_id, authenticator_data=req.authenticator_data,
                            client_data_json=req.client_data_json, signature=req.signature,
                            user_handle=req.user_handle)


_SCOPES_PB = {v: k for k, v in _SCOPES.items()}
_ROLES_PB = {v: k for k, v in _ROLES.items()}


def team_policy_pb(t: TeamPolicy) -> control_pb2.TeamPolicy:
    return control_pb2.TeamPolicy(team_id=t.team_id, version=t.version, scope=_SCOPES_PB[t.scope],
                                  roles=_ROLES_PB[t.roles], totp_prior_connection=t.totp_prior_connection,
                                  device_prior_connection=t.device_prior_connection,
                                  reverify_interval_seconds=int(t.reverify_interval))


def status(s: StatusSnapshot) -> control_pb2.GatewayStatus:
    msg = control_pb2.GatewayStatus(
        gateway_id=s.gateway_id, version=__version__, interface=s.interface, peers_configured=s.peers_configured,
        authorized=s.authorized, quarantined=s.quarantined, locked=s.locked,
        quarantined_prefixes=s.quarantined_prefixes, enforcement_healthy=s.enforcement_healthy,
        broker_configured=s.broker_configured, broker_connected=s.broker_connected,
        outbox_unpublished=s.outbox_unpublished, outbox_oldest_age_seconds=s.outbox_oldest_age,
        members=s.members, teams=s.teams)
    _stamp(msg, started_at=s.started_at, last_poll=s.last_poll, enforcement_verified_at=s.enforcement_verified_at)
    return msg


def disconnect(req: control_pb2.DisconnectRequest) -> Disconnect:
    which = req.WhichOneof("target")
    if which is None:
        raise invalid("target", "set member_id, peer_public_key or team_id")
    if len(req.reason) > MAX_REASON:
        raise invalid("reason", f"must be at most {MAX_REASON} characters")
    if not req.reason.isprintable():
        raise invalid("reason", "must be printable text (no NUL or control characters)")
    if req.scope not in (control_pb2.DISCONNECT_SCOPE_LOCAL, control_pb2.DISCONNECT_SCOPE_FLEET):
        raise invalid("scope", f"unknown scope {req.scope}")
    return Disconnect(
        member_id=ident(req.member_id, "member_id") if which == "member_id" else None,
        public_key=public_key(req.peer_public_key, "peer_public_key") if which == "peer_public_key" else None,
        team_id=ident(req.team_id, "team_id") if which == "team_id" else None,
        reason=req.reason,
        idempotency_key=ident(req.idempotency_key, "idempotency_key"),
        fleet=req.scope == control_pb2.DISCONNECT_SCOPE_FLEET,
    )


def disconnect_response(result: DisconnectResult) -> control_pb2.DisconnectResponse:
    outcome = result.outcome
    return control_pb2.DisconnectResponse(
        sessions_cut=outcome.sessions_cut, peers_quarantined=outcome.peers_quarantined,
        cause=CAUSE_TO_PB[outcome.cause], warnings=list(outcome.warnings), replayed=result.replayed,
        pending=list(result.pending), fleet_demand_recorded=result.fleet_recorded)


def _stamp(msg: Message, **times: float | None) -> None:
    """Set each Timestamp field whose time is known (unset ones stay unset)."""
    for name, value in times.items():
        ts = timestamp(value)
        if ts is not None:
            getattr(msg, name).CopyFrom(ts)


def timestamp(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def session(peer: Peer, member: Member | None, snap: PeerSnapshot | None) -> types_pb2.Session:
    msg = types_pb2.Session(
        peer_public_key=peer.public_key, member_id=peer.member_id or "",
        team_id=member.team_id if member else "", tunnel_ips=list(peer.allowed_ips),
        endpoint=peer.endpoint or "", state=STATE_TO_PB[peer.state] if peer.state else types_pb2.PEER_STATE_UNSPECIFIED,
        owes=[KIND_TO_PB[k] for k in sorted(peer.owes, key=lambda k: k.value)],
        rx_bytes=snap.rx_bytes if snap else 0, tx_bytes=snap.tx_bytes if snap else 0,
        locked_reason=peer.locked_reason.value if peer.locked_reason else "")
    _stamp(msg, owes_since=peer.owes_since, last_handshake=peer.last_handshake, proven_at=peer.proven_at)
    return msg


def event(e: StoredEvent) -> types_pb2.Event:
    msg = types_pb2.Event(cursor=e.cursor, id=e.id, type=e.type, subject=e.subject, data_json=e.data_json)
    ts = timestamp(e.time)
    assert ts is not None
    msg.time.CopyFrom(ts)
    return msg


def challenge(view: ChallengeView) -> challenge_pb2.Challenge:
    msg = challenge_pb2.Challenge(
        state=STATE_TO_PB[view.state], owes=[KIND_TO_PB[k] for k in sorted(view.owes, key=lambda k: k.value)],
        accepted_factors=[FACTOR_TO_PB[f] for f in sorted(view.accepted, key=lambda f: f.value)],
        attempts_left=view.attempts_left, locked_reason=view.locked_reason or "")
    ts = timestamp(view.retry_not_before)
    if ts is not None:
        msg.retry_not_before.CopyFrom(ts)
    if view.device_nonce:
        msg.device_nonce = view.device_nonce
        expires = timestamp(view.device_nonce_expires)
        assert expires is not None
        msg.device_nonce_expires.CopyFrom(expires)
    return msg
