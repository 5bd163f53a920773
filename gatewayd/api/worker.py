"""A challenge worker process (`python -m gatewayd.api.worker`, started by the daemon; see gatewayd.api.relay).

It serves gRPC on the challenge addresses (SO_REUSEPORT, beside its siblings) and relays every ChallengeService
call, unparsed, to the daemon over the inherited socket; health and reflection it answers itself. It holds no
state and no secret, drops every capability at start, and exits when the daemon's end of the socket closes.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc

from gatewayd.api import relay
from gatewayd.api.listeners import serve_health
from gatewayd.v1 import challenge_pb2

log = logging.getLogger("gatewayd.worker")

SERVICE = challenge_pb2.DESCRIPTOR.services_by_name["ChallengeService"]
STREAM_BACKLOG = 64
"""Stream messages a worker holds for a client that does not read; past that the stream ends."""


class Upstream(asyncio.Protocol):
    """The worker's end of the socket pair to the daemon."""

    def __init__(self) -> None:
        self.reader = relay.FrameReader(1 << 24)
        self.transport: asyncio.Transport | None = None
        self.next_id = 0
        self.waiting: dict[int, asyncio.Queue[tuple[int, bytes]]] = {}
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        for queue in self.waiting.values():
            queue.put_nowait((relay.REPLY, struct.pack("!B", grpc.StatusCode.UNAVAILABLE.value[0])
                              + b"the gateway's daemon is stopping"))
        self.waiting.clear()
        self.lost.set()

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self.reader.feed(data)
        except ValueError as exc:
            log.error("malformed frame from the daemon (%s)", exc)
            assert self.transport is not None
            self.transport.close()
            return
        for body in bodies:
            kind, call_id = relay.ID.unpack_from(body)
            queue = self.waiting.get(call_id)
            if queue is None:
                continue  # cancelled meanwhile
            if kind == relay.REPLY:
                del self.waiting[call_id]
            elif queue.qsize() >= STREAM_BACKLOG:
                # The client does not read its stream: end it rather than hold messages without bound.
                del self.waiting[call_id]
                self.send(relay.frame(relay.ID.pack(relay.CANCEL, call_id)))
                queue.put_nowait((relay.REPLY, struct.pack("!B", grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
                                  + b"the client did not read its status stream"))
                continue
            queue.put_nowait((kind, body[relay.ID.size:]))

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def call(self, index: int, context: grpc.aio.ServicerContext, request: bytes
             ) -> tuple[int, asyncio.Queue[tuple[int, bytes]]]:
        if self.lost.is_set():
            raise ConnectionError
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.waiting[self.next_id] = queue
        self.send(relay.encode_call(self.next_id, index, context.peer() or "", context.time_remaining(), request))
        return self.next_id, queue

    def cancel(self, call_id: int) -> None:
        if self.waiting.pop(call_id, None) is not None:
            self.send(relay.frame(relay.ID.pack(relay.CANCEL, call_id)))


async def _finish(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """A REPLY's status and body: the response, or the call aborted with the daemon's status and details."""
    code = relay.CODES.get(body[0], grpc.StatusCode.UNKNOWN)
    if code is grpc.StatusCode.OK:
        return body[1:]
    await context.abort(code, body[1:].decode("utf-8", "replace"))
    raise AssertionError("abort returned")


def handlers(upstream: Upstream) -> grpc.GenericRpcHandler:
    def unary(index: int) -> Any:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                call_id, queue = upstream.call(index, context, request)
            except ConnectionError:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway's daemon is stopping")
            try:
                _, body = await queue.get()
            except asyncio.CancelledError:
                upstream.cancel(call_id)
                raise
            return await _finish(body, context)
        return grpc.unary_unary_rpc_method_handler(handle)

    def stream(index: int) -> Any:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            try:
                call_id, queue = upstream.call(index, context, request)
            except ConnectionError:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway's daemon is stopping")
            try:
                while True:
                    kind, body = await queue.get()
                    if kind == relay.ITEM:
                        yield body
                        continue
                    if await _finish(body, context):
                        raise AssertionError("a stream's end carries no message")
                    return
            finally:
                upstream.cancel(call_id)  # no-op once the daemon ended it
        return grpc.unary_stream_rpc_method_handler(handle)

    table = {m.name: (stream if m.server_streaming else unary)(i) for i, m in enumerate(SERVICE.methods)}
    return grpc.method_handlers_generic_handler(SERVICE.full_name, table)


def _status_mask(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    raise OSError(f"no {field} in /proc/self/status")


def drop_privileges(argv: list[str]) -> None:
    """No capabilities (the daemon's unit grants CAP_NET_ADMIN; a worker needs none), no new privileges, and
    SIGTERM when the daemon dies. Raises OSError when a capability cannot be dropped: the worker does not run.

    capset(2) drops them all where it is allowed. The systemd unit forbids it (@privileged is filtered) and
    gives its non-root user CAP_NET_ADMIN as an ambient capability: there the worker clears its ambient set and
    executes itself again, which leaves a non-root process with no effective, permitted or ambient capability
    (capabilities(7), execve). Its inheritable set keeps CAP_NET_ADMIN (only capset could clear it), which grants
    nothing: with no new privileges, no execve gains a file's capabilities."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig, pr_set_no_new_privs, pr_cap_ambient, pr_cap_ambient_clear_all = 1, 38, 47, 4
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = ctypes.create_string_buffer(24)  # two empty __user_cap_data_struct
    if libc.capset(ctypes.c_char_p(header), data) == 0:
        return
    refused = ctypes.get_errno()
    if _status_mask("CapAmb"):
        if libc.prctl(pr_cap_ambient, pr_cap_ambient_clear_all, 0, 0, 0) != 0 or _status_mask("CapAmb"):
            raise OSError(ctypes.get_errno(), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
        os.execv(sys.executable, [sys.executable, "-m", "gatewayd.api.worker", *argv])  # noqa: S606 (fixed argv)
    if _status_mask("CapEff") or _status_mask("CapPrm"):
        raise OSError(refused, "capset: the worker cannot drop its capabilities")


async def serve(fd: int, addresses: list[str], max_message_bytes: int) -> int:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    _, upstream = await loop.create_unix_connection(Upstream, sock=sock)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers((handlers(upstream),))
    await serve_health(server, [SERVICE.full_name])
    ports = []
    for address in addresses:
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            upstream.send(relay.frame(bytes([relay.FAILED]) + f"cannot listen on {address}".encode()))
            await asyncio.sleep(0.1)  # let the frame leave
            return 1
        ports.append(port)
    await server.start()
    upstream.send(relay.frame(bytes([relay.BOUND]) + struct.pack(f"!{len(ports)}H", *ports)))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    lost = asyncio.ensure_future(upstream.lost.wait())
    await asyncio.wait([lost, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    # Stopping: calls in flight are still answered by the daemon within the grace; with the daemon gone, at once.
    await server.stop(0 if upstream.lost.is_set() else 5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatewayd.api.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--max-message-bytes", type=int, required=True)
    parser.add_argument("--name", default="challenge-worker")
    parser.add_argument("addresses", nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"{args.name}: %(levelname)s %(message)s", stream=sys.stderr)
    drop_privileges(sys.argv[1:] if argv is None else argv)
    try:
        import uvloop
        return uvloop.run(serve(args.fd, args.addresses, args.max_message_bytes))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
