"""PIN & biometrics: a WebAuthn authentication assertion by a device-bound key, with user verification.

The `webauthn` package checks what WebAuthn defines for an assertion (type "webauthn.get", the challenge, an
accepted origin, the rpIdHash, UP and — required here — UV, consistent backup flags, the signature over
authenticatorData || SHA-256(clientDataJSON)). What it leaves to the relying party is done here and in the
driver: the credential must belong to the member, the user handle must match, each challenge is single-use
and bound to one peer and member, and sign counts are stored; a count that does not grow is reported as a
possible cloned authenticator.
"""

from __future__ import annotations

import base64
import enum
import json
import struct
from dataclasses import dataclass

# `webauthn` is imported where it is used: the package imports all of itself (registration formats, pyOpenSSL),
# ~0.12 s of every start before READY. The daemon loads it right after READY (preload).

ALGORITHMS = {-7: "ES256", -8: "EdDSA", -257: "RS256"}
"""The COSE algorithms accepted (IANA COSE Algorithms registry: ECDSA w/ SHA-256, EdDSA, RSASSA-PKCS1-v1_5
w/ SHA-256)."""
NONCE_BYTES = 32


def preload() -> None:
    """Import what verification needs (so that the first device proof or enrollment does not wait for it)."""
    import webauthn  # noqa: F401


@dataclass(frozen=True, kw_only=True)
class DevicePolicy:
    rp_id: str = "gateway.example.net"
    """WebAuthn relying-party id the client apps' device credentials are scoped to."""
    origins: tuple[str, ...] = ("https://gateway.example.net",)
    """Origins accepted in the assertions' client data."""
    challenge_ttl: float = 120.0
    """Seconds a device challenge (nonce) stays valid; at most 120."""


class KeyError_(ValueError):
    """A device credential's public key is unusable."""


def check_public_key(cose: bytes) -> str:
    """The algorithm name of a COSE_Key we accept; raises KeyError_ for malformed or unsupported keys."""
    from webauthn.helpers import decode_credential_public_key, decoded_public_key_to_cryptography
    try:
        decoded = decode_credential_public_key(cose)
        decoded_public_key_to_cryptography(decoded)
    except Exception as exc:  # the decoders raise several types for garbage input
        raise KeyError_(f"not a valid COSE_Key: {exc}") from None
    alg = ALGORITHMS.get(decoded.alg)
    if alg is None:
        raise KeyError_(f"unsupported algorithm {decoded.alg}; accepted: ES256, EdDSA, RS256")
    return alg


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def from_b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, kw_only=True)
class Assertion:
    credential_id: bytes
    """Credential id."""
    authenticator_data: bytes
    """Authenticator data."""
    client_data_json: bytes
    """Client data JSON as signed."""
    signature: bytes
    """Signature."""
    user_handle: bytes
    """User handle, may be empty."""


def challenge_of(assertion: Assertion) -> bytes | None:
    """The challenge the client data claims to answer, or None when the client data is unreadable."""
    try:
        data = json.loads(assertion.client_data_json)
        return from_b64url(str(data["challenge"]))
    except (ValueError, KeyError, TypeError):
        return None


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    INVALID = "invalid_assertion"
    CLONED = "sign_count_not_increasing"


@dataclass(frozen=True, kw_only=True)
class Verdict:
    outcome: Outcome
    """Outcome."""
    detail: str = ""
    """Why, when refused."""
    new_sign_count: int = 0
    """The authenticator's sign count, when accepted."""


def verify(assertion: Assertion, *, nonce: bytes, rp_id: str, origins: list[str], cose_public_key: bytes,
           stored_sign_count: int) -> Verdict:
    """Verify an assertion against an issued nonce and a stored credential (UV required).

    The signature is checked before the sign count (WebAuthn L2 7.2, step 20 before 21): a forged assertion is
    invalid, never a "possible clone", so nobody holding a member's tunnel can raise clone alarms at will."""
    from webauthn import verify_authentication_response
    from webauthn.helpers.exceptions import WebAuthnException
    from webauthn.helpers.structs import AuthenticationCredential, AuthenticatorAssertionResponse
    credential = AuthenticationCredential(
        id=b64url(assertion.credential_id), raw_id=assertion.credential_id,
        response=AuthenticatorAssertionResponse(
            client_data_json=assertion.client_data_json, authenticator_data=assertion.authenticator_data,
            signature=assertion.signature, user_handle=assertion.user_handle or None))
    try:
        verified = verify_authentication_response(
            credential=credential, expected_challenge=nonce, expected_rp_id=rp_id, expected_origin=origins,
            credential_public_key=cose_public_key, credential_current_sign_count=0,  # compared below, after it
            require_user_verification=True)
    except WebAuthnException as exc:
        return Verdict(outcome=Outcome.INVALID, detail=str(exc))
    except (ValueError, TypeError, struct.error) as exc:
        return Verdict(outcome=Outcome.INVALID, detail=f"malformed assertion: {exc}")
    if not verified.user_verified:
        return Verdict(outcome=Outcome.INVALID, detail="user verification is required")
    count = verified.new_sign_count
    if (count > 0 or stored_sign_count > 0) and count <= stored_sign_count:
        return Verdict(outcome=Outcome.CLONED,
                       detail=f"sign count {count} does not exceed the stored {stored_sign_count}")
    return Verdict(outcome=Outcome.ACCEPTED, new_sign_count=verified.new_sign_count)
