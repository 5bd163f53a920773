"""A protocol fuzzer against a running daemon: every RPC of both services gets generated and mutated protobuf
messages (edge integers, NUL and other control characters, unknown enum values, long strings) and raw bytes that
do not parse (invalid UTF-8, varints past 64 bits, truncated fields, noise).

Whatever arrives, the answer must be OK or one of the documented refusals, never UNKNOWN or INTERNAL, with no
internal names in its message; a refused call changes nothing; the daemon stays up. `make test` runs a bounded
profile; `make fuzz` sets GATEWAYD_FUZZ_EXAMPLES for a longer one.

The daemon is the real one (real gRPC, real SQLite) with the in-memory kernel ports of tests/fakes.py; the
caller of the challenge API is a quarantined peer, so proofs reach their verification paths.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.v1 import challenge_pb2, control_pb2, types_pb2
from tests.api.test_challenge_api import ME, quarantined
from tests.harness import Harness, config_for, start, stop
from tests.pki import Authority

T = TypeVar("T")
EXAMPLES = int(os.environ.get("GATEWAYD_FUZZ_EXAMPLES", "400"))

DOCUMENTED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # streams that stay open are ended by the fuzzer's own deadline
}
INTERNAL_WORDS = ("Traceback", "<class", "Error'>", "gatewayd.", "sqlite", "Exception", "File \"")

EDGE_TEXT = ["", "alice", "team-1", "t", "a" * 129, "a\x00b", "\n", "peer.", "A" * 43 + "=", ME, "x" * 60_000]
TEXT = st.one_of(
    st.sampled_from(EDGE_TEXT[:-1]),
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=8),
    st.builds(lambda n: "x" * n, st.sampled_from([200, 1000, 4000])),
)
EDGE_INTEGERS = {
    FieldDescriptor.TYPE_UINT64: [0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1],
    FieldDescriptor.TYPE_UINT32: [0, 1, 60, 100, 1000, 1001, 2**31, 2**32 - 1],
    FieldDescriptor.TYPE_INT64: [0, 1, -1, 2**63 - 1, -(2**63)],
    FieldDescriptor.TYPE_INT32: [0, 1, -1, 2**31 - 1, -(2**31)],
}
INTEGERS = {kind: st.sampled_from(values) for kind, values in EDGE_INTEGERS.items()}


def message_strategy(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of this type with adversarial field values (nested messages to two levels)."""
    cls = message_factory.GetMessageClass(desc)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        value: st.SearchStrategy[Any] | None
        if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is not None:
            if depth >= 2 or f.message_type.GetOptions().map_entry:
                continue
            value = message_strategy(f.message_type, depth + 1)
        else:
            value = scalar_strategy(f)
        if value is None:
            continue
        if f.is_repeated:
            value = st.lists(value, max_size=3)
        fields[f.name] = st.one_of(st.none(), value)

    def build(values: dict[str, Any]) -> Message:
        msg = cls()
        for name, v in values.items():
            if v is None:
                continue
            f = desc.fields_by_name[name]
            if f.is_repeated:
                getattr(msg, name).extend(v)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(v)
            else:
                setattr(msg, name, v)
        return msg

    return st.fixed_dictionaries(fields).map(build)


def scalar_strategy(f: FieldDescriptor) -> st.SearchStrategy[Any] | None:
    if f.type == FieldDescriptor.TYPE_STRING:
        return TEXT
    if f.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"", bytes(32), b"\xff" * 2048]))
    if f.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if f.type == FieldDescriptor.TYPE_ENUM and f.enum_type is not None:
        return st.integers(-1, len(f.enum_type.values) + 2)
    return INTEGERS.get(f.type)


def scalar_paths(desc: Descriptor, prefix: tuple[FieldDescriptor, ...] = ()) -> list[tuple[FieldDescriptor, ...]]:
    out = []
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is not None and not f.is_repeated:
            if len(prefix) < 2:
                out += scalar_paths(f.message_type, (*prefix, f))
        elif scalar_strategy(f) is not None:
            out.append((*prefix, f))
    return out


