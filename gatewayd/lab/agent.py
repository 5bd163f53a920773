"""Helpers that run inside a lab namespace (`python -m gatewayd.lab.agent COMMAND`), printing JSON.

Client-app side: challenge, totp, backup, watch (ChallengeService over the tunnel), probe (can I connect?).
Traffic: flood (UDP datagrams carrying sender, sequence and send time), tcp (one long connection sending
timestamped lines). Server side: sink (records every datagram with its kernel receive time, and every TCP
line with its arrival), writing its record as JSON when told to stop (SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def _stub(gateway: str) -> Any:
    import grpc

    from gatewayd.v1 import challenge_pb2_grpc

    channel = grpc.insecure_channel(gateway)
    return challenge_pb2_grpc.ChallengeServiceStub(channel)


def _status(msg: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    data: dict[str, Any] = MessageToDict(msg, preserving_proto_field_name=True)
    return data


def _call(fn: Any, request: Any) -> dict[str, Any]:
    import grpc

    started = time.perf_counter()
    try:
        answer = fn(request, timeout=10)
        return {"ok": True, "rpc_seconds": time.perf_counter() - started, **_status(answer)}
    except grpc.RpcError as exc:
        return {"ok": False, "code": exc.code().name, "details": exc.details()}


def cmd_challenge(args: argparse.Namespace) -> None:
    from gatewayd.v1 import challenge_pb2

    print(json.dumps(_call(_stub(args.gateway).GetChallenge, challenge_pb2.GetChallengeRequest())))


def cmd_totp(args: argparse.Namespace) -> None:
    from gatewayd.v1 import challenge_pb2

    print(json.dumps(_call(_stub(args.gateway).SubmitTotp, challenge_pb2.SubmitTotpRequest(code=args.code))))


def cmd_backup(args: argparse.Namespace) -> None:
    from gatewayd.v1 import challenge_pb2

    req = challenge_pb2.SubmitBackupCodeRequest(code=args.code)
    print(json.dumps(_call(_stub(args.gateway).SubmitBackupCode, req)))


def cmd_device(args: argparse.Namespace) -> None:
    """The client app's PIN & biometrics unlock: fetch the nonce, sign it with the device key, submit."""
    from gatewayd.lab.authenticator import SoftAuthenticator
    from gatewayd.v1 import challenge_pb2

    stub = _stub(args.gateway)
    challenge = stub.GetChallenge(challenge_pb2.GetChallengeRequest(), timeout=10)
    with open(args.key, "rb") as f:
        auth = SoftAuthenticator.from_pem(f.read(), credential_id=bytes.fromhex(args.credential_id),
                                          user_handle=bytes.fromhex(args.user_handle), sign_count=args.sign_count)
    a = auth.assert_(challenge.device_nonce)
    request = challenge_pb2.SubmitDeviceAssertionRequest(
        credential_id=a.credential_id, authenticator_data=a.authenticator_data, client_data_json=a.client_data_json,
        signature=a.signature, user_handle=a.user_handle)
    print(json.dumps({"nonce_bytes": len(challenge.device_nonce),
                      **_call(stub.SubmitDeviceAssertion, request)}))


def cmd_watch(args: argparse.Namespace) -> None:
    """Print each status the gateway streams, with the time it arrived, until --count arrived."""
    import grpc

    from gatewayd.v1 import challenge_pb2

    stream = _stub(args.gateway).WatchStatus(challenge_pb2.WatchStatusRequest(), timeout=args.timeout)
    try:
        for i, status in enumerate(stream):
            print(json.dumps({"at": time.time(), **_status(status)}), flush=True)
            if i + 1 >= args.count:
                break
    except grpc.RpcError as exc:
        print(json.dumps({"at": time.time(), "error": exc.code().name}), flush=True)
    finally:
        stream.cancel()


