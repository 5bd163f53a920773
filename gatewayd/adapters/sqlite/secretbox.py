"""AES-256-GCM for factor secrets at rest; the associated data binds a ciphertext to its row."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gatewayd.errors import StartupError


class SecretBox:
    """Seals and opens factor secrets; the key never leaves this object."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("secrets key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise StartupError(f"{path}: cannot read the secrets key: {exc.strerror or exc}") from None
        text = raw.strip()
        if len(raw) == 32:
            return cls(raw)
        try:
            return cls(bytes.fromhex(text.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            raise StartupError(f"{path}: secrets key must be 32 raw bytes or 64 hex digits") from None

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        nonce = os.urandom(12)
        return nonce, self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        return self._aead.decrypt(nonce, ciphertext, aad)
