import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from gatewayd.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DisconnectCause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISCONNECT_CAUSE_UNSPECIFIED: _ClassVar[DisconnectCause]
    DISCONNECT_CAUSE_SESSION_CONTEXT_NOT_FOUND: _ClassVar[DisconnectCause]
    DISCONNECT_CAUSE_UNKNOWN_SUBJECT: _ClassVar[DisconnectCause]

class DisconnectScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISCONNECT_SCOPE_LOCAL: _ClassVar[DisconnectScope]
    DISCONNECT_SCOPE_FLEET: _ClassVar[DisconnectScope]

class TotpAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOTP_ALGORITHM_UNSPECIFIED: _ClassVar[TotpAlgorithm]
    TOTP_ALGORITHM_SHA1: _ClassVar[TotpAlgorithm]
    TOTP_ALGORITHM_SHA256: _ClassVar[TotpAlgorithm]
    TOTP_ALGORITHM_SHA512: _ClassVar[TotpAlgorithm]
DISCONNECT_CAUSE_UNSPECIFIED: DisconnectCause
DISCONNECT_CAUSE_SESSION_CONTEXT_NOT_FOUND: DisconnectCause
DISCONNECT_CAUSE_UNKNOWN_SUBJECT: DisconnectCause
DISCONNECT_SCOPE_LOCAL: DisconnectScope
DISCONNECT_SCOPE_FLEET: DisconnectScope
TOTP_ALGORITHM_UNSPECIFIED: TotpAlgorithm
TOTP_ALGORITHM_SHA1: TotpAlgorithm
TOTP_ALGORITHM_SHA256: TotpAlgorithm
TOTP_ALGORITHM_SHA512: TotpAlgorithm

class DisconnectRequest(_message.Message):
    __slots__ = ("member_id", "peer_public_key", "team_id", "reason", "idempotency_key", "scope")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    peer_public_key: str
    team_id: str
    reason: str
    idempotency_key: str
    scope: DisconnectScope
    def __init__(self, member_id: _Optional[str] = ..., peer_public_key: _Optional[str] = ..., team_id: _Optional[str] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., scope: _Optional[_Union[DisconnectScope, str]] = ...) -> None: ...

class DisconnectResponse(_message.Message):
    __slots__ = ("sessions_cut", "peers_quarantined", "cause", "warnings", "replayed", "pending", "fleet_demand_recorded")
    SESSIONS_CUT_FIELD_NUMBER: _ClassVar[int]
    PEERS_QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    FLEET_DEMAND_RECORDED_FIELD_NUMBER: _ClassVar[int]
    sessions_cut: int
    peers_quarantined: int
    cause: DisconnectCause
    warnings: _containers.RepeatedScalarFieldContainer[str]
    replayed: bool
    pending: _containers.RepeatedScalarFieldContainer[str]
    fleet_demand_recorded: bool
    def __init__(self, sessions_cut: _Optional[int] = ..., peers_quarantined: _Optional[int] = ..., cause: _Optional[_Union[DisconnectCause, str]] = ..., warnings: _Optional[_Iterable[str]] = ..., replayed: _Optional[bool] = ..., pending: _Optional[_Iterable[str]] = ..., fleet_demand_recorded: _Optional[bool] = ...) -> None: ...

class TeamPolicy(_message.Message):
    __slots__ = ("team_id", "version", "scope", "roles", "totp_prior_connection", "device_prior_connection", "reverify_interval_seconds")
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    TOTP_PRIOR_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PRIOR_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    REVERIFY_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    team_id: str
    version: int
    scope: _types_pb2.MfaScope
    roles: _types_pb2.MfaRoles
    totp_prior_connection: bool
    device_prior_connection: bool
    reverify_interval_seconds: int
    def __init__(self, team_id: _Optional[str] = ..., version: _Optional[int] = ..., scope: _Optional[_Union[_types_pb2.MfaScope, str]] = ..., roles: _Optional[_Union[_types_pb2.MfaRoles, str]] = ..., totp_prior_connection: _Optional[bool] = ..., device_prior_connection: _Optional[bool] = ..., reverify_interval_seconds: _Optional[int] = ...) -> None: ...

class ApplyTeamPolicyRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: TeamPolicy
    def __init__(self, policy: _Optional[_Union[TeamPolicy, _Mapping]] = ...) -> None: ...

class ApplyTeamPolicyResponse(_message.Message):
    __slots__ = ("peers_quarantined", "warnings")
    PEERS_QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    peers_quarantined: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peers_quarantined: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class TotpEnrollment(_message.Message):
    __slots__ = ("secret", "algorithm", "digits", "period_seconds")
    SECRET_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DIGITS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    secret: bytes
    algorithm: TotpAlgorithm
    digits: int
    period_seconds: int
    def __init__(self, secret: _Optional[bytes] = ..., algorithm: _Optional[_Union[TotpAlgorithm, str]] = ..., digits: _Optional[int] = ..., period_seconds: _Optional[int] = ...) -> None: ...

