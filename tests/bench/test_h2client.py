"""The benchmarks' lean gRPC client against grpc's own asyncio server on loopback: a unary call's answer is its
message, a gRPC error (trailers only) is None, and calls follow one another on one connection."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench import h2client


async def test_unary_calls_and_errors_against_grpc_aio_server() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("up", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(h2client.Connection, "127.0.0.1", port)
        await asyncio.wait_for(conn.ready, 5)
        authority = f"127.0.0.1:{port}"
        check = h2client.request_headers(authority, "/grpc.health.v1.Health/Check")
        up = health_pb2.HealthCheckRequest(service="up").SerializeToString()
        answer = await asyncio.wait_for(conn.call(h2client.unary(1, check, up)), 5)
        assert answer is not None
        assert health_pb2.HealthCheckResponse.FromString(answer).status == health_pb2.HealthCheckResponse.SERVING
        # An unknown service is NOT_FOUND: trailers only, no message.
        unknown = health_pb2.HealthCheckRequest(service="nobody").SerializeToString()
        assert await asyncio.wait_for(conn.call(h2client.unary(3, check, unknown)), 5) is None
        # An unknown method: UNIMPLEMENTED, also trailers only; the connection still serves the next call.
        nothing = h2client.request_headers(authority, "/grpc.health.v1.Health/Nothing")
        assert await asyncio.wait_for(conn.call(h2client.unary(5, nothing, b"")), 5) is None
        answer = await asyncio.wait_for(conn.call(h2client.unary(7, check, up)), 5)
        assert answer is not None
        assert health_pb2.HealthCheckResponse.FromString(answer).status == health_pb2.HealthCheckResponse.SERVING
        assert conn.transport is not None
        conn.transport.close()
    finally:
        await server.stop(None)
