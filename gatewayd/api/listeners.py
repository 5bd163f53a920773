"""gRPC listeners: the control API over mTLS TCP and a local unix socket, the challenge API on the tunnel.

Every call passes one wrapper: authorization by principal (control only; default deny), a server-side
deadline cap, and translation of refusals into precise statuses. Health and reflection on every listener.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gatewayd.api import relay
from gatewayd.errors import EnforcementFailed, JobFailed, Refused, Status, StorageFailed
from gatewayd.scheduling import Foreground
from gatewayd.v1 import challenge_pb2, challenge_pb2_grpc, control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)

LOCAL_TRANSPORT = b"local"


@dataclass(frozen=True, kw_only=True)
class ListenerLimits:
    max_message_bytes: int = 64 * 1024
    """Largest request accepted."""
    max_deadline: float = 30.0
    """Upper bound on any call's duration, whatever deadline the client set."""


class Authorizer:
    """Per-method permissions by principal. A principal is a TLS client certificate's SAN (any) or CN, or
    the configured name of the local unix socket."""

    def __init__(self, rules: Mapping[str, frozenset[str]], local_principal: str | None) -> None:
        # Both are replaced on reload; every call reads them afresh.
        self.rules = rules
        self.local_principal = local_principal

    def principals(self, context: grpc.aio.ServicerContext) -> list[str]:
        auth = context.auth_context()
        if auth.get("transport_security_type") == [LOCAL_TRANSPORT]:
            return [self.local_principal] if self.local_principal else []
        names = [v.decode() for v in auth.get("x509_subject_alternative_name", [])]
        names += [v.decode() for v in auth.get("x509_common_name", [])]
        return names

    def allowed(self, context: grpc.aio.ServicerContext, method: str) -> bool:
        for principal in self.principals(context):
            granted = self.rules.get(principal, frozenset())
            if "*" in granted or method in granted:
                return True
        return False


