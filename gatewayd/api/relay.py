"""The challenge API served by worker processes: the wire between a worker and the daemon, and the daemon's side.

With `[challenge] workers = N` the challenge listener's gRPC (HTTP/2, HPACK, framing: two thirds of the event
loop's time per proof when the daemon serves it itself) runs in N worker processes bound to the same addresses
with SO_REUSEPORT; the kernel spreads the client apps' connections over them. A worker understands nothing of a
call: it hands the method, the caller's address as gRPC saw it, the time left and the request's raw bytes to the
daemon over a socket pair, and answers with what comes back. The daemon parses, checks and serves every call
exactly as its own listener does (the same guarded servicer: caller lookup, validation, limits, the driver's
once-only spends), so there is one implementation of the challenge API and one owner of the state.

Frames, both ways: a 4-byte big-endian length, then a kind byte and the kind's fields.
  worker -> daemon   CALL    call id (u32), method index (u8), time left in ms (u32, ~0 = no deadline),
                             caller (u16 length + ASCII gRPC peer string), request bytes
                     CANCEL  call id: the client went away
                     BOUND   the listening ports (u16 each), once, after the worker's server started
                     FAILED  why the worker could not listen (UTF-8), then it exits
  daemon -> worker   REPLY   call id, status code (u8, 0 = OK), the response bytes or the error's details (UTF-8)
                     ITEM    call id, one message of a server stream (the stream ends with a REPLY)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc

import gatewayd
from gatewayd.tasks import spawn

log = logging.getLogger(__name__)

CALL, CANCEL, BOUND, FAILED = 1, 2, 3, 4
REPLY, ITEM = 1, 2
NO_DEADLINE = 0xFFFFFFFF
HEADER = struct.Struct("!I")
CALL_HEAD = struct.Struct("!BIBIH")
ID = struct.Struct("!BI")
REPLY_HEAD = struct.Struct("!BIB")
FRAME_SLACK = 1024
"""Room for a CALL's fields beside the largest request a worker accepts."""

CODES = {code.value[0]: code for code in grpc.StatusCode}


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Cuts a byte stream into frame bodies; a frame longer than the limit is a broken peer (ValueError)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        out = []
        start = 0
        while len(self.buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer, start)
            if size > self.limit or size == 0:
                raise ValueError(f"frame of {size} bytes (limit {self.limit})")
            if len(self.buffer) - start - HEADER.size < size:
                break
            out.append(bytes(self.buffer[start + HEADER.size:start + HEADER.size + size]))
            start += HEADER.size + size
        del self.buffer[:start]
        return out


def encode_call(call_id: int, method: int, peer: str, timeout: float | None, request: bytes) -> bytes:
    millis = NO_DEADLINE if timeout is None else min(NO_DEADLINE - 1, max(0, int(timeout * 1000)))
    caller = peer.encode("ascii", "replace")[:1024]
    return frame(CALL_HEAD.pack(CALL, call_id, method, millis, len(caller)) + caller + request)


def encode_reply(call_id: int, code: grpc.StatusCode, body: bytes) -> bytes:
    return frame(REPLY_HEAD.pack(REPLY, call_id, code.value[0]) + body)


@dataclass(frozen=True)
class Method:
    """One method of the relayed service as the daemon serves it."""

    name: str
    handler: Callable[..., Any]
    """The guarded servicer method (unary: a coroutine function; server streaming: an async generator function)."""
    parse: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]
    streaming: bool


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class RelayedContext:
    """What the challenge servicer and its guard use of a gRPC context, for a call that a worker relayed."""

    def __init__(self, peer: str, timeout: float | None) -> None:
        self._peer = peer
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class WorkerLink(asyncio.Protocol):
    """The daemon's end of one worker's socket pair: serves the calls the worker relays."""

    def __init__(self, methods: list[Method], max_request: int, name: str) -> None:
        self.methods, self.name = methods, name
        self.reader = FrameReader(max_request + FRAME_SLACK)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.bound: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.bound.done():
            self.bound.set_exception(OSError(f"{self.name} exited before it listened"))
        for task in self.calls.values():
            task.cancel()
        self.calls.clear()
        self.closed.set()

    def data_received(self, data: bytes) -> None:
        try:
            for body in self.reader.feed(data):
                self._frame(body)
        except (ValueError, struct.error, IndexError) as exc:
            log.error("%s sent a malformed frame (%s); closing its connection", self.name, exc)
            if self.transport is not None:
                self.transport.close()

    def _frame(self, body: bytes) -> None:
        kind = body[0]
        if kind == CALL:
            _, call_id, index, millis, size = CALL_HEAD.unpack_from(body)
            start = CALL_HEAD.size
            peer = body[start:start + size].decode("ascii", "replace")
            request = body[start + size:]
            method = self.methods[index]  # IndexError: malformed
            timeout = None if millis == NO_DEADLINE else millis / 1000
            self.calls[call_id] = spawn(self._serve(call_id, method, RelayedContext(peer, timeout), request),
                                        name=f"relayed-{method.name}")
        elif kind == CANCEL:
            _, call_id = ID.unpack_from(body)
            task = self.calls.pop(call_id, None)
            if task is not None:
                task.cancel()
        elif kind == BOUND:
            ports = list(struct.unpack_from(f"!{(len(body) - 1) // 2}H", body, 1))
            if not self.bound.done():
                self.bound.set_result(ports)
        elif kind == FAILED:
            if not self.bound.done():
                self.bound.set_exception(OSError(body[1:].decode("utf-8", "replace")))
        else:
            raise ValueError(f"unknown frame kind {kind}")

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _serve(self, call_id: int, method: Method, context: RelayedContext, data: bytes) -> None:
        code, body = grpc.StatusCode.OK, b""
        try:
            request = method.parse(data)
            if method.streaming:
                items: AsyncIterator[Any] = method.handler(request, context)
                async for item in items:
                    self._send(frame(ID.pack(ITEM, call_id) + method.serialize(item)))
            else:
                body = method.serialize(await method.handler(request, context))
        except Aborted as exc:
            code, body = exc.code, exc.details.encode()
        except asyncio.CancelledError:
            return  # the client went away (or the worker did): nobody to answer
        except Exception:
            log.exception("relayed %s failed", method.name)
            code, body = grpc.StatusCode.UNKNOWN, b"unexpected error in the gateway; the cause is in its log"
        finally:
            self.calls.pop(call_id, None)
        self._send(encode_reply(call_id, code, body))


