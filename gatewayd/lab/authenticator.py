"""A software authenticator that makes real WebAuthn assertions (P-256/ES256 or Ed25519/EdDSA keys), for the
tests and the lab's client app. Its flags, counter, rp id, origin and type can be set wrong on purpose."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from gatewayd.auth.device import Assertion, b64url

UP, UV = 0x01, 0x04


@dataclass
class SoftAuthenticator:
    kind: str = "es256"
    """"es256" or "eddsa"."""
    rp_id: str = "gateway.example.net"
    """The relying-party id it is registered for."""
    origin: str = "https://gateway.example.net"
    """The origin its client reports."""
    sign_count: int = 0
    """Counter; grows by one per assertion (0 stays 0 when counting is off)."""
    counting: bool = True
    """Whether it keeps a signature counter."""
    credential_id: bytes = field(default_factory=lambda: os.urandom(32))
    """Credential id."""
    user_handle: bytes = field(default_factory=lambda: os.urandom(16))
    """User handle."""

    def __post_init__(self) -> None:
        self._key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = (
            ec.generate_private_key(ec.SECP256R1()) if self.kind == "es256" else ed25519.Ed25519PrivateKey.generate())

    @property
    def cose_public_key(self) -> bytes:
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            numbers = self._key.public_key().public_numbers()
            return cbor2.dumps({1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"),
                                -3: numbers.y.to_bytes(32, "big")})
        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cbor2.dumps({1: 1, 3: -8, -1: 6, -2: raw})

    def private_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    @classmethod
    def from_pem(cls, pem: bytes, **fields: object) -> SoftAuthenticator:
        auth = cls(**fields)  # type: ignore[arg-type]
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey))
        auth._key = key
        auth.kind = "es256" if isinstance(key, ec.EllipticCurvePrivateKey) else "eddsa"
        return auth

    def assert_(self, challenge: bytes, *, flags: int = UP | UV, rp_id: str | None = None,
                origin: str | None = None, type_: str = "webauthn.get", count: int | None = None) -> Assertion:
        """Sign an assertion for `challenge` (as navigator.credentials.get would return it)."""
        if count is None:
            if self.counting:
                self.sign_count += 1
            count = self.sign_count
        auth_data = hashlib.sha256((rp_id or self.rp_id).encode()).digest() + bytes([flags]) + struct.pack(">I", count)
        client_data = json.dumps({"type": type_, "challenge": b64url(challenge), "origin": origin or self.origin,
                                  "crossOrigin": False}).encode()
        signed = auth_data + hashlib.sha256(client_data).digest()
        if isinstance(self._key, ec.EllipticCurvePrivateKey):
            signature = self._key.sign(signed, ec.ECDSA(hashes.SHA256()))
        else:
            signature = self._key.sign(signed)
        return Assertion(credential_id=self.credential_id, authenticator_data=auth_data,
                         client_data_json=client_data, signature=signature, user_handle=self.user_handle)
