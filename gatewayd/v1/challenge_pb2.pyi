import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from gatewayd.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("state", "owes", "accepted_factors", "attempts_left", "device_nonce", "device_nonce_expires", "locked_reason", "retry_not_before")
    STATE_FIELD_NUMBER: _ClassVar[int]
    OWES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FACTORS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_LEFT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NONCE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NONCE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    LOCKED_REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    state: _types_pb2.PeerState
    owes: _containers.RepeatedScalarFieldContainer[_types_pb2.ProofKind]
    accepted_factors: _containers.RepeatedScalarFieldContainer[_types_pb2.Factor]
    attempts_left: int
    device_nonce: bytes
    device_nonce_expires: _timestamp_pb2.Timestamp
    locked_reason: str
    retry_not_before: _timestamp_pb2.Timestamp
    def __init__(self, state: _Optional[_Union[_types_pb2.PeerState, str]] = ..., owes: _Optional[_Iterable[_Union[_types_pb2.ProofKind, str]]] = ..., accepted_factors: _Optional[_Iterable[_Union[_types_pb2.Factor, str]]] = ..., attempts_left: _Optional[int] = ..., device_nonce: _Optional[bytes] = ..., device_nonce_expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., locked_reason: _Optional[str] = ..., retry_not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SubmitTotpRequest(_message.Message):
    __slots__ = ("code",)
    CODE_FIELD_NUMBER: _ClassVar[int]
    code: str
    def __init__(self, code: _Optional[str] = ...) -> None: ...

class SubmitBackupCodeRequest(_message.Message):
    __slots__ = ("code",)
    CODE_FIELD_NUMBER: _ClassVar[int]
    code: str
    def __init__(self, code: _Optional[str] = ...) -> None: ...

class SubmitDeviceAssertionRequest(_message.Message):
    __slots__ = ("credential_id", "authenticator_data", "client_data_json", "signature", "user_handle")
    CREDENTIAL_ID_FIELD_NUMBER: _ClassVar[int]
    AUTHENTICATOR_DATA_FIELD_NUMBER: _ClassVar[int]
    CLIENT_DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    USER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    credential_id: bytes
    authenticator_data: bytes
    client_data_json: bytes
    signature: bytes
    user_handle: bytes
    def __init__(self, credential_id: _Optional[bytes] = ..., authenticator_data: _Optional[bytes] = ..., client_data_json: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., user_handle: _Optional[bytes] = ...) -> None: ...

class ProofResult(_message.Message):
    __slots__ = ("accepted", "status", "backup_codes_remaining")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_CODES_REMAINING_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    status: Challenge
    backup_codes_remaining: int
    def __init__(self, accepted: _Optional[bool] = ..., status: _Optional[_Union[Challenge, _Mapping]] = ..., backup_codes_remaining: _Optional[int] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
