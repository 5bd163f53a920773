"""Benchmark: handshake initiations decided as they arrive, on a wireguard-go gateway in a namespace.

N peers (default 10,000) are configured on the gateway; half belong to a team with "TOTP Prior Connection"
(held in quarantine since they were configured: they owe a proof), half to a team without. Emulated clients
(gatewayd.lab.noise: real Noise_IKpsk2 initiations, completed with the gateway's real responses) re-handshake
every peer within N / rate seconds (default 1,000 per second: 10 s), each sending one data packet to a server
behind the gateway the moment its handshake completes.

Measured, with handshake detection on and then off (the baseline, same run, same machine):
- handshake round trip at the client: initiation sent -> WireGuard's response received (with detection on, the
  initiation waits in the queue for its verdict: decided, enforced and committed first); p50/p99;
- gatewayd's own verdict time (queue in -> verdict out, from its histogram): mean and bucket percentiles;
- handshakes completed, and data packets that reached the server per team (the prior-connection half: none).
All emulated clients send from one address, so the bench raises handshake.rate for that address (the per-source
limit is measured in tests/e2e/test_handshake_flood.py). Writes JSON. Run as root: `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import selectors
import socket
import struct
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bench.common import is_root, write_report
from bench.disconnect import summary, tunnel_ip
from gatewayd.adapters.wireguard.uapi import UapiWireGuard
from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import SERVER_IP, UAPI_DIR, WG_PORT, Lab, entered
from gatewayd.lab.noise import Handshake
from gatewayd.v1 import control_pb2, control_pb2_grpc, types_pb2

SOCKETS = 64
SINK_PORT = 5000


def configure(lab: Lab, n: int) -> list[tuple[bytes, str]]:
    """n peers on the gateway (key, tunnel /32), in one UAPI set; returns (private key, public key base64)."""
    keys, lines = [], ["set=1"]
    for i in range(n):
        private = X25519PrivateKey.generate()
        public = private.public_key().public_bytes_raw()
        keys.append((private.private_bytes_raw(), base64.b64encode(public).decode()))
        lines += [f"public_key={public.hex()}", f"allowed_ip={tunnel_ip(i)}/32"]
    source = UapiWireGuard(UAPI_DIR / f"{lab.gw_iface}.sock")
    answer = asyncio.run(source._exchange("\n".join(lines) + "\n\n"))
    if answer.strip() != "errno=0":
        raise RuntimeError(f"configuring peers failed: {answer}")
    return keys


async def enroll(socket_path: Path, keys: list[tuple[bytes, str]]) -> None:
    async with grpc.aio.secure_channel(f"unix:{socket_path}",
                                       grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)) as ch:
        stub = control_pb2_grpc.ControlServiceStub(ch)
        await stub.ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
            team_id="prior", version=1, scope=types_pb2.MFA_SCOPE_CLIENT_APP, roles=types_pb2.MFA_ROLES_ALL,
            totp_prior_connection=True)))
        sem = asyncio.Semaphore(64)

        async def one(i: int, key: str) -> None:
            async with sem:
                await stub.UpsertMember(control_pb2.UpsertMemberRequest(
                    member_id=f"m{i}", team_id="prior" if i % 2 else "open", role=types_pb2.MEMBER_ROLE_MEMBER,
                    peer_public_keys=[key], totp=control_pb2.TotpEnrollment(secret=os.urandom(20), digits=6)))

        await asyncio.gather(*(one(i, k) for i, (_, k) in enumerate(keys)))


def checksum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def datagram(i: int) -> bytes:
    """An IPv4/UDP packet from peer i's tunnel address to the server's sink, carrying i."""
    payload = struct.pack("!I", i)
    udp = struct.pack("!HHHH", 40000, SINK_PORT, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(tunnel_ip(i)), socket.inet_aton(SERVER_IP))
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + udp


class Sink(threading.Thread):
    """The server: counts the peers whose data packet arrived."""

    def __init__(self, ns: str) -> None:
        super().__init__(daemon=True)
        with entered(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            self.sock.bind((SERVER_IP, SINK_PORT))
        self.sock.settimeout(0.2)
        self.seen: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(64)
            except TimeoutError:
                continue
            if len(data) == 4:
                self.seen.add(struct.unpack("!I", data)[0])

    def stop(self) -> set[int]:
        self.done.set()
        self.join(5)
        self.sock.close()
        return self.seen


def round_trips(lab: Lab, ns: str, source: str, keys: list[tuple[bytes, str]], rate: float
                ) -> dict[str, Any]:
    """Every peer handshakes once, `rate` initiations a second; each sends its data packet when complete."""
    gateway = base64.b64decode(lab.gw_public)
    handshakes = [Handshake(private, gateway) for private, _ in keys]  # prepared before the clock starts
    by_index = {h.index: i for i, h in enumerate(handshakes)}
    sent_at: dict[int, float] = {}
    rtt: dict[int, float] = {}
    with entered(ns):
        socks = []
        for _ in range(SOCKETS):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((source, 0))
            s.setblocking(False)
            socks.append(s)
    target = (lab.peers[0].underlay_gw, WG_PORT)
    stop = threading.Event()
    other = 0

    def receive() -> None:
        nonlocal other
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while not stop.is_set() or len(rtt) < len(sent_at):
            events = sel.select(0.2)
            if not events and stop.is_set():
                return
            for key, _ in events:
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        data = sock.recv(256)
                    except BlockingIOError:
                        break
                    now = time.perf_counter()
                    if len(data) != 92 or data[0] != 2:
                        other += 1  # e.g. a cookie reply (WireGuard under load)
                        continue
                    i = by_index.get(struct.unpack_from("<I", data, 8)[0])
                    if i is None or i in rtt:
                        continue
                    rtt[i] = now - sent_at[i]
                    transport = handshakes[i].complete(data)
                    if transport is not None:
                        sock.sendto(transport.seal(datagram(i)), target)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    start = time.perf_counter()
    for i, h in enumerate(handshakes):
        due = start + i / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(due - now, 0.001))
        sent_at[i] = time.perf_counter()
        socks[i % SOCKETS].sendto(h.message, target)
    sending = time.perf_counter() - start
    deadline = time.monotonic() + 30
    while len(rtt) < len(sent_at) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    receiver.join(10)
    for s in socks:
        s.close()
    samples = list(rtt.values())
    return {"sent": len(sent_at), "sending_seconds": round(sending, 2), "answered": len(rtt),
            "other_answers": other, "round_trip": summary(samples) if len(samples) > 2 else None}


def metrics(lab: Lab) -> dict[str, float]:
    with entered(lab.gw_ns):
        text = urllib.request.urlopen("http://127.0.0.1:9109/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gatewayd_handshake_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def verdicts(values: dict[str, float]) -> dict[str, Any]:
    """Mean and bucket bounds of the p50/p99 from gatewayd's verdict histogram."""
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in values.items()
                     if k.startswith("gatewayd_handshake_verdict_seconds_bucket") and "+Inf" not in k)
    count = values.get("gatewayd_handshake_verdict_seconds_count", 0.0)
    total = values.get("gatewayd_handshake_verdict_seconds_sum", 0.0)

    def bound(q: float) -> float | None:
        return next((le * 1000 for le, c in buckets if c >= q * count), None)

    return {"count": count, "mean_ms": total / count * 1000 if count else None,
            "p50_at_most_ms": bound(0.5), "p99_at_most_ms": bound(0.99)}