def one_field_off(template: Message) -> st.SearchStrategy[Message]:
    """A valid request with exactly one field (at any depth) set to an adversarial value: reaches the checks
    that only run once everything before them passed."""
    paths = scalar_paths(template.DESCRIPTOR)  # type: ignore[arg-type]

    def apply(path: tuple[FieldDescriptor, ...], value: Any) -> Message:
        msg = type(template)()
        msg.CopyFrom(template)
        target = msg
        for f in path[:-1]:
            target = getattr(target, f.name)
        last = path[-1]
        if last.is_repeated:
            getattr(target, last.name).append(value)
        else:
            setattr(target, last.name, value)
        return msg

    def values(path: tuple[FieldDescriptor, ...]) -> st.SearchStrategy[Message]:
        strategy = scalar_strategy(path[-1])
        assert strategy is not None
        return strategy.map(lambda v: apply(path, v))

    return st.sampled_from(paths).flatmap(values)


TOTP = control_pb2.TotpEnrollment(secret=b"S" * 20, digits=6)
TEMPLATES: dict[str, Message] = {
    "Disconnect": control_pb2.DisconnectRequest(member_id="alice", reason="fuzz", idempotency_key="fz"),
    "ApplyTeamPolicy": control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
        team_id="team-1", version=7, scope=types_pb2.MFA_SCOPE_CLIENT_APP, roles=types_pb2.MFA_ROLES_ALL,
        totp_prior_connection=True, reverify_interval_seconds=60)),
    "UpsertMember": control_pb2.UpsertMemberRequest(member_id="bob", team_id="team-1",
                                                    role=types_pb2.MEMBER_ROLE_MEMBER, totp=TOTP),
    "RemoveMember": control_pb2.RemoveMemberRequest(member_id="alice"),
    "ResetMfa": control_pb2.ResetMfaRequest(member_id="alice"),
    "UnlockMfa": control_pb2.UnlockMfaRequest(member_id="alice"),
    "ListSessions": control_pb2.ListSessionsRequest(member_id="alice", page_size=10),
    "GetSession": control_pb2.GetSessionRequest(peer_public_key=ME),
    "WatchEvents": control_pb2.WatchEventsRequest(after_cursor=1, type_prefixes=["peer."]),
    "GetTeamPolicy": control_pb2.GetTeamPolicyRequest(team_id="team-1"),
    "SubmitTotp": challenge_pb2.SubmitTotpRequest(code="123456"),
    "SubmitBackupCode": challenge_pb2.SubmitBackupCodeRequest(code="ABCD-1234"),
    "SubmitDeviceAssertion": challenge_pb2.SubmitDeviceAssertionRequest(
        credential_id=b"c" * 16, authenticator_data=b"a" * 37, client_data_json=b"{}", signature=b"s" * 64),
}


