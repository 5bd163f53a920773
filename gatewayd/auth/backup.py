"""One-time backup codes, stored only as scrypt-derived keys pushed by the control plane."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from gatewayd.auth.fields import FieldError

_ALLOWED = re.compile(r"[A-Za-z0-9 \-]{6,64}\Z", re.ASCII)

# Bounds that keep one KDF evaluation affordable on a gateway (memory = 128 * n * r bytes <= 32 MiB).
MIN_N, MAX_N = 2**10, 2**17
MAX_R, MAX_P = 16, 4
MAX_MEMORY = 32 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class KdfParams:
    salt: bytes
    """Salt shared by all codes of a set."""
    n: int
    """scrypt cost."""
    r: int
    """scrypt block size."""
    p: int
    """scrypt parallelism."""
    dklen: int
    """Derived key length."""


class BackupSetError(FieldError):
    pass


def validate_set(params: KdfParams, hashes: list[bytes]) -> None:
    if not 16 <= len(params.salt) <= 64:
        raise BackupSetError("backup_codes.salt", "must be 16 to 64 bytes")
    if not (MIN_N <= params.n <= MAX_N) or params.n & (params.n - 1):
        raise BackupSetError("backup_codes.n", f"must be a power of two from {MIN_N} to {MAX_N}")
    if not 1 <= params.r <= MAX_R:
        raise BackupSetError("backup_codes.r", f"must be 1 to {MAX_R}")
    if not 1 <= params.p <= MAX_P:
        raise BackupSetError("backup_codes.p", f"must be 1 to {MAX_P}")
    if 128 * params.n * params.r > MAX_MEMORY:
        raise BackupSetError("backup_codes.n", "n * r needs more than 32 MiB")
    if not 1 <= len(hashes) <= 32:
        raise BackupSetError("backup_codes.hashes", "must hold 1 to 32 hashes")
    if len({len(h) for h in hashes}) != 1 or not 16 <= len(hashes[0]) <= 64:
        raise BackupSetError("backup_codes.hashes", "all hashes must have one length of 16 to 64 bytes")
    if len(set(hashes)) != len(hashes):
        raise BackupSetError("backup_codes.hashes", "hashes must be distinct")


def well_formed(code: str) -> bool:
    return _ALLOWED.match(code) is not None and len(normalize(code)) >= 6


def normalize(code: str) -> bytes:
    """The bytes the control plane hashed: ASCII letters upper-cased, '-' and ' ' removed."""
    return code.replace("-", "").replace(" ", "").upper().encode("ascii")


def derive(code: str, params: KdfParams) -> bytes:
    """One KDF evaluation; run it off the event loop."""
    return hashlib.scrypt(normalize(code), salt=params.salt, n=params.n, r=params.r, p=params.p,
                          dklen=params.dklen, maxmem=MAX_MEMORY + 1024 * 1024)


def match(derived: bytes, unused: list[tuple[int, bytes]]) -> int | None:
    """Index of the unused code whose hash equals `derived`; compares against every one (no early exit)."""
    found: int | None = None
    for index, stored in unused:
        if hmac.compare_digest(derived, stored):
            found = index
    return found
