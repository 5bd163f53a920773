"""Device assertions: the verifier with a software authenticator (positive and negative) and recorded
assertions from real platform authenticators."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gatewayd.auth import device
from gatewayd.auth.device import Assertion, Outcome, from_b64url
from gatewayd.lab.authenticator import UP, UV, SoftAuthenticator

RP, ORIGIN = "gateway.example.net", "https://gateway.example.net"
RECORDED = json.loads((Path(__file__).parent / "data" / "recorded_assertions.json").read_text())["assertions"]


def check(auth: SoftAuthenticator, a: Assertion, nonce: bytes, stored: int = 0) -> device.Verdict:
    return device.verify(a, nonce=nonce, rp_id=RP, origins=[ORIGIN], cose_public_key=auth.cose_public_key,
                         stored_sign_count=stored)


@pytest.mark.parametrize("kind", ["es256", "eddsa"])
def test_software_authenticator_assertion_verifies(kind: str) -> None:
    auth = SoftAuthenticator(kind=kind)
    nonce = os.urandom(32)
    verdict = check(auth, auth.assert_(nonce), nonce)
    assert verdict.outcome is Outcome.ACCEPTED and verdict.new_sign_count == 1
    assert device.check_public_key(auth.cose_public_key) == {"es256": "ES256", "eddsa": "EdDSA"}[kind]


@pytest.mark.parametrize(("case", "make"), [
    ("uv off", lambda a, n: a.assert_(n, flags=UP)),
    ("up off", lambda a, n: a.assert_(n, flags=UV)),
    ("wrong rp id", lambda a, n: a.assert_(n, rp_id="evil.example.net")),
    ("wrong origin", lambda a, n: a.assert_(n, origin="https://evil.example.net")),
    ("wrong type", lambda a, n: a.assert_(n, type_="webauthn.create")),
    ("other challenge", lambda a, n: a.assert_(os.urandom(32))),
    ("flipped signature byte", lambda a, n: replace(a.assert_(n), signature=_flip(a.assert_(n).signature))),
    ("inconsistent backup flags", lambda a, n: a.assert_(n, flags=UP | UV | 0x10)),
])
def test_refusals(case: str, make: Any) -> None:
    auth = SoftAuthenticator()
    nonce = os.urandom(32)
    verdict = check(auth, make(auth, nonce), nonce)
    assert verdict.outcome is Outcome.INVALID, case


def _flip(signature: bytes) -> bytes:
    return signature[:-1] + bytes([signature[-1] ^ 0x01])


def test_sign_count_must_grow() -> None:
    auth = SoftAuthenticator()
    nonce = os.urandom(32)
    assert check(auth, auth.assert_(nonce, count=5), nonce, stored=5).outcome is Outcome.CLONED
    assert check(auth, auth.assert_(nonce, count=4), nonce, stored=5).outcome is Outcome.CLONED
    assert check(auth, auth.assert_(nonce, count=6), nonce, stored=5).outcome is Outcome.ACCEPTED
    # Authenticators without a counter report 0, and stay acceptable while the stored count is 0.
    assert check(auth, auth.assert_(nonce, count=0), nonce, stored=0).outcome is Outcome.ACCEPTED


@pytest.mark.parametrize("cose", [b"", b"\xa0", os.urandom(40)])
def test_malformed_public_keys_are_refused(cose: bytes) -> None:
    with pytest.raises(device.KeyError_):
        device.check_public_key(cose)


def recorded(entry: dict[str, Any]) -> tuple[Assertion, bytes, bytes]:
    a = Assertion(credential_id=from_b64url(entry["credential_id"]),
                  authenticator_data=from_b64url(entry["authenticator_data"]),
                  client_data_json=from_b64url(entry["client_data_json"]),
                  signature=from_b64url(entry["signature"]), user_handle=from_b64url(entry["user_handle"]))
    return a, from_b64url(entry["challenge"]), from_b64url(entry["cose_public_key"])


@pytest.mark.parametrize("entry", RECORDED, ids=[e["name"] for e in RECORDED])
def test_recorded_platform_assertions_verify_and_fail_without_uv(entry: dict[str, Any]) -> None:
    a, nonce, cose = recorded(entry)
    device.check_public_key(cose)
    verdict = device.verify(a, nonce=nonce, rp_id=entry["rp_id"], origins=[entry["origin"]], cose_public_key=cose,
                            stored_sign_count=entry["stored_sign_count"])
    assert verdict.outcome is Outcome.ACCEPTED and verdict.new_sign_count == entry["new_sign_count"]
    data = bytearray(a.authenticator_data)
    data[32] &= ~UV & 0xFF
    cleared = device.verify(replace(a, authenticator_data=bytes(data)), nonce=nonce, rp_id=entry["rp_id"],
                            origins=[entry["origin"]], cose_public_key=cose,
                            stored_sign_count=entry["stored_sign_count"])
    assert cleared.outcome is Outcome.INVALID and "verif" in cleared.detail.lower()
