import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MfaScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MFA_SCOPE_UNSPECIFIED: _ClassVar[MfaScope]
    MFA_SCOPE_CONTROL_PANEL: _ClassVar[MfaScope]
    MFA_SCOPE_CLIENT_APP: _ClassVar[MfaScope]
    MFA_SCOPE_BOTH: _ClassVar[MfaScope]

class MfaRoles(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MFA_ROLES_UNSPECIFIED: _ClassVar[MfaRoles]
    MFA_ROLES_ADMINS: _ClassVar[MfaRoles]
    MFA_ROLES_MEMBERS: _ClassVar[MfaRoles]
    MFA_ROLES_ALL: _ClassVar[MfaRoles]

class MemberRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBER_ROLE_UNSPECIFIED: _ClassVar[MemberRole]
    MEMBER_ROLE_ADMIN: _ClassVar[MemberRole]
    MEMBER_ROLE_MEMBER: _ClassVar[MemberRole]

class PeerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PEER_STATE_UNSPECIFIED: _ClassVar[PeerState]
    PEER_STATE_AUTHORIZED: _ClassVar[PeerState]
    PEER_STATE_QUARANTINED: _ClassVar[PeerState]
    PEER_STATE_LOCKED: _ClassVar[PeerState]

class ProofKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROOF_KIND_UNSPECIFIED: _ClassVar[ProofKind]
    PROOF_KIND_OTP: _ClassVar[ProofKind]
    PROOF_KIND_DEVICE: _ClassVar[ProofKind]

class Factor(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACTOR_UNSPECIFIED: _ClassVar[Factor]
    FACTOR_TOTP: _ClassVar[Factor]
    FACTOR_BACKUP_CODE: _ClassVar[Factor]
    FACTOR_DEVICE: _ClassVar[Factor]
MFA_SCOPE_UNSPECIFIED: MfaScope
MFA_SCOPE_CONTROL_PANEL: MfaScope
MFA_SCOPE_CLIENT_APP: MfaScope
MFA_SCOPE_BOTH: MfaScope
MFA_ROLES_UNSPECIFIED: MfaRoles
MFA_ROLES_ADMINS: MfaRoles
MFA_ROLES_MEMBERS: MfaRoles
MFA_ROLES_ALL: MfaRoles
MEMBER_ROLE_UNSPECIFIED: MemberRole
MEMBER_ROLE_ADMIN: MemberRole
MEMBER_ROLE_MEMBER: MemberRole
PEER_STATE_UNSPECIFIED: PeerState
PEER_STATE_AUTHORIZED: PeerState
PEER_STATE_QUARANTINED: PeerState
PEER_STATE_LOCKED: PeerState
PROOF_KIND_UNSPECIFIED: ProofKind
PROOF_KIND_OTP: ProofKind
PROOF_KIND_DEVICE: ProofKind
FACTOR_UNSPECIFIED: Factor
FACTOR_TOTP: Factor
FACTOR_BACKUP_CODE: Factor
FACTOR_DEVICE: Factor

class Session(_message.Message):
    __slots__ = ("peer_public_key", "member_id", "team_id", "tunnel_ips", "endpoint", "state", "owes", "owes_since", "last_handshake", "rx_bytes", "tx_bytes", "proven_at", "locked_reason")
    PEER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_IPS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OWES_FIELD_NUMBER: _ClassVar[int]
    OWES_SINCE_FIELD_NUMBER: _ClassVar[int]
    LAST_HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROVEN_AT_FIELD_NUMBER: _ClassVar[int]
    LOCKED_REASON_FIELD_NUMBER: _ClassVar[int]
    peer_public_key: str
    member_id: str
    team_id: str
    tunnel_ips: _containers.RepeatedScalarFieldContainer[str]
    endpoint: str
    state: PeerState
    owes: _containers.RepeatedScalarFieldContainer[ProofKind]
    owes_since: _timestamp_pb2.Timestamp
    last_handshake: _timestamp_pb2.Timestamp
    rx_bytes: int
    tx_bytes: int
    proven_at: _timestamp_pb2.Timestamp
    locked_reason: str
    def __init__(self, peer_public_key: _Optional[str] = ..., member_id: _Optional[str] = ..., team_id: _Optional[str] = ..., tunnel_ips: _Optional[_Iterable[str]] = ..., endpoint: _Optional[str] = ..., state: _Optional[_Union[PeerState, str]] = ..., owes: _Optional[_Iterable[_Union[ProofKind, str]]] = ..., owes_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_handshake: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rx_bytes: _Optional[int] = ..., tx_bytes: _Optional[int] = ..., proven_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., locked_reason: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("cursor", "id", "type", "time", "subject", "data_json")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    id: str
    type: str
    time: _timestamp_pb2.Timestamp
    subject: str
    data_json: str
    def __init__(self, cursor: _Optional[int] = ..., id: _Optional[str] = ..., type: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., subject: _Optional[str] = ..., data_json: _Optional[str] = ...) -> None: ...
