"""Opening WireGuard handshake initiations recorded from wireguard-go (tests/fixtures/wg_initiations.json, made in
a lab namespace with test-only keys), and refusing every altered one."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gatewayd.handshake import LABEL_MAC1, Responder, endpoint_text, udp_packet
from gatewayd.lab.noise import Handshake

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "wg_initiations.json").read_text())
KEY = base64.b64decode(FIXTURE["responder_private_key"])
INITIATOR = base64.b64decode(FIXTURE["initiator_public_key"])
RECORDED = [bytes.fromhex(m) for m in FIXTURE["initiations"]]


def with_mac1(message: bytes, responder_public: bytes) -> bytes:
    """The message with a correct mac1 (anyone can compute it: it is keyed with the public key)."""
    key = hashlib.blake2s(LABEL_MAC1 + responder_public).digest()
    mac = hashlib.blake2s(message[:116], key=key, digest_size=16).digest()
    return message[:116] + mac + message[132:]


def test_recorded_initiations_name_their_initiator_and_carry_growing_timestamps() -> None:
    responder = Responder(KEY)
    assert base64.b64encode(responder.public_key).decode() == FIXTURE["responder_public_key"]
    opened = [responder.open(m) for m in RECORDED]
    assert all(o is not None and o.initiator == INITIATOR for o in opened)
    first, second = opened
    assert first is not None and second is not None
    assert second.timestamp > first.timestamp  # a retry 5 s later
    assert first.sender_index == struct.unpack_from("<I", RECORDED[0], 4)[0]


@pytest.mark.parametrize("offset", [0, 4, 8, 39, 40, 87, 88, 115, 116, 131])
def test_a_flipped_bit_anywhere_before_mac2_is_refused(offset: int) -> None:
    responder = Responder(KEY)
    altered = bytearray(RECORDED[0])
    altered[offset] ^= 0x01
    assert responder.open(bytes(altered)) is None
    if offset < 116 and offset >= 8:
        # Even with a mac1 recomputed by the attacker, the AEAD refuses it.
        assert responder.open(with_mac1(bytes(altered), responder.public_key)) is None


def test_mac2_is_not_looked_at_and_other_sizes_and_types_are_refused() -> None:
    responder = Responder(KEY)
    assert responder.open(RECORDED[0][:132] + bytes(16)) is not None  # mac2 is only for cookie replies
    assert responder.open(RECORDED[0][:147]) is None
    assert responder.open(RECORDED[0] + b"\0") is None
    assert responder.open(b"\x02" + RECORDED[0][1:]) is None
    assert responder.open(b"") is None


def test_another_interface_key_opens_nothing() -> None:
    other = Responder(X25519PrivateKey.generate().private_bytes_raw())
    assert other.open(RECORDED[0]) is None
    assert other.open(with_mac1(RECORDED[0], other.public_key)) is None


def test_low_order_ephemeral_points_are_refused_without_error() -> None:
    responder = Responder(KEY)
    for point in (bytes(32), b"\x01" + bytes(31), bytes.fromhex(
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")):
        forged = RECORDED[0][:8] + point + RECORDED[0][40:]
        assert responder.open(with_mac1(forged, responder.public_key)) is None


def test_the_gateways_own_initiations_are_attributed_to_the_peer_they_are_for() -> None:
    responder = Responder(KEY)
    peer, other = (X25519PrivateKey.generate() for _ in range(2))
    peer_public = peer.public_key().public_bytes_raw()
    sent = Handshake(KEY, peer_public).message  # the gateway (KEY) initiating towards the peer
    assert responder.sent_to(sent, peer_public)
    assert not responder.sent_to(sent, other.public_key().public_bytes_raw())
    assert not responder.sent_to(sent[:147], peer_public)
    assert responder.open(sent) is None  # not addressed to this interface


def test_the_private_key_is_not_in_the_repr() -> None:
    responder = Responder(KEY)
    assert KEY.hex() not in repr(responder) and FIXTURE["responder_private_key"] not in repr(responder)
    with pytest.raises(ValueError):
        Responder(KEY[:31])


def ipv4_udp(payload: bytes, *, length: int | None = None, options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + 8 + len(payload), 0, 0, 64,
                         socket.IPPROTO_UDP, 0, socket.inet_aton("192.0.2.5"), socket.inet_aton("192.0.2.1"))
    udp = struct.pack("!HHHH", 40000, 51820, length if length is not None else 8 + len(payload), 0)
    return header + options + udp + payload


def udp_datagram(packet: bytes) -> tuple[str, int, bytes] | None:
    d = udp_packet(packet)
    return None if d is None else (d.source, d.sport, d.payload)


def test_udp_datagrams_are_cut_as_their_headers_say() -> None:
    assert udp_datagram(ipv4_udp(RECORDED[0])) == ("192.0.2.5", 40000, RECORDED[0])
    # IP options move the UDP header; trailing bytes beyond the UDP length are not part of the message.
    assert udp_datagram(ipv4_udp(RECORDED[0], options=b"\x01" * 4)) == ("192.0.2.5", 40000, RECORDED[0])
    assert udp_datagram(ipv4_udp(RECORDED[0] + b"junk", length=156)) == ("192.0.2.5", 40000, RECORDED[0])
    assert udp_datagram(ipv4_udp(RECORDED[0], length=200)) is None  # longer than the packet
    assert udp_datagram(ipv4_udp(RECORDED[0], length=4)) is None
    assert udp_datagram(b"\x45" + bytes(10)) is None
    six = struct.pack("!IHBB16s16s", 6 << 28, 8 + 148, socket.IPPROTO_UDP, 64,
                      socket.inet_pton(socket.AF_INET6, "2001:db8::5"),
                      socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
    six += struct.pack("!HHHH", 40001, 51820, 156, 0) + RECORDED[0]
    assert udp_datagram(six) == ("2001:db8::5", 40001, RECORDED[0])
    assert endpoint_text("2001:db8::5", 40001) == "[2001:db8::5]:40001"
    assert endpoint_text("192.0.2.5", 1) == "192.0.2.5:1"
