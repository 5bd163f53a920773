"""The initiator's side of a WireGuard handshake initiation (Noise_IKpsk2, whitepaper section 5.4.2), for tests
and benchmarks that need many valid initiations without a WireGuard process per peer, and for floods of
initiations that are valid up to a point (mac1 right, contents not)."""

from __future__ import annotations

import hashlib
import os
import struct
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gatewayd.handshake import (
    CONSTRUCTION,
    IDENTIFIER,
    LABEL_MAC1,
    MAC1_AT,
    ZERO_NONCE,
    blake2s,
    hmac_blake2s,
    kdf1,
    kdf2,
)

TAI64_EPOCH = 0x400000000000000A


def tai64n(at: float | None = None) -> bytes:
    at = time.time() if at is None else at
    seconds = int(at)
    return struct.pack(">QI", TAI64_EPOCH + seconds, int((at - seconds) * 1e9))


def with_mac1(message: bytes, responder_public: bytes) -> bytes:
    """The message with the mac1 a sender who knows the responder's public key computes (mac2 zero)."""
    key = blake2s(LABEL_MAC1, responder_public)
    mac = hashlib.blake2s(message[:MAC1_AT], key=key, digest_size=16).digest()
    return message[:MAC1_AT] + mac + bytes(16)


class Handshake:
    """One handshake from the initiator's side: `message` is the initiation; `complete` takes the responder's
    answer (message type 2) and gives the session's sending side. No preshared key."""

    def __init__(self, initiator_private: bytes, responder_public: bytes, *, stamp: bytes | None = None,
                 sender_index: int | None = None) -> None:
        self._static = X25519PrivateKey.from_private_bytes(initiator_private)
        self._ephemeral = X25519PrivateKey.generate()
        e_pub = self._ephemeral.public_key().public_bytes_raw()
        responder = X25519PublicKey.from_public_bytes(responder_public)
        chaining = blake2s(CONSTRUCTION)
        h = blake2s(blake2s(chaining, IDENTIFIER), responder_public)
        chaining = kdf1(chaining, e_pub)
        h = blake2s(h, e_pub)
        chaining, key = kdf2(chaining, self._ephemeral.exchange(responder))
        sealed_static = ChaCha20Poly1305(key).encrypt(ZERO_NONCE, self._static.public_key().public_bytes_raw(), h)
        h = blake2s(h, sealed_static)
        chaining, key = kdf2(chaining, self._static.exchange(responder))
        sealed_stamp = ChaCha20Poly1305(key).encrypt(ZERO_NONCE, stamp or tai64n(), h)
        self._chaining, self._hash = chaining, blake2s(h, sealed_stamp)
        self.index = sender_index if sender_index is not None else int.from_bytes(os.urandom(4), "little")
        body = b"\x01\x00\x00\x00" + struct.pack("<I", self.index) + e_pub + sealed_static + sealed_stamp
        self.message = with_mac1(body + bytes(32), responder_public)

    def complete(self, response: bytes) -> Transport | None:
        if len(response) != 92 or response[:4] != b"\x02\x00\x00\x00":
            return None
        their_index, our_index = struct.unpack_from("<II", response, 4)
        if our_index != self.index:
            return None
        e_r = response[12:44]
        remote = X25519PublicKey.from_public_bytes(e_r)
        chaining = kdf1(self._chaining, e_r)
        h = blake2s(self._hash, e_r)
        chaining = kdf1(chaining, self._ephemeral.exchange(remote))
        chaining = kdf1(chaining, self._static.exchange(remote))
        t0 = hmac_blake2s(chaining, bytes(32))  # KDF3 with the (absent, all-zero) preshared key
        chaining = hmac_blake2s(t0, b"\x01")
        tau = hmac_blake2s(t0, chaining + b"\x02")
        key = hmac_blake2s(t0, tau + b"\x03")
        h = blake2s(h, tau)
        try:
            ChaCha20Poly1305(key).decrypt(ZERO_NONCE, response[44:60], h)
        except InvalidTag:  # an answer that does not authenticate completes nothing
            return None
        sending, _receiving = kdf2(chaining, b"")
        return Transport(key=sending, receiver=their_index)


class Transport:
    """The initiator's sending keys of a completed handshake."""

    def __init__(self, *, key: bytes, receiver: int) -> None:
        self._aead, self.receiver, self.counter = ChaCha20Poly1305(key), receiver, 0

    def seal(self, packet: bytes) -> bytes:
        """A data message (type 4) carrying an IP packet, padded to 16 bytes as WireGuard pads."""
        padded = packet + bytes(-len(packet) % 16)
        nonce = bytes(4) + struct.pack("<Q", self.counter)
        out = struct.pack("<IIQ", 4, self.receiver, self.counter) + self._aead.encrypt(nonce, padded, b"")
        self.counter += 1
        return out


def initiation(initiator_private: bytes, responder_public: bytes, *, stamp: bytes | None = None,
               sender_index: int | None = None) -> bytes:
    """A handshake initiation from the holder of `initiator_private` to the interface with `responder_public`."""
    return Handshake(initiator_private, responder_public, stamp=stamp, sender_index=sender_index).message


def mac1_only(responder_public: bytes) -> bytes:
    """Random contents with a correct mac1: gets past the cheap check, costs the responder one X25519."""
    return with_mac1(b"\x01\x00\x00\x00" + os.urandom(112) + bytes(32), responder_public)