def cmd_probe(args: argparse.Namespace) -> None:
    host, port = args.to.rsplit(":", 1)
    start = time.monotonic()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # A blocking connect bounded by SO_SNDTIMEO: the kernel's own verdict. (Python's timeout mode polls and
        # reads SO_ERROR, and after an ICMP refusal during the handshake that read can come back 0 for a socket
        # that never connected: a false "connected".)
        seconds = int(args.timeout)
        micros = int((args.timeout - seconds) * 1e6)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros))
        try:
            s.connect((host.strip("[]"), int(port)))
            s.getpeername()  # raises ENOTCONN unless the handshake really completed
            result = "connected"
        except TimeoutError:
            result = "timeout"
        except OSError as exc:
            result = "timeout" if exc.errno == errno.EINPROGRESS else errno.errorcode.get(exc.errno or 0, str(exc))
    print(json.dumps({"to": args.to, "result": result, "seconds": time.monotonic() - start}))


def cmd_flood(args: argparse.Namespace) -> None:
    host, port = args.to.rsplit(":", 1)
    interval = 1.0 / args.rate
    sent = errors = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        end = time.monotonic() + args.duration
        next_at = time.monotonic()
        while time.monotonic() < end:
            payload = json.dumps({"tag": args.tag, "seq": sent, "sent": time.time()}).encode()
            try:
                s.sendto(payload, (host, int(port)))
            except OSError:
                errors += 1  # ICMP admin-prohibited comes back as ECONNREFUSED/EHOSTUNREACH on the next send
            sent += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    print(json.dumps({"tag": args.tag, "sent": sent, "send_errors": errors}))


def cmd_handshakes(args: argparse.Namespace) -> None:
    """Handshake initiations to a WireGuard port at a steady rate: garbage (mac1 wrong), mac1 (right mac1,
    contents that do not decrypt), replay (one initiation of --peer-key stamped --stamp-age seconds ago, which
    WireGuard has seen newer ones than: it drops it, and so must gatewayd), or mix."""
    import base64

    from gatewayd.lab.noise import initiation, mac1_only, tai64n

    host, port = args.to.rsplit(":", 1)
    gateway = base64.b64decode(args.gateway_key)
    pool: list[bytes] = []
    kinds = ["garbage", "mac1", "replay"] if args.kind == "mix" else [args.kind]
    for kind in kinds:
        if kind == "garbage":
            pool += [b"\x01\x00\x00\x00" + os.urandom(144) for _ in range(64)]
        elif kind == "mac1":
            pool += [mac1_only(gateway) for _ in range(64)]
        else:
            stamp = tai64n(time.time() - args.stamp_age)
            pool += [initiation(base64.b64decode(args.peer_key), gateway, stamp=stamp)] * 64
    sent = 0
    tick = 0.005
    per_tick = max(1, int(args.rate * tick))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        start = time.monotonic()
        end = start + args.duration
        while (now := time.monotonic()) < end:
            due = int((now - start) * args.rate) + per_tick
            while sent < due:
                s.sendto(pool[sent % len(pool)], (host, int(port)))
                sent += 1
            time.sleep(tick)
    print(json.dumps({"sent": sent, "seconds": round(time.monotonic() - start, 3)}))


def cmd_tcp(args: argparse.Namespace) -> None:
    host, port = args.to.rsplit(":", 1)
    sent, error = 0, None
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.settimeout(0.2)
        end = time.monotonic() + args.duration
        while time.monotonic() < end:
            try:
                s.sendall(json.dumps({"tag": args.tag, "seq": sent, "sent": time.time()}).encode() + b"\n")
                sent += 1
            except OSError as exc:
                error = errno.errorcode.get(exc.errno or 0, str(exc))
                break
            time.sleep(0.02)
    print(json.dumps({"tag": args.tag, "sent": sent, "error": error}))


