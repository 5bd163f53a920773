"""gatewayd-client: the command line."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

import grpc

from gatewayd.v1 import challenge_pb2_grpc
from gatewayd_client.app import ClientApp, Signer


class Terminal:
    """Codes from the terminal (not echoed), or one per line from stdin when it is not a terminal."""

    def code(self, prompt: str) -> str | None:
        try:
            if sys.stdin.isatty():
                return getpass.getpass(prompt)
            print(prompt, file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            return line.strip() or None
        except (EOFError, KeyboardInterrupt):
            return None

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gatewayd-client", description=__doc__)
    p.add_argument("--gateway", required=True, help="the gateway's challenge endpoint over the tunnel, host:port")
    p.add_argument("--once", action="store_true", help="exit 0 as soon as the peer is authorized")
    p.add_argument("--rp-id", default="gateway.example.net", help="WebAuthn relying-party id of device proofs")
    p.add_argument("--origin", default="https://gateway.example.net", help="WebAuthn origin of device proofs")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--fido2", action="store_true", help="sign device challenges with a FIDO2 security key")
    key.add_argument("--software-key", type=Path, help="PEM of a software authenticator (tests, labs)")
    p.add_argument("--credential-id", action="append", default=[], help="hex; with --software-key: its id")
    p.add_argument("--user-handle", default="", help="hex (software key)")
    p.add_argument("--sign-count", type=int, default=0, help="the software key's counter before this run")
    args = p.parse_args(argv)
    signer: Signer | None = None
    if args.fido2:
        from gatewayd_client.fido import Fido2Signer
        signer = Fido2Signer(args.rp_id, args.origin, [bytes.fromhex(c) for c in args.credential_id])
    elif args.software_key:
        from gatewayd_client.fido import SoftwareSigner
        if len(args.credential_id) != 1:
            p.error("--software-key needs one --credential-id")
        signer = SoftwareSigner(args.software_key.read_bytes(), bytes.fromhex(args.credential_id[0]),
                                bytes.fromhex(args.user_handle), args.sign_count, args.rp_id, args.origin)
    with grpc.insecure_channel(args.gateway) as channel:
        # The challenge API is reached only through the tunnel: WireGuard already authenticates and encrypts it,
        # and the gateway identifies this peer by its tunnel address.
        app = ClientApp(challenge_pb2_grpc.ChallengeServiceStub(channel), Terminal(), signer)
        try:
            return app.run(once=args.once)
        except KeyboardInterrupt:
            return 130
