"""Signers: a FIDO2 security key through the `fido2` library (PIN and user verification required), and the
software authenticator of gatewayd's tests, which stands in where no key is plugged in."""

from __future__ import annotations

import getpass
import sys
from typing import Any

from gatewayd_client.app import Signed


class Fido2Signer:
    """The first FIDO2 key on USB HID. The gateway's nonce is the WebAuthn challenge; the key must verify the
    user (PIN or biometric): the gateway refuses an assertion without UV."""

    def __init__(self, rp_id: str, origin: str, credential_ids: list[bytes]) -> None:
        self.rp_id, self.origin, self.credential_ids = rp_id, origin, credential_ids

    def sign(self, nonce: bytes) -> Signed:
        from fido2.client import DefaultClientDataCollector, Fido2Client, UserInteraction
        from fido2.hid import CtapHidDevice
        from fido2.webauthn import (
            PublicKeyCredentialDescriptor,
            PublicKeyCredentialRequestOptions,
            PublicKeyCredentialType,
            UserVerificationRequirement,
        )

        class Terminal(UserInteraction):
            def prompt_up(self) -> None:
                print("touch your security key", file=sys.stderr)

            def request_pin(self, permissions: Any, rp_id: str | None) -> str | None:
                return getpass.getpass("security key PIN: ")

            def request_uv(self, permissions: Any, rp_id: str | None) -> bool:
                return True

        device = next(iter(CtapHidDevice.list_devices()), None)
        if device is None:
            raise RuntimeError("no FIDO2 security key found (USB HID)")
        client = Fido2Client(device, DefaultClientDataCollector(self.origin), Terminal())
        allowed = [PublicKeyCredentialDescriptor(type=PublicKeyCredentialType.PUBLIC_KEY, id=c)
                   for c in self.credential_ids] or None
        selection = client.get_assertion(PublicKeyCredentialRequestOptions(
            challenge=nonce, rp_id=self.rp_id, allow_credentials=allowed,
            user_verification=UserVerificationRequirement.REQUIRED))
        response = selection.get_response(0)
        r = response.response
        return Signed(credential_id=bytes(response.raw_id), authenticator_data=bytes(r.authenticator_data),
                      client_data_json=bytes(r.client_data), signature=bytes(r.signature),
                      user_handle=bytes(r.user_handle or b""))


class SoftwareSigner:
    """gatewayd.lab.authenticator's software key (PEM), with its credential id, user handle and counter."""

    def __init__(self, pem: bytes, credential_id: bytes, user_handle: bytes, sign_count: int, rp_id: str,
                 origin: str) -> None:
        from gatewayd.lab.authenticator import SoftAuthenticator

        self.key = SoftAuthenticator.from_pem(pem, credential_id=credential_id, user_handle=user_handle,
                                              sign_count=sign_count, rp_id=rp_id, origin=origin)

    def sign(self, nonce: bytes) -> Signed:
        a = self.key.assert_(nonce)
        return Signed(credential_id=a.credential_id, authenticator_data=a.authenticator_data,
                      client_data_json=a.client_data_json, signature=a.signature, user_handle=a.user_handle)
