"""gatewayctl: the operator's CLI over gatewayd's local control socket.

  gatewayctl status                      the gateway: sessions by state, enforcement, event delivery
  gatewayctl sessions [--member M] [--state S]
  gatewayctl session PEER_KEY
  gatewayctl disconnect MEMBER --reason TEXT [--idempotency-key K]
  gatewayctl policy TEAM
  gatewayctl events [--follow] [--after CURSOR] [--type PREFIX]

--json prints machine-readable output. Exit status: 0 ok, 1 the daemon refused (message on stderr),
2 gatewayd could not be reached.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from gatewayd.v1 import control_pb2, control_pb2_grpc, types_pb2

DEFAULT_SOCKET = Path("/run/gatewayd/control.sock")
STATES = {"authorized": types_pb2.PEER_STATE_AUTHORIZED, "quarantined": types_pb2.PEER_STATE_QUARANTINED,
          "locked": types_pb2.PEER_STATE_LOCKED}


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _ago(ts: Any, now: float) -> str:
    if not ts.seconds and not ts.nanos:
        return "never"
    seconds = now - ts.ToNanoseconds() / 1e9
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _dict(msg: Any) -> dict[str, Any]:
    data: dict[str, Any] = MessageToDict(msg, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    return data


class Ctl:
    def __init__(self, stub: control_pb2_grpc.ControlServiceStub, as_json: bool) -> None:
        self.stub, self.as_json = stub, as_json

    def out(self, data: Any, text: str) -> None:
        print(json.dumps(data, indent=2) if self.as_json else text)

    def status(self, args: argparse.Namespace) -> None:
        s = self.stub.GetStatus(control_pb2.GetStatusRequest(), timeout=10)
        now = time.time()
        text = "\n".join([
            f"gateway      {s.gateway_id} (gatewayd {s.version}), up since {_ago(s.started_at, now)}",
            f"interface    {s.interface}: {s.peers_configured} peers, last read {_ago(s.last_poll, now)}",
            f"sessions     {s.authorized} authorized, {s.quarantined} quarantined, {s.locked} locked",
            f"enforcement  {s.quarantined_prefixes} prefixes quarantined, "
            f"{'healthy' if s.enforcement_healthy else 'RETRYING a failed kernel change'}",
            f"members      {s.members} in {s.teams} teams with a policy",
            "events       " + (f"broker {'connected' if s.broker_connected else 'DISCONNECTED'}, "
                               f"{s.outbox_unpublished} awaiting PUBACK (oldest {s.outbox_oldest_age_seconds:.0f}s)"
                               if s.broker_configured else "no broker configured (WatchEvents and log only)"),
        ])
        self.out(_dict(s), text)

    def _sessions(self, member: str, state: str | None) -> Iterator[types_pb2.Session]:
        token = ""
        while True:
            page = self.stub.ListSessions(control_pb2.ListSessionsRequest(
                member_id=member, state=STATES[state] if state else types_pb2.PEER_STATE_UNSPECIFIED, page_size=1000,
                page_token=token), timeout=10)
            yield from page.sessions
            token = page.next_page_token
            if not token:
                return

    def sessions(self, args: argparse.Namespace) -> None:
        found = list(self._sessions(args.member or "", args.state))
        now = time.time()
        rows = [[s.member_id or "-", s.peer_public_key[:12] + "…", ", ".join(s.tunnel_ips) or "-",
                 s.endpoint or "-", _name(types_pb2.PeerState, s.state, "PEER_STATE_"),
                 _ago(s.last_handshake, now),
                 ",".join(_name(types_pb2.ProofKind, k, "PROOF_KIND_") for k in s.owes) or "-"]
                for s in found]
        header = ["MEMBER", "PEER", "TUNNEL IPS", "ENDPOINT", "STATE", "LAST HANDSHAKE", "OWES"]
        self.out([_dict(s) for s in found], _table(rows, header) + f"\n{len(found)} sessions")

    def session(self, args: argparse.Namespace) -> None:
        s = self.stub.GetSession(control_pb2.GetSessionRequest(peer_public_key=args.peer), timeout=10)
        data = _dict(s)
        self.out(data, "\n".join(f"{k:16} {v}" for k, v in data.items()))

    def disconnect(self, args: argparse.Namespace) -> None:
        res: control_pb2.DisconnectResponse = self.stub.Disconnect(control_pb2.DisconnectRequest(
            member_id=args.member, reason=args.reason,
            idempotency_key=args.idempotency_key or str(uuid.uuid4())),
            timeout=30)
        if res.cause:
            text = f"nothing to disconnect: {control_pb2.DisconnectCause.Name(res.cause)}"
        else:
            text = f"{args.member}: {res.sessions_cut} sessions cut, {res.peers_quarantined} peers quarantined"
        text += "".join(f"\nwarning: {w}" for w in res.warnings)
        self.out(_dict(res), text)

    def policy(self, args: argparse.Namespace) -> None:
        p = self.stub.GetTeamPolicy(control_pb2.GetTeamPolicyRequest(team_id=args.team), timeout=10)
        data = _dict(p)
        self.out(data, "\n".join(f"{k:26} {v}" for k, v in data.items()))

    def events(self, args: argparse.Namespace) -> None:
        prefixes = tuple(args.type or ())
        # Without --follow the replay ends at the newest event, which the server's filter may hide: filter here.
        request = control_pb2.WatchEventsRequest(after_cursor=args.after, type_prefixes=prefixes if args.follow else [])
        stream = self.stub.WatchEvents(request)
        latest = int(dict(stream.initial_metadata()).get("gatewayd-cursor", "0"))
        if not args.follow and latest <= args.after:
            stream.cancel()
            return
        try:
            for e in stream:
                if not args.follow and e.cursor >= latest and prefixes and not e.type.startswith(prefixes):
                    break
                if prefixes and not e.type.startswith(prefixes):
                    continue
                when = dt.datetime.fromtimestamp(e.time.ToNanoseconds() / 1e9, dt.UTC).strftime("%H:%M:%S.%f")[:-3]
                if self.as_json:
                    print(json.dumps(_dict(e)), flush=True)
                else:
                    print(f"{e.cursor:>7} {when} {e.type:24} {e.subject}  {e.data_json}", flush=True)
                if not args.follow and e.cursor >= latest:
                    break
        finally:
            stream.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatewayctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, help="gatewayd's local control socket")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status")
    p = sub.add_parser("sessions")
    p.add_argument("--member", default="")
    p.add_argument("--state", choices=sorted(STATES))
    p = sub.add_parser("session")
    p.add_argument("peer", help="peer public key (base64)")
    p = sub.add_parser("disconnect")
    p.add_argument("member")
    p.add_argument("--reason", required=True)
    p.add_argument("--idempotency-key", default="")
    p = sub.add_parser("policy")
    p.add_argument("team")
    p = sub.add_parser("events")
    p.add_argument("--follow", action="store_true", help="keep printing new events")
    p.add_argument("--after", type=int, default=0, help="replay events after this cursor first")
    p.add_argument("--type", action="append", help="only types starting with this prefix (repeatable)")
    args = parser.parse_args(argv)
    if not args.socket.exists():
        print(f"gatewayctl: cannot reach gatewayd: {args.socket} does not exist", file=sys.stderr)
        return 2
    with grpc.secure_channel(f"unix:{args.socket}",
                             grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)) as channel:
        ctl = Ctl(control_pb2_grpc.ControlServiceStub(channel), args.json)
        try:
            getattr(ctl, args.command)(args)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                print(f"gatewayctl: cannot reach gatewayd at {args.socket}: {exc.details()}", file=sys.stderr)
                return 2
            if code is grpc.StatusCode.CANCELLED:
                return 0
            print(f"gatewayctl: {code.name}: {exc.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
