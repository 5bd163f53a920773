"""Netlink message framing shared by the raw-socket adapters (conntrack, rtnetlink)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

NLMSG_HEADER = struct.Struct("=IHHII")
NLA_HEADER = struct.Struct("=HH")
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER


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