def run(n: int, rate: float) -> dict[str, Any]:
    lab = Lab(peers_wanted=1)
    out: dict[str, Any] = {"peers": n, "rate_per_s": rate}
    with lab.running():
        client = lab.peers[0]
        keys = configure(lab, n)
        for detect in (True, False):
            for f in lab.workdir.glob("state.db*"):
                f.unlink()
            gw = LabGateway(lab, handshake={"detect": detect, "rate": 100_000, "burst": 100_000})
            gw.start(timeout=120)
            try:
                asyncio.run(enroll(lab.workdir / "control.sock", keys))
                sink = Sink(lab.srv_ns)
                sink.start()
                result = round_trips(lab, client.ns, client.underlay, keys, rate)
                time.sleep(1)
                arrived = sink.stop()
                result["data_arrived"] = {
                    "open_team": sum(1 for i in arrived if i % 2 == 0), "open_team_of": (n + 1) // 2,
                    "prior_connection_team": sum(1 for i in arrived if i % 2 == 1)}
                if detect:
                    values = metrics(lab)
                    result["gatewayd_verdict"] = verdicts(values)
                    result["gatewayd_initiations"] = {k.split('"')[1]: v for k, v in values.items()
                                                      if k.startswith("gatewayd_handshake_initiations_total{")}
            finally:
                gw.stop()
            out["detection_on" if detect else "detection_off"] = result
        on, off = out["detection_on"]["round_trip"], out["detection_off"]["round_trip"]
        if on and off:
            out["added_by_detection_ms"] = {"p50": on["p50_ms"] - off["p50_ms"], "p99": on["p99_ms"] - off["p99_ms"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="initiations per second")
    parser.add_argument("--out", type=Path, default=Path("bench/handshakes.json"))
    args = parser.parse_args(argv)
    if not is_root():
        return 1
    write_report(args.out, run(args.peers, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