@dataclass
class Worker:
    process: asyncio.subprocess.Process
    link: WorkerLink
    transport: asyncio.BaseTransport


class ChallengeWorkers:
    """N worker processes serving the challenge listener's addresses; a worker that dies is replaced.

    Stopped like a gRPC server (`stop(grace)`): SIGTERM, the workers finish their calls within the grace (the
    daemon still answers them), then SIGKILL for any left. A worker exits by itself when the daemon's end of its
    socket closes, and is sent SIGTERM by the kernel if the daemon dies (PR_SET_PDEATHSIG)."""

    RESTART_DELAY = 1.0

    def __init__(self, methods: list[Method], count: int, max_message_bytes: int) -> None:
        self.methods, self.count, self.max_message_bytes = methods, count, max_message_bytes
        self.workers: list[Worker | None] = [None] * count
        self.addresses: list[str] = []
        self.ports: list[int] = []
        self.stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers if w is not None]

    async def start(self, addresses: list[str]) -> list[int]:
        """Start every worker; returns the bound ports (the first worker resolves any port 0 for the others).
        Raises OSError, with every started worker stopped, when one cannot listen."""
        self.addresses = list(addresses)
        try:
            first = await self._spawn(0, self.addresses)
            self.ports = await first.link.bound
            self.addresses = [_with_port(a, p) for a, p in zip(self.addresses, self.ports, strict=True)]
            rest = [await self._spawn(i, self.addresses) for i in range(1, self.count)]
            for worker in rest:
                await worker.link.bound
        except BaseException:
            await self.stop(0)
            raise
        self._watchers = [spawn(self._watch(i), name=f"challenge-worker-{i}") for i in range(self.count)]
        log.info("challenge API served by %d worker processes (pids %s) on %s", self.count,
                 ", ".join(map(str, self.pids)), ", ".join(self.addresses))
        return self.ports

    async def _spawn(self, index: int, addresses: list[str]) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        root = str(Path(gatewayd.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gatewayd.api.worker", "--fd", str(theirs.fileno()),
                "--max-message-bytes", str(self.max_message_bytes), "--name", f"challenge-worker-{index}",
                *addresses, pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        name = f"challenge worker {index} (pid {process.pid})"
        transport, link = await asyncio.get_running_loop().create_unix_connection(
            lambda: WorkerLink(self.methods, self.max_message_bytes, name), sock=ours)
        worker = Worker(process, link, transport)
        self.workers[index] = worker
        return worker

    async def _watch(self, index: int) -> None:
        """Replace worker `index` whenever it exits while the workers are meant to run."""
        while not self.stopping:
            worker = self.workers[index]
            if worker is not None:
                code = await worker.process.wait()
                worker.transport.close()
                await worker.link.closed.wait()
                if self.stopping:
                    return
                log.error("challenge worker %d (pid %d) exited with %s; starting another in %.0f s", index,
                          worker.process.pid, code, self.RESTART_DELAY)
                self.workers[index] = None
            await asyncio.sleep(self.RESTART_DELAY)
            try:
                worker = await self._spawn(index, self.addresses)
                await worker.link.bound
                log.info("challenge worker %d restarted (pid %d)", index, worker.process.pid)
            except OSError as exc:
                log.error("challenge worker %d could not start again: %s", index, exc)

    async def stop(self, grace: float | None) -> None:
        self.stopping = True
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        running = [w for w in self.workers if w is not None and w.process.returncode is None]
        for worker in running:
            _signal(worker.process, signal.SIGTERM)
        if running:
            await asyncio.wait([spawn(w.process.wait(), name="worker-exit", awaited=True)
                                for w in running], timeout=(grace or 0) + 2)
            for worker in running:
                if worker.process.returncode is None:
                    _signal(worker.process, signal.SIGKILL)
                    await worker.process.wait()
        for left in self.workers:
            if left is not None:
                left.transport.close()
        self.workers = [None] * self.count


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def _with_port(address: str, port: int) -> str:
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"
