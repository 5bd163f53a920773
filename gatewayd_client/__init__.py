"""gatewayd-client: the reference client app for gatewayd's challenge API (README, "Client apps").

A Linux user runs it beside wg-quick. It watches the peer's status at the gateway over the tunnel and, when a
proof is owed, asks for a TOTP code or a backup code in the terminal, or signs the gateway's device challenge
with a FIDO2 security key (PIN and user verification required).
"""
