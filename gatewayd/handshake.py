"""WireGuard handshake initiations, opened as the responder opens them (Noise_IKpsk2, whitepaper section 5.4.2).

An initiation (message type 1, 148 bytes) carries the initiator's static public key encrypted under keys that
only the holder of the responder's private key can derive, and a TAI64N timestamp that WireGuard uses against
replays. `Responder.open` checks mac1 first (one keyed BLAKE2s over 116 bytes: most garbage stops there), then
does the two X25519 operations and the two AEAD decryptions. The preshared key is mixed in only later (psk2),
so an initiation can be opened without it. Pure: no I/O, no logging; the private key lives only in the
`Responder` and is never shown by its repr.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"

INITIATION = 1
INITIATION_SIZE = 148
MAC1_AT = 116  # mac1 covers the message up to here
ZERO_NONCE = bytes(12)


def blake2s(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac_blake2s(key, data)
    t1 = hmac_blake2s(t0, b"\x01")
    return t1, hmac_blake2s(t0, t1 + b"\x02")


def kdf1(key: bytes, data: bytes) -> bytes:
    return hmac_blake2s(hmac_blake2s(key, data), b"\x01")


@dataclass(frozen=True, slots=True)
class Initiation:
    """An opened handshake initiation."""

    initiator: bytes
    """The initiator's static public key (32 bytes)."""
    sender_index: int
    """The initiator's session index for this handshake (in the clear on the wire)."""
    timestamp: bytes
    """TAI64N, 12 bytes; byte order makes later timestamps compare greater."""


class Responder:
    """Opens initiations addressed to one interface. Holds the interface's private key; caches the static-static
    Diffie-Hellman result per initiator (as WireGuard itself does), so an initiation costs one X25519."""

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != 32:
            raise ValueError("a WireGuard private key is 32 bytes")
        self._private = X25519PrivateKey.from_private_bytes(private_key)
        self.public_key = self._private.public_key().public_bytes_raw()
        chaining = blake2s(CONSTRUCTION)
        self._chaining = chaining
        self._hash = blake2s(blake2s(chaining, IDENTIFIER), self.public_key)
        self._mac1_key = blake2s(LABEL_MAC1, self.public_key)
        self._static_static: dict[bytes, bytes] = {}
        self._peer_mac1_keys: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"Responder(public_key={self.public_key.hex()})"

    def mac1_valid(self, message: bytes) -> bool:
        """Whether the message is an initiation whose mac1 is keyed with this interface's public key."""
        if len(message) != INITIATION_SIZE or message[:4] != b"\x01\x00\x00\x00":
            return False
        expected = hashlib.blake2s(message[:MAC1_AT], key=self._mac1_key, digest_size=16).digest()
        return hmac.compare_digest(expected, message[MAC1_AT:MAC1_AT + 16])

    def open(self, message: bytes) -> Initiation | None:
        """The initiation's initiator and timestamp, or None if it is not an initiation to this interface or
        does not decrypt (tampered, or from a key this interface never saw)."""
        if not self.mac1_valid(message):
            return None
        ephemeral = message[8:40]
        try:
            chaining = kdf1(self._chaining, ephemeral)
            h = blake2s(self._hash, ephemeral)
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
            chaining, key = kdf2(chaining, shared)
            sealed_static = message[40:88]
            initiator = ChaCha20Poly1305(key).decrypt(ZERO_NONCE, sealed_static, h)
            h = blake2s(h, sealed_static)
            static_static = self._static_static.get(initiator)
            if static_static is None:
                static_static = self._private.exchange(X25519PublicKey.from_public_bytes(initiator))
                if len(self._static_static) >= 1 << 20:
                    self._static_static.clear()
                self._static_static[initiator] = static_static
            chaining, key = kdf2(chaining, static_static)
            timestamp = ChaCha20Poly1305(key).decrypt(ZERO_NONCE, message[88:116], h)
        except (InvalidTag, ValueError):
            # ValueError: a low-order point gives an all-zero shared secret, which cryptography refuses.
            return None
        (sender,) = struct.unpack_from("<I", message, 4)
        return Initiation(initiator=initiator, sender_index=sender, timestamp=timestamp)

    def sent_to(self, message: bytes, peer: bytes) -> bool:
        """Whether `message` is an initiation this interface sent to `peer` (its mac1 is keyed with the peer's
        public key: the responder's)."""
        if len(message) != INITIATION_SIZE or message[:4] != b"\x01\x00\x00\x00":
            return False
        key = self._peer_mac1_keys.get(peer)
        if key is None:
            key = self._peer_mac1_keys[peer] = blake2s(LABEL_MAC1, peer)
        expected = hashlib.blake2s(message[:MAC1_AT], key=key, digest_size=16).digest()
        return hmac.compare_digest(expected, message[MAC1_AT:MAC1_AT + 16])

    def forget(self, initiator: bytes) -> None:
        """Drop what is cached about a peer (it left the interface)."""
        self._static_static.pop(initiator, None)
        self._peer_mac1_keys.pop(initiator, None)


# ---- the packet around it ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Datagram:
    """A UDP datagram cut from an IP packet."""

    source: str
    sport: int
    destination: str
    dport: int
    payload: bytes
    """As long as the UDP header says."""


def udp_packet(packet: bytes) -> Datagram | None:
    """The UDP datagram in an IPv4/IPv6 packet, or None. IPv6 extension headers are not walked: a packet with any
    is not an initiation gatewayd opens (WireGuard's own implementations never send one; it still reaches
    WireGuard, which decides)."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        header = (packet[0] & 0x0F) * 4
        if packet[9] != socket.IPPROTO_UDP or len(packet) < header + 8:
            return None
        family, source, destination = socket.AF_INET, packet[12:16], packet[16:20]
    elif version == 6 and len(packet) >= 48:
        header = 40
        if packet[6] != socket.IPPROTO_UDP:
            return None
        family, source, destination = socket.AF_INET6, packet[8:24], packet[24:40]
    else:
        return None
    sport, dport, length = struct.unpack_from("!HHH", packet, header)
    if length < 8 or header + length > len(packet):
        return None
    return Datagram(source=socket.inet_ntop(family, source), sport=sport,
                    destination=socket.inet_ntop(family, destination), dport=dport,
                    payload=packet[header + 8: header + length])


def endpoint_text(address: str, port: int) -> str:
    """WireGuard's spelling of an endpoint: "ip:port" or "[ip6]:port"."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