class BackupCodeSet(_message.Message):
    __slots__ = ("salt", "n", "r", "p", "hashes")
    SALT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    R_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    salt: bytes
    n: int
    r: int
    p: int
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, salt: _Optional[bytes] = ..., n: _Optional[int] = ..., r: _Optional[int] = ..., p: _Optional[int] = ..., hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeviceCredential(_message.Message):
    __slots__ = ("credential_id", "cose_public_key", "sign_count", "user_handle")
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    COSE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGN_COUNT_FIELD_NUMBER: _ClassVar[int]
    USER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    credential_id: bytes
    cose_public_key: bytes
    sign_count: int
    user_handle: bytes
    def __init__(self, credential_id: _Optional[bytes] = ..., cose_public_key: _Optional[bytes] = ..., sign_count: _Optional[int] = ..., user_handle: _Optional[bytes] = ...) -> None: ...

class UpsertMemberRequest(_message.Message):
    __slots__ = ("member_id", "team_id", "role", "peer_public_keys", "totp", "backup_codes", "device_credentials", "replace_device_credentials")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PEER_PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    TOTP_FIELD_NUMBER: _ClassVar[int]
    BACKUP_CODES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_DEVICE_CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    team_id: str
    role: _types_pb2.MemberRole
    peer_public_keys: _containers.RepeatedScalarFieldContainer[str]
    totp: TotpEnrollment
    backup_codes: BackupCodeSet
    device_credentials: _containers.RepeatedCompositeFieldContainer[DeviceCredential]
    replace_device_credentials: bool
    def __init__(self, member_id: _Optional[str] = ..., team_id: _Optional[str] = ..., role: _Optional[_Union[_types_pb2.MemberRole, str]] = ..., peer_public_keys: _Optional[_Iterable[str]] = ..., totp: _Optional[_Union[TotpEnrollment, _Mapping]] = ..., backup_codes: _Optional[_Union[BackupCodeSet, _Mapping]] = ..., device_credentials: _Optional[_Iterable[_Union[DeviceCredential, _Mapping]]] = ..., replace_device_credentials: _Optional[bool] = ...) -> None: ...

class UpsertMemberResponse(_message.Message):
    __slots__ = ("created", "totp_pending")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TOTP_PENDING_FIELD_NUMBER: _ClassVar[int]
    created: bool
    totp_pending: bool
    def __init__(self, created: _Optional[bool] = ..., totp_pending: _Optional[bool] = ...) -> None: ...

class RemoveMemberRequest(_message.Message):
    __slots__ = ("member_id",)
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    def __init__(self, member_id: _Optional[str] = ...) -> None: ...

class RemoveMemberResponse(_message.Message):
    __slots__ = ("peers_unmapped",)
    PEERS_UNMAPPED_FIELD_NUMBER: _ClassVar[int]
    peers_unmapped: int
    def __init__(self, peers_unmapped: _Optional[int] = ...) -> None: ...

class ResetMfaRequest(_message.Message):
    __slots__ = ("member_id",)
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    def __init__(self, member_id: _Optional[str] = ...) -> None: ...

class ResetMfaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnlockMfaRequest(_message.Message):
    __slots__ = ("member_id",)
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    def __init__(self, member_id: _Optional[str] = ...) -> None: ...

class UnlockMfaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("member_id", "state", "page_size", "page_token", "team_id")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    state: _types_pb2.PeerState
    page_size: int
    page_token: str
    team_id: str
    def __init__(self, member_id: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.PeerState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., team_id: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[_types_pb2.Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("peer_public_key",)
    PEER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    peer_public_key: str
    def __init__(self, peer_public_key: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("after_cursor", "type_prefixes")
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    TYPE_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    after_cursor: int
    type_prefixes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, after_cursor: _Optional[int] = ..., type_prefixes: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GatewayStatus(_message.Message):
    __slots__ = ("gateway_id", "version", "started_at", "interface", "peers_configured", "authorized", "quarantined", "locked", "quarantined_prefixes", "enforcement_healthy", "broker_configured", "broker_connected", "outbox_unpublished", "outbox_oldest_age_seconds", "last_poll", "members", "teams", "enforcement_verified_at")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    PEERS_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    LOCKED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    BROKER_CONFIGURED_FIELD_NUMBER: _ClassVar[int]
    BROKER_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_UNPUBLISHED_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_OLDEST_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_POLL_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    TEAMS_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_VERIFIED_AT_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    version: str
    started_at: _timestamp_pb2.Timestamp
    interface: str
    peers_configured: int
    authorized: int
    quarantined: int
    locked: int
    quarantined_prefixes: int
    enforcement_healthy: bool
    broker_configured: bool
    broker_connected: bool
    outbox_unpublished: int
    outbox_oldest_age_seconds: float
    last_poll: _timestamp_pb2.Timestamp
    members: int
    teams: int
    enforcement_verified_at: _timestamp_pb2.Timestamp
    def __init__(self, gateway_id: _Optional[str] = ..., version: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., interface: _Optional[str] = ..., peers_configured: _Optional[int] = ..., authorized: _Optional[int] = ..., quarantined: _Optional[int] = ..., locked: _Optional[int] = ..., quarantined_prefixes: _Optional[int] = ..., enforcement_healthy: _Optional[bool] = ..., broker_configured: _Optional[bool] = ..., broker_connected: _Optional[bool] = ..., outbox_unpublished: _Optional[int] = ..., outbox_oldest_age_seconds: _Optional[float] = ..., last_poll: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., members: _Optional[int] = ..., teams: _Optional[int] = ..., enforcement_verified_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetTeamPolicyRequest(_message.Message):
    __slots__ = ("team_id",)
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    team_id: str
    def __init__(self, team_id: _Optional[str] = ...) -> None: ...
