"""RFC 6238 TOTP with replay protection: a step at or below the last accepted one is refused."""

from __future__ import annotations

import enum
import hmac
import re
from dataclasses import dataclass

from gatewayd.auth.fields import FieldError

MIN_SECRET_BYTES = 16  # 128 bits, RFC 4226 section 4 R6
_CODE = re.compile(r"[0-9]{6,8}\Z", re.ASCII)


class Algorithm(enum.Enum):
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA512 = "sha512"


@dataclass(frozen=True, kw_only=True)
class TotpFactor:
    secret: bytes = b""
    """Shared secret (raw bytes). Never logged: excluded from repr."""
    algorithm: Algorithm = Algorithm.SHA1
    """HMAC algorithm."""
    digits: int = 6
    """6 or 8."""
    period: int = 30
    """Seconds per step."""
    last_step: int = -1
    """The last accepted time step; -1 = none."""

    def __repr__(self) -> str:
        return (f"TotpFactor(algorithm={self.algorithm.value}, digits={self.digits}, period={self.period}, "
                f"last_step={self.last_step}, secret=<{len(self.secret)} bytes>)")


class EnrollmentError(FieldError):
    pass


DIGITS = (6, 8)
"""The code lengths an enrollment may choose."""


def validate_enrollment(secret: bytes, algorithm: Algorithm, digits: int, period: int) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise EnrollmentError("totp.secret", f"must be at least {MIN_SECRET_BYTES} bytes (128 bits)")
    if len(secret) > 128:
        raise EnrollmentError("totp.secret", "must be at most 128 bytes")
    if digits not in DIGITS:
        raise EnrollmentError("totp.digits", "must be 6 or 8")
    if not 15 <= period <= 300:
        raise EnrollmentError("totp.period_seconds", "must be between 15 and 300")


def well_formed(code: str, digits: int) -> bool:
    """ASCII digits only, exactly the enrolled length (no spaces, no Unicode digits)."""
    return len(code) == digits and _CODE.match(code) is not None


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    REPLAYED = "replayed"
    WRONG = "wrong_code"


@dataclass(frozen=True, kw_only=True)
class Verdict:
    outcome: Outcome
    """What the code was."""
    step: int | None = None
    """The matched step (for ACCEPTED and REPLAYED)."""


def _hotp(factor: TotpFactor, step: int) -> bytes:
    """RFC 4226 HOTP of the step (RFC 6238's counter) as ASCII digits: one HMAC in C (hmac.digest), the dynamic
    truncation, the low `digits` decimal digits."""
    mac = hmac.digest(factor.secret, step.to_bytes(8, "big"), factor.algorithm.value)
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10 ** factor.digits).zfill(factor.digits).encode()


def code_at(factor: TotpFactor, step: int) -> str:
    return _hotp(factor, step).decode()


def verify(factor: TotpFactor, code: str, now: float) -> Verdict:
    """Check `code` against the current step and one on each side, in constant time per candidate.

    Every candidate is compared (no early exit) so that timing does not tell which step matched.
    """
    if not well_formed(code, factor.digits):
        raise ValueError("malformed code must be refused at the edge")
    current = int(now) // factor.period
    matched: int | None = None
    typed = code.encode()
    for step in (current - 1, current, current + 1):
        if step < 0:
            continue
        if hmac.compare_digest(_hotp(factor, step), typed) and (matched is None or step > matched):
            matched = step
    if matched is None:
        return Verdict(outcome=Outcome.WRONG)
    if matched <= factor.last_step:
        return Verdict(outcome=Outcome.REPLAYED, step=matched)
    return Verdict(outcome=Outcome.ACCEPTED, step=matched)
