"""A lean gRPC load generator: unary calls as pre-encoded HTTP/2 frames on plain sockets (what h2load or ghz do).

The benchmarks run the daemon and its clients on the same two cores; grpc.aio's client spends 0.44-0.63 ms of
CPU a call here (~0.08 ms for this one), which at 2,000 calls a second is half of the machine taken from the
daemon. This client writes each call's HEADERS and DATA frames, encoded before the timed run, and reads the
answer's frames without an HPACK decoder (an answer with a message is the call's result; a trailers-only answer
is a gRPC error, whose status is not decoded). One connection per caller, one call at a time on it (stream 1,
3, ...), h2c only.
"""

from __future__ import annotations

import asyncio
import struct
from typing import cast

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
_HEAD = struct.Struct(">HBBBI")  # 24-bit length as 16 + 8 bits, type, flags, stream id
_WINDOW = 1 << 30


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 8, n & 0xFF, kind, flags, stream) + payload


def _string(value: str) -> bytes:
    raw = value.encode()
    assert len(raw) < 127, "a one-byte length prefix"
    return bytes([len(raw)]) + raw


def request_headers(authority: str, path: str) -> bytes:
    """HPACK block of a gRPC request: indexed :method POST and :scheme http, the rest literal without indexing
    (so that no dynamic table is kept on either side)."""
    return (b"\x83\x86"
            + b"\x04" + _string(path)
            + b"\x01" + _string(authority)
            + b"\x0f\x10" + _string("application/grpc")
            + b"\x00" + _string("te") + _string("trailers"))


def unary(stream: int, headers: bytes, message: bytes) -> bytes:
    """The frames of one unary call on `stream`."""
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return frame(HEADERS, END_HEADERS, stream, headers) + frame(DATA, END_STREAM, stream, body)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection; `call` sends pre-encoded frames and resolves with the answer's message (bytes) or
    None for a gRPC error (trailers only, reset stream, connection gone)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()
        self._pending: asyncio.Future[bytes | None] | None = None
        self._message: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods
        self.transport = transport = cast(asyncio.Transport, transport)
        # Our SETTINGS: a large stream window, then the connection window to match.
        settings = frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, _WINDOW))
        transport.write(PREFACE + settings + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", _WINDOW - 65535)))

    def call(self, frames: bytes) -> asyncio.Future[bytes | None]:
        assert self.transport is not None and self._pending is None
        self._pending = asyncio.get_running_loop().create_future()
        self._message = None
        self.transport.write(frames)
        return self._pending

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        while len(buf) >= 9:
            hi, lo, kind, flags, stream = _HEAD.unpack_from(buf)
            size = (hi << 8) | lo
            if len(buf) < 9 + size:
                return
            payload = bytes(buf[9:9 + size])
            del buf[:9 + size]
            self._frame(kind, flags, stream & 0x7FFFFFFF, payload)

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS and not flags & ACK:
            assert self.transport is not None
            self.transport.write(frame(SETTINGS, ACK, 0, b""))
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == PING and not flags & ACK:
            assert self.transport is not None
            self.transport.write(frame(PING, ACK, 0, payload))
        elif kind == DATA and stream:
            if len(payload) >= 5:
                self._message = payload[5:]
            if flags & END_STREAM:
                self._finish()
        elif kind == HEADERS and flags & END_STREAM:
            self._finish()
        elif kind == RST_STREAM or kind == GOAWAY:
            self._message = None
            self._finish()

    def _finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.set_result(self._message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed"))
        self._message = None
        self._finish()