_STATUS = {s: getattr(grpc.StatusCode, s.value) for s in Status}


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes do not parse as its message type (malformed wire format, a string field that is
    not UTF-8, a varint past 64 bits): answered INVALID_ARGUMENT by the guard, never seen by a servicer."""

    message: str
    """The expected message type."""


def _parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            return Undecodable(cls.DESCRIPTOR.name)
    return parse


def _methods(servicer: Any, service: ServiceDescriptor) -> list[relay.Method]:
    """The servicer's methods in the service descriptor's order, each with a request parser that turns a message
    that does not parse into Undecodable instead of an error gRPC would answer as UNKNOWN."""
    methods = []
    for method in service.methods:
        request, response = (message_factory.GetMessageClass(t) for t in (method.input_type, method.output_type))
        methods.append(relay.Method(name=method.name, handler=getattr(servicer, method.name),
                                    parse=_parser(request), serialize=response.SerializeToString,
                                    streaming=method.server_streaming))
    return methods


def _add_service(servicer: Any, service: ServiceDescriptor, server: grpc.aio.Server) -> None:
    """Register the servicer's methods (what the generated add_*_to_server does, with _methods' parsers)."""
    handlers = {}
    for m in _methods(servicer, service):
        make = grpc.unary_stream_rpc_method_handler if m.streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(m.handler, request_deserializer=m.parse, response_serializer=m.serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def guarded(method: Callable[..., Any], name: str, limits: ListenerLimits,
            authorizer: Authorizer | None, foreground: Foreground) -> Callable[..., Any]:
    """Wrap a servicer method (unary or server-streaming) with authorization, deadline cap and errors.
    A unary call is foreground work while it is served (streams are long-lived: they are not)."""

    async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
        if authorizer is not None and not authorizer.allowed(context, name):
            who = ", ".join(authorizer.principals(context)) or "anonymous"
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{who} may not call {name}")
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"not a valid {request.message} message (malformed protobuf, or a string that is "
                                "not UTF-8)")

    def budget(context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return limits.max_deadline if remaining is None else min(remaining, limits.max_deadline)

    async def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, Refused):
            await context.abort(_STATUS[exc.status], str(exc))
        if isinstance(exc, EnforcementFailed):
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"the kernel refused the firewall change ({exc}); the request is committed and the "
                                "daemon retries until the kernel holds it (enforcement is unhealthy until then)")
        if isinstance(exc, TimeoutError):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "server-side deadline reached")
        if isinstance(exc, StorageFailed):
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        if isinstance(exc, JobFailed):
            await context.abort(grpc.StatusCode.INTERNAL, "the request failed inside the gateway and changed "
                                "nothing; the cause is in the gateway's log")
        raise exc

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(request, context)
            try:
                async for item in method(request, context):
                    yield item
            except (Refused, EnforcementFailed, StorageFailed) as exc:
                await fail(context, exc)
        return stream

    @functools.wraps(method)
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with foreground.running():
            await check(request, context)
            try:
                async with asyncio.timeout(budget(context)):
                    return await method(request, context)
            except (Refused, EnforcementFailed, TimeoutError, JobFailed, StorageFailed) as exc:
                await fail(context, exc)
    return unary


def _guard_all(servicer: Any, service: Any, limits: ListenerLimits, authorizer: Authorizer | None,
               foreground: Foreground) -> None:
    for name in service.methods_by_name:
        setattr(servicer, name, guarded(getattr(servicer, name), name, limits, authorizer, foreground))


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    cert: Path
    """Server certificate chain (PEM)."""
    key: Path
    """Server private key (PEM)."""
    client_ca: Path
    """CA bundle that client certificates must chain to (PEM)."""


def _server(limits: ListenerLimits) -> grpc.aio.Server:
    return grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])


async def control_server(servicer: control_pb2_grpc.ControlServiceServicer, *, tcp: str | None,
                         tls: TlsFiles | None, unix_socket: Path | None, unix_mode: int,
                         authorizer: Authorizer, limits: ListenerLimits, foreground: Foreground
                         ) -> tuple[grpc.aio.Server, int | None]:
    """One server bound to the mTLS TCP address and/or the unix socket; returns it started, and the TCP port."""
    server = _server(limits)
    _guard_all(servicer, control_pb2.DESCRIPTOR.services_by_name["ControlService"], limits, authorizer, foreground)
    _add_service(servicer, control_pb2.DESCRIPTOR.services_by_name["ControlService"], server)
    name = control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name
    await serve_health(server, [name])
    port = None
    if tcp:
        if tls is None:
            raise ValueError("the control TCP listener requires TLS files")
        creds = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())], root_certificates=tls.client_ca.read_bytes(),
            require_client_auth=True)
        port = server.add_secure_port(tcp, creds)
        if port == 0:
            raise OSError(f"cannot listen on {tcp}")
    if unix_socket is not None:
        unix_socket.parent.mkdir(parents=True, exist_ok=True)
        unix_socket.unlink(missing_ok=True)
        local = grpc.local_server_credentials(grpc.LocalConnectionType.UDS)
        server.add_secure_port(f"unix:{unix_socket}", local)
    await server.start()
    if unix_socket is not None:
        unix_socket.chmod(unix_mode)
    return server, port


async def challenge_server(servicer: challenge_pb2_grpc.ChallengeServiceServicer, addresses: list[str],
                           limits: ListenerLimits, foreground: Foreground
                           ) -> tuple[grpc.aio.Server, list[int]]:
    """The challenge API, plain gRPC: WireGuard encrypts and authenticates the tunnel it is reached over."""
    server = _server(limits)
    _guard_all(servicer, challenge_pb2.DESCRIPTOR.services_by_name["ChallengeService"], limits, None, foreground)
    _add_service(servicer, challenge_pb2.DESCRIPTOR.services_by_name["ChallengeService"], server)
    await serve_health(server, [challenge_pb2.DESCRIPTOR.services_by_name["ChallengeService"].full_name])
    ports = []
    for address in addresses:
        port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        ports.append(port)
    await server.start()
    return server, ports


def challenge_methods(servicer: challenge_pb2_grpc.ChallengeServiceServicer, limits: ListenerLimits,
                      foreground: Foreground) -> list[relay.Method]:
    """The challenge API as served for worker processes (gatewayd.api.relay): the same guarded servicer and the
    same request parsing as challenge_server, indexed by the method's place in the service descriptor."""
    service = challenge_pb2.DESCRIPTOR.services_by_name["ChallengeService"]
    _guard_all(servicer, service, limits, None, foreground)
    return _methods(servicer, service)


async def serve_health(server: grpc.aio.Server, names: list[str]) -> None:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