def raw_strategy(desc: Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes that are not (or are barely) a message of this type."""
    valid = message_strategy(desc).map(lambda m: m.SerializeToString())
    mutated = st.tuples(valid, st.integers(0, 64), st.binary(min_size=1, max_size=4)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])
    return st.one_of(
        st.binary(max_size=200),
        mutated,
        valid.map(lambda b: b[: max(len(b) - 1, 0)]),  # truncated
        st.sampled_from([b"\x0a\x02\xff\xfe", b"\x08" + b"\xff" * 10 + b"\x01", b"\x0a\xff\xff\xff\xff\x0f",
                         b"\x12\x03\xed\xa0\x80"]),  # invalid UTF-8, a varint past 64 bits, a huge length, a surrogate
    )


def calls(service: ServiceDescriptor) -> st.SearchStrategy[tuple[str, bool, bytes]]:
    """(method path, server streaming, request bytes) for every method of the service."""
    options = []
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        body = st.one_of(message_strategy(method.input_type).map(lambda m: m.SerializeToString()),
                         raw_strategy(method.input_type))
        if method.name in TEMPLATES:  # twice as likely: the deeper checks are where bugs were found
            off = one_field_off(TEMPLATES[method.name]).map(lambda m: m.SerializeToString())
            body = st.one_of(body, off, off)
        options.append(st.tuples(st.just(path), st.just(method.server_streaming), body))
    return st.one_of(options)


class LoopThread:
    """The daemon's event loop in a thread, so that hypothesis (synchronous) can drive calls into it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def fingerprint(h: Harness) -> tuple[Any, ...]:
    core = h.daemon.core
    return (h.daemon.store.outbox.next_cursor,
            sorted((m.member_id, m.team_id, m.role, sorted(m.peers), m.locked) for m in core.members.values()),
            sorted((t.team_id, t.version) for t in core.teams.values()),
            sorted((k, str(p.state), sorted(o.value for o in p.owes)) for k, p in core.peers.items()),
            sorted(h.enforcer.held), sorted(h.enforcer.tracked_))


async def one_call(channel: grpc.aio.Channel, path: str, streaming: bool, body: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        if streaming:
            stream = channel.unary_stream(path)(body, timeout=0.3)
            async for _ in stream:
                pass
        else:
            await channel.unary_unary(path)(body, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def edge_values(f: FieldDescriptor) -> list[Any]:
    """Every adversarial value tried for one field in the sweep."""
    if f.type == FieldDescriptor.TYPE_STRING:
        return EDGE_TEXT
    if f.type == FieldDescriptor.TYPE_BYTES:
        return [b"", bytes(32), b"\xff" * 2048]
    if f.type == FieldDescriptor.TYPE_BOOL:
        return [True, False]
    if f.type == FieldDescriptor.TYPE_ENUM and f.enum_type is not None:
        return [-1, 0, len(f.enum_type.values) + 5]
    return EDGE_INTEGERS.get(f.type, [])


def sweep(service: ServiceDescriptor) -> list[tuple[str, bool, bytes]]:
    """Each template with each of its fields, one at a time, set to each edge value: deterministic and complete
    for the edges (the random part may not reach a field three levels into a valid request)."""
    out = []
    for method in service.methods:
        template = TEMPLATES.get(method.name)
        if template is None:
            continue
        for path in scalar_paths(template.DESCRIPTOR):  # type: ignore[arg-type]
            for value in edge_values(path[-1]):
                msg = type(template)()
                msg.CopyFrom(template)
                target = msg
                for f in path[:-1]:
                    target = getattr(target, f.name)
                if path[-1].is_repeated:
                    getattr(target, path[-1].name).append(value)
                else:
                    setattr(target, path[-1].name, value)
                out.append((f"/{service.full_name}/{method.name}", method.server_streaming, msg.SerializeToString()))
    return out


def fuzz_service(tmp_path: Path, service: ServiceDescriptor, channel_of: Callable[[Harness], grpc.aio.Channel],
                 workers: int = 0) -> None:
    loop = LoopThread()
    ca = Authority("fuzz CA")
    config = config_for(tmp_path, ca)
    # Every call comes from one address: lift the per-source call rate so that they reach the handlers
    # (tests/api/test_challenge_rate.py covers the limit).
    config = replace(config, challenge=replace(config.challenge, calls_per_second=100_000.0, calls_burst=100_000))
    h = loop.run(start(tmp_path, ca, config=config, workers=workers))
    try:
        loop.run(quarantined(h))

        async def open_channel() -> grpc.aio.Channel:  # an aio channel belongs to the loop it is made on
            return channel_of(h)

        channel = loop.run(open_channel())

        def one(call: tuple[str, bool, bytes]) -> None:
            path, streaming, body = call
            before = fingerprint(h)
            code, details = loop.run(one_call(channel, path, streaming, body))
            shown = body[:200]
            assert code in DOCUMENTED, (path, shown, code, details)
            assert not any(w in details for w in INTERNAL_WORDS), (path, shown, details)
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
                assert fingerprint(h) == before, (path, shown, code, details)
            assert not any(t.done() for t in h.daemon._tasks), "a daemon task ended"

        for call in sweep(service):
            one(call)

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(calls(service))
        def random_calls(call: tuple[str, bool, bytes]) -> None:
            one(call)

        random_calls()
        async def status() -> str:
            return str((await h.local().GetStatus(control_pb2.GetStatusRequest())).gateway_id)

        assert loop.run(status()) == "gw-test"  # still up
    finally:
        loop.run(stop(h))
        loop.close()


def test_fuzz_control_service(tmp_path: Path) -> None:
    def channel(h: Harness) -> grpc.aio.Channel:
        h.local()
        return h.channels[-1]

    fuzz_service(tmp_path, control_pb2.DESCRIPTOR.services_by_name["ControlService"], channel)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "worker-processes"])
def test_fuzz_challenge_service(tmp_path: Path, workers: int) -> None:
    def channel(h: Harness) -> grpc.aio.Channel:
        h.challenge()
        return h.channels[-1]

    fuzz_service(tmp_path, challenge_pb2.DESCRIPTOR.services_by_name["ChallengeService"], channel, workers)
