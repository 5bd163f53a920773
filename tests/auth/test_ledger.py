"""The fleet ledger's decisions (pure): what each proof compares and writes, so that it is decided once."""

from __future__ import annotations

from typing import Any

import pytest

from gatewayd.auth import ledger, limits
from gatewayd.auth.ledger import Claim, Lifetime, Outcome

POLICY = limits.AttemptPolicy(max_failures=10, free_failures=3, base_delay=1.0, max_delay=60.0)
M = "alice/../x%2F"  # an id with the characters that would break a key's structure


def entries(**values: tuple[dict[str, Any], int]) -> dict[str, tuple[dict[str, Any], int]]:
    return dict(values.items())


def totp(step: int, **kw: Any) -> Claim:
    return Claim(member_id=M, factor="totp", verified=True, totp_id="f1", step=step, **kw)


def test_member_ids_cannot_escape_their_prefix() -> None:
    assert ledger.attempts_key(M) == "w/m/alice%2F..%2Fx%252F/attempts"
    assert ledger.totp_key(M, "f") == "s/alice%2F..%2Fx%252F/totp/f"
    assert ledger.attempts_key("a") != ledger.attempts_key("a/attempts")
    assert ledger.demand_key(ledger.Target.MEMBER, "a/b") == "w/d/member/a%2Fb"
    # Watched: what other gateways act on; spends are not sent to every gateway at every proof.
    assert ledger.attempts_key(M).startswith(ledger.WATCHED) and ledger.reset_key(M, "f").startswith("w/")
    assert not ledger.backup_key(M, "s").startswith(ledger.WATCHED)


def test_a_fresh_totp_step_is_spent_and_every_read_is_compared() -> None:
    d = ledger.decide(totp(100), {}, POLICY, 1000.0, "gw-a")
    assert d.outcome is Outcome.ACCEPTED
    assert d.compares == {ledger.attempts_key(M): 0, ledger.totp_key(M, "f1"): 0}
    assert d.writes == {ledger.totp_key(M, "f1"): ({"step": 100, "by": "gw-a"}, Lifetime.WINDOW)}


@pytest.mark.parametrize("spent", [100, 101])
def test_a_step_at_or_below_the_fleets_mark_is_a_replay_and_a_failure(spent: int) -> None:
    d = ledger.decide(totp(100), {ledger.totp_key(M, "f1"): ({"step": spent}, 7)}, POLICY, 1000.0, "gw-b")
    assert d.outcome is Outcome.REPLAYED and d.attempts.failures == 1
    assert ledger.totp_key(M, "f1") not in d.writes
    assert d.writes[ledger.attempts_key(M)][0] == {"failures": 1, "last": 1000.0, "locked": False, "by": "gw-b"}
    assert d.compares[ledger.totp_key(M, "f1")] == 7


def test_locked_and_too_early_write_nothing_but_still_compare() -> None:
    locked = {ledger.attempts_key(M): ({"failures": 10, "last": 5.0, "locked": True}, 9)}
    d = ledger.decide(totp(100), locked, POLICY, 1000.0, "g")
    assert d.outcome is Outcome.LOCKED and not d.writes and d.compares == {ledger.attempts_key(M): 9}
    recent = {ledger.attempts_key(M): ({"failures": 5, "last": 999.0, "locked": False}, 4)}
    d = ledger.decide(totp(100), recent, POLICY, 1000.0, "g")
    assert d.outcome is Outcome.TOO_EARLY and not d.writes


def test_the_tenth_failure_anywhere_locks() -> None:
    nine = {ledger.attempts_key(M): ({"failures": 9, "last": 0.0, "locked": False}, 3)}
    d = ledger.decide(Claim(member_id=M, factor="totp", verified=False, reason="wrong_code"), nine, POLICY, 1e6, "g")
    assert d.outcome is Outcome.FAILED and d.attempts.locked and d.attempts.failures == 10


def test_success_clears_the_count_by_deleting_it() -> None:
    two = {ledger.attempts_key(M): ({"failures": 2, "last": 0.0, "locked": False}, 3)}
    d = ledger.decide(totp(5), two, POLICY, 1e6, "g")
    assert d.outcome is Outcome.ACCEPTED and d.writes[ledger.attempts_key(M)] == (None, Lifetime.KEEP)


def test_backup_codes_are_spent_once_per_set() -> None:
    claim = Claim(member_id=M, factor="backup_code", verified=True, backup_set="s1", backup_index=2)
    d = ledger.decide(claim, {}, POLICY, 1.0, "g")
    assert d.outcome is Outcome.ACCEPTED
    assert d.writes[ledger.backup_key(M, "s1")] == ({"spent": [2], "by": "g"}, Lifetime.KEEP)
    spent = {ledger.backup_key(M, "s1"): ({"spent": [0, 2]}, 11)}
    assert ledger.decide(claim, spent, POLICY, 1.0, "g").outcome is Outcome.USED
    other = {ledger.backup_key(M, "s1"): ({"spent": [0]}, 11)}
    d = ledger.decide(claim, other, POLICY, 1.0, "g")
    assert d.outcome is Outcome.ACCEPTED and d.writes[ledger.backup_key(M, "s1")][0] == {"spent": [0, 2], "by": "g"}
    assert d.compares[ledger.backup_key(M, "s1")] == 11


def test_confirming_a_reset_records_it_and_supersedes_the_old_factor_elsewhere() -> None:
    confirm = Claim(member_id=M, factor="totp", verified=True, totp_id="new", step=50, confirms_reset=True)
    d = ledger.decide(confirm, {}, POLICY, 10.0, "gw-a")
    assert d.writes[ledger.reset_key(M, "new")] == ({"step": 50, "at": 10.0, "by": "gw-a"}, Lifetime.RETAIN)
    old = Claim(member_id=M, factor="totp", verified=True, totp_id="old", step=51, pending_id="new")
    d = ledger.decide(old, {ledger.reset_key(M, "new"): ({"step": 50}, 4)}, POLICY, 10.0, "gw-b")
    assert d.outcome is Outcome.SUPERSEDED and d.confirmed_step == 50 and d.attempts.failures == 1
    assert ledger.totp_key(M, "old") not in d.writes
    # Before any confirmation the old factor still works (an MFA reset keeps it until then).
    d = ledger.decide(old, {}, POLICY, 10.0, "gw-b")
    assert d.outcome is Outcome.ACCEPTED and d.compares[ledger.reset_key(M, "new")] == 0


def test_ids_are_digests_not_secrets() -> None:
    secret = b"S" * 20
    fid = ledger.totp_factor_id(secret)
    assert secret.hex() not in fid and len(fid) == 32 and fid == ledger.totp_factor_id(secret)
    assert ledger.totp_factor_id(b"T" * 20) != fid
