"""Netlink message framing and multicast subscriptions shared by the raw-socket adapters (conntrack, rtnetlink,
nftables notifications)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Iterator

NLMSG_HEADER = struct.Struct("=IHHII")
NLA_HEADER = struct.Struct("=HH")
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(message type, payload) of each netlink message in a datagram."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            return
        yield kind, data[offset + NLMSG_HEADER.size: offset + length]
        offset += (length + 3) & ~3


def attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(attribute type, value) of each attribute, flags masked off."""
    offset = 0
    while offset + NLA_HEADER.size <= len(data):
        length, kind = NLA_HEADER.unpack_from(data, offset)
        if length < NLA_HEADER.size:
            return
        yield kind & NLA_TYPE_MASK, data[offset + NLA_HEADER.size: offset + length]
        offset += (length + 3) & ~3


def nla(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    return NLA_HEADER.pack(NLA_HEADER.size + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


class Subscription:
    """A raw netlink socket read on the event loop (add_reader: pyroute2's async classes do not run under
    uvloop), bound to multicast `groups` (0: none, e.g. a queue bound by `configure`). `on_data` gets each
    datagram; `on_overflow` is called when the kernel dropped messages because the socket's buffer was full
    (ENOBUFS): what they said is lost. `configure` runs on the bound, still blocking socket before reading
    starts (requests that need an answer)."""

    def __init__(self, protocol: int, groups: int, on_data: Callable[[bytes], None],
                 on_overflow: Callable[[OSError], None], *, rcvbuf: int | None = None,
                 configure: Callable[[socket.socket], None] | None = None) -> None:
        self.protocol, self.groups, self.rcvbuf, self.configure = protocol, groups, rcvbuf, configure
        self.on_data, self.on_overflow = on_data, on_overflow
        self.sock: socket.socket | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self.protocol)
        try:
            if self.rcvbuf:
                try:  # beyond net.core.rmem_max (root only)
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((0, self.groups))
            if self.configure is not None:
                self.configure(sock)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as exc:
                self.on_overflow(exc)
                continue
            self.on_data(data)
