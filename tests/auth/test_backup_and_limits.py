from __future__ import annotations

import hashlib
import os

import pytest

from gatewayd.auth import backup, limits
from gatewayd.auth.backup import KdfParams


def params() -> KdfParams:
    return KdfParams(salt=os.urandom(16), n=2**10, r=8, p=1, dklen=32)


def test_derive_matches_control_plane_hashing_after_normalisation() -> None:
    p = params()
    control_plane = hashlib.scrypt(b"ABCD1234EF", salt=p.salt, n=p.n, r=p.r, p=p.p, dklen=32)
    assert backup.derive("abcd-1234 ef", p) == control_plane
    codes = [(0, os.urandom(32)), (1, control_plane), (2, os.urandom(32))]
    assert backup.match(backup.derive("ABCD-1234-EF", p), codes) == 1
    assert backup.match(backup.derive("ABCD-1234-EG", p), codes) is None


@pytest.mark.parametrize("code", ["abc", "abc_def12", "\uff21\uff22\uff23\uff24\uff25\uff2612", "a" * 65, "------"])
def test_malformed_backup_codes(code: str) -> None:
    assert not backup.well_formed(code)


@pytest.mark.parametrize(("change", "field"), [
    ({"salt": b"short"}, "backup_codes.salt"),
    ({"n": 1000}, "backup_codes.n"),
    ({"n": 2**20}, "backup_codes.n"),
    ({"r": 0}, "backup_codes.r"),
    ({"p": 9}, "backup_codes.p"),
])
def test_set_validation(change: dict[str, object], field: str) -> None:
    base = {"salt": os.urandom(16), "n": 2**10, "r": 8, "p": 1, "dklen": 32}
    base.update(change)
    with pytest.raises(backup.BackupSetError) as info:
        backup.validate_set(KdfParams(**base), [os.urandom(32)])  # type: ignore[arg-type]
    assert info.value.field == field


def test_set_validation_of_hashes() -> None:
    h = os.urandom(32)
    for hashes in ([], [h, h], [h, os.urandom(16)], [os.urandom(32)] * 0 + [os.urandom(8)]):
        with pytest.raises(backup.BackupSetError):
            backup.validate_set(params(), hashes)


def test_attempt_limit_locks_after_max_and_time_never_clears() -> None:
    policy = limits.AttemptPolicy(max_failures=10, free_failures=3, base_delay=1.0, max_delay=60.0)
    state = limits.RESET
    now = 0.0
    for i in range(10):
        assert limits.gate(policy, state, now) is limits.Gate.OPEN, i
        state = limits.after_failure(policy, state, now)
        now += 1000.0
    assert state.locked and limits.attempts_left(policy, state) == 0
    assert limits.gate(policy, state, now + 10**9) is limits.Gate.LOCKED


def test_delays_grow_after_free_failures() -> None:
    policy = limits.AttemptPolicy(max_failures=10, free_failures=3, base_delay=1.0, max_delay=8.0)
    state = limits.RESET
    delays = []
    for _ in range(9):
        state = limits.after_failure(policy, state, 100.0)
        earliest = limits.retry_not_before(policy, state)
        delays.append(None if earliest is None else earliest - 100.0)
    assert delays == [None, None, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert limits.gate(policy, state, 107.9) is limits.Gate.TOO_EARLY
    assert limits.gate(policy, state, 108.0) is limits.Gate.OPEN