def cmd_sink(args: argparse.Namespace) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    udp.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    udp.bind(("0.0.0.0", args.udp))
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", args.tcp))
    tcp.listen(16)
    datagrams: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []
    stop = threading.Event()

    def receive_udp() -> None:
        udp.settimeout(0.2)
        while not stop.is_set():
            try:
                data, anc, _, _ = udp.recvmsg(2048, socket.CMSG_SPACE(16))
            except TimeoutError:
                continue
            kernel = None
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    kernel = sec + nsec / 1e9
            datagrams.append({**json.loads(data), "received": kernel})

    def serve_tcp(conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(0.2)
        while not stop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            arrived = time.time()
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                lines.append({**json.loads(line), "received": arrived})
        conn.close()

    def accept() -> None:
        tcp.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = tcp.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve_tcp, args=(conn,), daemon=True).start()

    threads = [threading.Thread(target=receive_udp, daemon=True), threading.Thread(target=accept, daemon=True)]
    for t in threads:
        t.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    while not stop.wait(0.1):
        pass
    for t in threads:
        t.join(2)
    with open(args.out, "w") as f:
        json.dump({"datagrams": datagrams, "lines": lines}, f)


def cmd_collect(args: argparse.Namespace) -> None:
    """An MQTT subscriber per broker (persistent session, QoS 1, reconnecting by itself) that records the
    CloudEvents id of every event it gets; writes {"ids": [...]} to --out when told to stop (SIGTERM)."""
    import asyncio

    import aiomqtt

    ids: set[str] = set()

    async def follow(broker: str, n: int) -> None:
        host, _, port = broker.rpartition(":")
        while True:
            try:
                async with aiomqtt.Client(host, int(port), identifier=f"collector-{n}", clean_session=False) as c:
                    await c.subscribe(args.topic, qos=1)
                    async for m in c.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                        ids.add(json.loads(payload)["id"])
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        tasks = [asyncio.ensure_future(follow(b, n)) for n, b in enumerate(args.broker)]
        print("ready", flush=True)
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    with open(args.out, "w") as f:
        json.dump({"ids": sorted(ids)}, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gatewayd.lab.agent")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("challenge", "totp", "backup", "watch"):
        p = sub.add_parser(name)
        p.add_argument("--gateway", default="10.99.0.1:9443")
        if name in ("totp", "backup"):
            p.add_argument("--code", required=True)
        if name == "watch":
            p.add_argument("--count", type=int, default=2)
            p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("device")
    p.add_argument("--gateway", default="10.99.0.1:9443")
    p.add_argument("--key", required=True, help="PEM file of the device's private key")
    p.add_argument("--credential-id", required=True, help="hex")
    p.add_argument("--user-handle", required=True, help="hex")
    p.add_argument("--sign-count", type=int, default=0, help="the authenticator's counter before this use")
    p = sub.add_parser("probe")
    p.add_argument("--to", required=True)
    p.add_argument("--timeout", type=float, default=2.0)
    for name in ("flood", "tcp"):
        p = sub.add_parser(name)
        p.add_argument("--to", required=True)
        p.add_argument("--tag", required=True)
        p.add_argument("--duration", type=float, default=5.0)
        if name == "flood":
            p.add_argument("--rate", type=float, default=1000.0)
    p = sub.add_parser("handshakes")
    p.add_argument("--to", required=True)
    p.add_argument("--gateway-key", required=True, help="the gateway's public key (base64)")
    p.add_argument("--peer-key", help="a peer's private key (base64), for replay")
    p.add_argument("--kind", choices=["garbage", "mac1", "replay", "mix"], default="mix")
    p.add_argument("--stamp-age", type=float, default=3600.0)
    p.add_argument("--rate", type=float, default=20000.0)
    p.add_argument("--duration", type=float, default=5.0)
    p = sub.add_parser("collect")
    p.add_argument("--broker", action="append", required=True, help="host:port (repeat for each broker)")
    p.add_argument("--topic", default="gatewayd/+/events/#")
    p.add_argument("--out", required=True)
    p = sub.add_parser("sink")
    p.add_argument("--udp", type=int, default=5000)
    p.add_argument("--tcp", type=int, default=5001)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    globals()[f"cmd_{args.command}"](args)


if __name__ == "__main__":
    main(sys.argv[1:])
