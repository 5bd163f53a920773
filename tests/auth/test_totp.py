from __future__ import annotations

import base64
import random

import pyotp
import pytest

from gatewayd.auth import totp
from gatewayd.auth.totp import Algorithm, Outcome, TotpFactor

SEEDS = {
    Algorithm.SHA1: b"12345678901234567890",
    Algorithm.SHA256: b"12345678901234567890123456789012",
    Algorithm.SHA512: b"1234567890" * 6 + b"1234",
}
# RFC 6238 Appendix B: (time, SHA1, SHA256, SHA512)
VECTORS = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]


@pytest.mark.parametrize("row", VECTORS, ids=[str(v[0]) for v in VECTORS])
@pytest.mark.parametrize("alg", list(Algorithm), ids=lambda a: a.value)
def test_rfc6238_appendix_b(row: tuple[int, str, str, str], alg: Algorithm) -> None:
    t, *codes = row
    expected = dict(zip(list(Algorithm), codes, strict=True))[alg]
    factor = TotpFactor(secret=SEEDS[alg], algorithm=alg, digits=8, period=30)
    assert totp.code_at(factor, t // 30) == expected
    verdict = totp.verify(factor, expected, float(t))
    assert verdict.outcome is Outcome.ACCEPTED and verdict.step == t // 30


@pytest.mark.parametrize("alg", list(Algorithm), ids=lambda a: a.value)
@pytest.mark.parametrize("digits", totp.DIGITS)
def test_codes_agree_with_pyotp(alg: Algorithm, digits: int) -> None:
    """The HOTP computed here (one C HMAC per step) against pyotp, the client apps' reference, over random
    secrets of every enrollable length and steps from 0 to past 2^32 (leading zeros, 8-byte counters)."""
    rng = random.Random(6238)
    for _ in range(200):
        secret = rng.randbytes(rng.randint(totp.MIN_SECRET_BYTES, 128))
        step = rng.choice([0, 1, rng.randrange(2**32), rng.randrange(2**32, 2**40)])
        factor = TotpFactor(secret=secret, algorithm=alg, digits=digits, period=30)
        reference = pyotp.HOTP(base64.b32encode(secret).decode(), digits=digits, digest=alg.value)
        assert totp.code_at(factor, step) == reference.at(step)


def test_window_is_one_step_each_side() -> None:
    f = TotpFactor(secret=SEEDS[Algorithm.SHA1], digits=6)
    now = 1_700_000_000.0
    step = int(now) // 30
    for offset, ok in ((-2, False), (-1, True), (0, True), (1, True), (2, False)):
        code = totp.code_at(f, step + offset)
        assert (totp.verify(f, code, now).outcome is Outcome.ACCEPTED) is ok, offset


def test_replay_of_accepted_or_older_step_is_refused() -> None:
    f = TotpFactor(secret=SEEDS[Algorithm.SHA1], digits=6)
    now = 1_700_000_000.0
    step = int(now) // 30
    used = TotpFactor(secret=f.secret, digits=6, last_step=step)
    assert totp.verify(used, totp.code_at(f, step), now).outcome is Outcome.REPLAYED
    assert totp.verify(used, totp.code_at(f, step - 1), now).outcome is Outcome.REPLAYED
    assert totp.verify(used, totp.code_at(f, step + 1), now).outcome is Outcome.ACCEPTED


@pytest.mark.parametrize("code", ["12345", "123456789", "12 3456", "١٢٣٤٥٦", "12345a", " 123456", "123456\n",
                                  "\uff11\uff12\uff13\uff14\uff15\uff16"])
def test_malformed_codes_are_not_well_formed(code: str) -> None:
    assert not totp.well_formed(code, 6)
    with pytest.raises(ValueError, match="malformed"):
        totp.verify(TotpFactor(secret=SEEDS[Algorithm.SHA1], digits=6), code, 0.0)


def test_enrolled_length_is_enforced() -> None:
    assert totp.well_formed("12345678", 8) and not totp.well_formed("123456", 8)


@pytest.mark.parametrize(("secret", "digits", "period", "field"), [
    (b"x" * 15, 6, 30, "totp.secret"),
    (b"x" * 16, 7, 30, "totp.digits"),
    (b"x" * 16, 6, 10, "totp.period_seconds"),
])
def test_enrollment_validation(secret: bytes, digits: int, period: int, field: str) -> None:
    with pytest.raises(totp.EnrollmentError) as info:
        totp.validate_enrollment(secret, Algorithm.SHA1, digits, period)
    assert info.value.field == field


def test_secret_never_in_repr() -> None:
    f = TotpFactor(secret=b"supersecretvalue1234")
    assert "supersecret" not in repr(f) and "supersecret" not in str(f)
