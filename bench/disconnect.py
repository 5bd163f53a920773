"""Benchmark: gatewayd against the way admins script it by hand, on a wireguard-go gateway in a namespace.

For each scale (1,000 and 10,000 configured peers, one member each):
- Disconnect latency, call to answer (enforced, committed), sequential calls to distinct members over the local
  socket; p50/p99; the same calls again to a daemon that does not poll meanwhile (what the polls add); and
  calls arriving at random times (a poll's `get` is then met by chance, not only right after an answer).
- Mass Disconnect: all members at once, as one team-wide Disconnect and as one call per member in parallel;
  time until every answer is in (each answer means enforced), checked against the nftables set.
- One tracking poll: CPU time of reading the UAPI socket, parsing and diffing.
- The hand-scripted way, same machine, same run: `wg show <if> dump` parsed, then one `nft add element`
  process per peer (one Disconnect; all members; one poll = one `wg show dump` parsed).
Writes JSON (ratios included). Run as root: `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import nftables

from bench.common import is_root, write_report
from gatewayd.adapters.wireguard.uapi import UapiWireGuard
from gatewayd.core.tracking import Snapshot, diff
from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import UAPI_DIR, Lab, entered, keypair
from gatewayd.v1 import control_pb2, control_pb2_grpc, types_pb2

TEAM = "bench"


def tunnel_ip(i: int) -> str:
    return f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


def configure_peers(lab: Lab, n: int) -> list[str]:
    """n peers on the gateway's wireguard-go, each with a tunnel /32 and an endpoint, in one UAPI set."""
    keys, lines = [], ["set=1"]
    for i in range(n):
        _, public = keypair()
        keys.append(public)
        lines += [f"public_key={base64.b64decode(public).hex()}", f"endpoint=198.18.250.{i % 250 + 1}:51820",
                  f"allowed_ip={tunnel_ip(i)}/32"]
    source = UapiWireGuard(UAPI_DIR / f"{lab.gw_iface}.sock")
    answer = asyncio.run(source._exchange("\n".join(lines) + "\n\n"))
    if answer.strip() != "errno=0":
        raise RuntimeError(f"configuring peers failed: {answer}")
    return keys


class Observer(threading.Thread):
    """Watches the kernel's quarantine set from its own thread (inside the gateway namespace) and notes
    when it first holds `target` addresses: the moment a mass Disconnect is enforced."""

    def __init__(self, ns: str, target: int) -> None:
        super().__init__(daemon=True)
        self.ns, self.target = ns, target
        self.when: float | None = None
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        with entered(self.ns):
            nft = nftables.Nftables()
            nft.set_json_output(True)
            while not self._done.is_set():
                _, out, _ = nft.cmd("list set inet gatewayd quarantine4")
                items = json.loads(out)["nftables"] if out else []
                self.samples += 1
                if sum(len(i["set"].get("elem", [])) for i in items if "set" in i) >= self.target:
                    self.when = time.perf_counter()
                    return

    def stop(self) -> None:
        self._done.set()
        self.join(10)


def quarantined_count() -> int:
    out = subprocess.run(["nft", "-j", "list", "set", "inet", "gatewayd", "quarantine4"], capture_output=True,
                         text=True, check=True).stdout
    items = json.loads(out)["nftables"]
    return sum(len(i["set"].get("elem", [])) for i in items if "set" in i)


async def enroll_all(socket_path: Path, keys: list[str]) -> None:
    async with grpc.aio.secure_channel(f"unix:{socket_path}",
                                       grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)) as ch:
        stub = control_pb2_grpc.ControlServiceStub(ch)
        sem = asyncio.Semaphore(64)

        async def one(i: int, key: str) -> None:
            async with sem:
                await stub.UpsertMember(control_pb2.UpsertMemberRequest(
                    member_id=f"m{i}", team_id=TEAM, role=types_pb2.MEMBER_ROLE_MEMBER, peer_public_keys=[key],
                    totp=control_pb2.TotpEnrollment(secret=os.urandom(20), digits=6)))

        await asyncio.gather(*(one(i, k) for i, k in enumerate(keys)))


async def disconnect_all_parallel(socket_path: Path, n: int, in_flight: int = 1000) -> float:
    async with grpc.aio.secure_channel(f"unix:{socket_path}",
                                       grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)) as ch:
        stub = control_pb2_grpc.ControlServiceStub(ch)
        sem = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with sem:
                await stub.Disconnect(control_pb2.DisconnectRequest(member_id=f"m{i}", reason="bench",
                                                                    idempotency_key=f"par-{i}"))

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - start


POLL_INTERVAL: float | str = "auto"


def fresh_daemon(lab: Lab, gateway: LabGateway | None, keys: list[str], poll_interval: float | str | None = None
                 ) -> LabGateway:
    """A daemon with an empty store and every member enrolled (all peers authorized)."""
    if gateway is not None:
        gateway.stop()
    for f in lab.workdir.glob("state.db*"):
        f.unlink()
    gw = LabGateway(lab, wireguard={"poll_interval": poll_interval or POLL_INTERVAL})
    gw.start(timeout=120)
    asyncio.run(enroll_all(lab.workdir / "control.sock", keys))
    # The first read of the interface comes after READY and gives way to calls: wait until it decided every
    # peer (each is tracked), so that what follows measures Disconnects of peers gatewayd knows.
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run(["ip", "netns", "exec", lab.gw_ns, "nft", "-j", "list", "set", "inet", "gatewayd",
                              "tracked4"], capture_output=True, text=True, check=True).stdout
        if sum(len(i["set"].get("elem", [])) for i in json.loads(out)["nftables"] if "set" in i) >= len(keys):
            return gw
        if time.monotonic() > deadline:
            raise RuntimeError("gatewayd did not decide every peer within 120 s")
        time.sleep(0.1)


def busy_answers(answer: bytes, polls: int) -> list[bytes]:
    """The recorded answer as it would read on a busy gateway: at each poll every peer's byte counters grew
    and 1% of the peers completed a new handshake (a rekey every ~2 minutes per peer at a 1 s poll)."""
    blocks = answer.split(b"\npublic_key=")
    out = []
    for n in range(1, polls + 1):
        changed = [blocks[0]]
        for i, block in enumerate(blocks[1:]):
            block = re.sub(rb"\ntx_bytes=\d+", b"\ntx_bytes=%d" % (n * 1500 + i), block)
            block = re.sub(rb"\nrx_bytes=\d+", b"\nrx_bytes=%d" % (n * 3000 + i), block)
            if i % 100 == n % 100:
                block = re.sub(rb"\nlast_handshake_time_sec=\d+", b"\nlast_handshake_time_sec=%d" % (1e9 + n), block)
            changed.append(block)
        out.append(b"\npublic_key=".join(changed))
    return out


def gatewayd_poll_cpu(lab: Lab, polls: int = 20) -> dict[str, float]:
    """CPU of one poll (UAPI read, parse, diff) as the daemon does it: steady (unchanged peers come from the
    parse cache), busy (the real answer replayed with every peer's counters changed and 1% new handshakes,
    see busy_answers) and cold (a fresh reader: every peer parsed, every peer new to the diff)."""
    path = UAPI_DIR / f"{lab.gw_iface}.sock"

    async def cpu_of_polls(source: UapiWireGuard, previous: Snapshot) -> tuple[list[float], Snapshot]:
        samples = []
        for _ in range(polls):
            t = time.process_time()
            current = await source.read()
            diff(previous, current)
            samples.append(time.process_time() - t)
            previous = current
        return samples, previous

    async def measure() -> tuple[list[float], list[float], list[float]]:
        source = UapiWireGuard(path)
        steady, previous = await cpu_of_polls(source, await source.read())
        recorded = b"".join([chunk async for chunk in source._ask(b"get=1\n\n")])
        answers = busy_answers(recorded, polls)

        async def replay(request: bytes) -> AsyncIterator[bytes]:
            answer = answers.pop(0)
            for i in range(0, len(answer), 256 * 1024):
                yield answer[i:i + 256 * 1024]

        source._ask = replay  # type: ignore[method-assign]
        busy, _ = await cpu_of_polls(source, previous)
        cold = []
        for _ in range(5):
            t = time.process_time()
            diff({}, await UapiWireGuard(path).read())
            cold.append(time.process_time() - t)
        return steady, busy, cold

    steady, busy, cold = asyncio.run(measure())
    return {"n": polls, "cpu_p50_ms": statistics.median(steady) * 1000, "cpu_max_ms": max(steady) * 1000,
            "busy_cpu_p50_ms": statistics.median(busy) * 1000, "busy_cpu_max_ms": max(busy) * 1000,
            "cold_cpu_p50_ms": statistics.median(cold) * 1000}


def wg_dump(iface: str) -> list[list[str]]:
    out = subprocess.run(["wg", "show", iface, "dump"], capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines()[1:]]


def by_hand_disconnect(iface: str, key: str) -> None:
    """What an admin's script does: find the peer in `wg show dump`, add its address to a set."""
    for row in wg_dump(iface):
        if row[0] == key:
            for prefix in row[3].split(","):
                subprocess.run(["nft", "add", "element", "inet", "handscript", "q4", "{", prefix, "}"], check=True)
            return
    raise LookupError(key)


def by_hand(lab: Lab, keys: list[str], calls: int, mass: bool) -> dict[str, Any]:
    subprocess.run(["nft", "-f", "-"], input="table inet handscript {\n set q4 {\n type ipv4_addr\n "
                   "flags interval\n }\n}\n", text=True, check=True)
    try:
        samples = []
        for key in keys[:calls]:
            t = time.perf_counter()
            by_hand_disconnect(lab.gw_iface, key)
            samples.append(time.perf_counter() - t)
        subprocess.run(["nft", "flush", "set", "inet", "handscript", "q4"], check=True)
        result: dict[str, Any] = {"disconnect": summary(samples)}
        polls_wall, polls_cpu = [], []
        for _ in range(10):
            before, t, own = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter(), time.process_time()
            wg_dump(lab.gw_iface)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            polls_wall.append(time.perf_counter() - t)
            polls_cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                             + time.process_time() - own)
        result["poll"] = {"n": 10, "wall_p50_ms": statistics.median(polls_wall) * 1000,
                          "cpu_p50_ms": statistics.median(polls_cpu) * 1000}
        if mass:
            t = time.perf_counter()
            rows = wg_dump(lab.gw_iface)
            for row in rows:
                for prefix in row[3].split(","):
                    subprocess.run(["nft", "add", "element", "inet", "handscript", "q4", "{", prefix, "}"],
                                   check=True)
            result["mass_disconnect_s"] = time.perf_counter() - t
        return result
    finally:
        subprocess.run(["nft", "delete", "table", "inet", "handscript"], check=False)


NO_POLL = 60.0
"""The longest poll interval: no poll runs during the calls (the first one ran at start)."""


def sequential_disconnects(lab: Lab, n: int, calls: int, gap_mean: float = 0.0) -> dict[str, Any]:
    """`calls` Disconnects of distinct members one after the other, over the local socket: latency from call
    to answer (each answer means enforced and committed). With `gap_mean`, each call waits a random time
    first (exponential, that mean, seeded): arrivals at random times."""
    channel = grpc.secure_channel(f"unix:{lab.workdir / 'control.sock'}",
                                  grpc.local_channel_credentials(grpc.LocalConnectionType.UDS))
    stub = control_pb2_grpc.ControlServiceStub(channel)
    for i in range(20):  # warm-up on members the measured calls do not touch
        stub.Disconnect(control_pb2.DisconnectRequest(member_id=f"m{n - 1 - i}", idempotency_key=f"w{i}"))
    samples = []
    gaps = random.Random(calls)
    for i in range(calls):
        if gap_mean:
            time.sleep(gaps.expovariate(1 / gap_mean))
        t = time.perf_counter()
        res = stub.Disconnect(control_pb2.DisconnectRequest(member_id=f"m{i}", reason="bench",
                                                            idempotency_key=f"seq-{i}"))
        samples.append(time.perf_counter() - t)
        assert res.peers_quarantined == 1
    channel.close()
    result: dict[str, Any] = summary(samples)
    result["enforced"] = quarantined_count() >= calls
    return result


RANDOM_GAP = 0.010
"""Mean pause before each call of the random-arrivals measurement."""


def poll_cadence() -> dict[str, float]:
    """The daemon's poll interval (as configured, or what auto chose) and how long its reads keep wireguard-go
    busy, from its metrics endpoint (the config's default listen, inside the gateway namespace)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open("http://127.0.0.1:9109/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {"interval_s": float(values["gatewayd_poll_interval_seconds"]),
            "read_ms": float(values["gatewayd_poll_read_seconds"]) * 1000}


def run_scale(n: int, calls: int, baseline_calls: int) -> dict[str, Any]:
    lab = Lab(peers_wanted=0)
    with lab.running():
        started = time.perf_counter()
        keys = configure_peers(lab, n)
        setup = time.perf_counter() - started
        gw = fresh_daemon(lab, None, keys)
        print(f"[{n} peers] set up in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        result: dict[str, Any] = {"peers": n, "setup_s": setup}
        with entered(lab.gw_ns):
            result["disconnect"] = sequential_disconnects(lab, n, calls)
            result["poll"] = gatewayd_poll_cpu(lab)
        print(f"[{n} peers] disconnect {result['disconnect']}", file=sys.stderr)
        gw = fresh_daemon(lab, gw, keys)
        with entered(lab.gw_ns):
            result["disconnect_random_arrivals"] = sequential_disconnects(lab, n, calls, RANDOM_GAP)
            result["poll_cadence"] = poll_cadence()
        print(f"[{n} peers] disconnect, random arrivals {result['disconnect_random_arrivals']} "
              f"{result['poll_cadence']}", file=sys.stderr)
        # The same calls to a daemon that does not poll meanwhile: what the host and the Disconnect itself cost,
        # so that what the polls add (wireguard-go's configuration lock, CPU) shows in the same run.
        gw = fresh_daemon(lab, gw, keys, poll_interval=NO_POLL)
        with entered(lab.gw_ns):
            result["disconnect_without_polls"] = sequential_disconnects(lab, n, calls)
        print(f"[{n} peers] disconnect without polls {result['disconnect_without_polls']}", file=sys.stderr)
        # Mass Disconnect: one team-wide request.
        gw = fresh_daemon(lab, gw, keys)
        with entered(lab.gw_ns):
            assert quarantined_count() == 0
            channel = grpc.secure_channel(f"unix:{lab.workdir / 'control.sock'}",
                                          grpc.local_channel_credentials(grpc.LocalConnectionType.UDS))
            observer = Observer(lab.gw_ns, n)
            observer.start()
            t = time.perf_counter()
            res = control_pb2_grpc.ControlServiceStub(channel).Disconnect(
                control_pb2.DisconnectRequest(team_id=TEAM, reason="bench", idempotency_key="team"), timeout=60)
            team_s = time.perf_counter() - t
            observer.stop()
            channel.close()
            result["mass_team"] = {
                "members": n, "answered_s": team_s, "peers_quarantined": res.peers_quarantined,
                "enforced_s": observer.when - t if observer.when else None, "observer_samples": observer.samples,
                "all_in_kernel_set": quarantined_count() == n}
        print(f"[{n} peers] team disconnect {result['mass_team']}", file=sys.stderr)
        # Mass Disconnect: one request per member, all in flight.
        gw = fresh_daemon(lab, gw, keys)
        with entered(lab.gw_ns):
            observer = Observer(lab.gw_ns, n)
            observer.start()
            t = time.perf_counter()
            par_s = asyncio.run(disconnect_all_parallel(lab.workdir / "control.sock", n))
            observer.stop()
            result["mass_per_member"] = {
                "members": n, "answered_s": par_s, "enforced_s": observer.when - t if observer.when else None,
                "all_in_kernel_set": quarantined_count() == n}
        print(f"[{n} peers] per-member parallel {result['mass_per_member']}", file=sys.stderr)
        gw.stop()
        with entered(lab.gw_ns):
            result["by_hand"] = by_hand(lab, keys, baseline_calls, mass=True)
        print(f"[{n} peers] by hand {result['by_hand']}", file=sys.stderr)
        hand = result["by_hand"]
        result["ratios"] = {
            "disconnect_p99_vs_by_hand_p50": result["disconnect"]["p99_ms"] / hand["disconnect"]["p50_ms"],
            "disconnect_p99_with_vs_without_polls": (result["disconnect"]["p99_ms"]
                                                     / result["disconnect_without_polls"]["p99_ms"]),
            "mass_speedup_team_answered": hand["mass_disconnect_s"] / team_s,
            "mass_speedup_team_enforced": (hand["mass_disconnect_s"] / result["mass_team"]["enforced_s"]
                                           if result["mass_team"]["enforced_s"] else None),
            "mass_speedup_per_member_answered": hand["mass_disconnect_s"] / par_s,
            "poll_cpu_vs_by_hand": result["poll"]["cpu_p50_ms"] / hand["poll"]["cpu_p50_ms"],
        }
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="1000,10000", help="comma-separated scales")
    parser.add_argument("--calls", type=int, default=1000, help="sequential Disconnects measured per scale")
    parser.add_argument("--baseline-calls", type=int, default=200, help="hand-scripted Disconnects measured")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--poll-interval", type=lambda v: v if v == "auto" else float(v), default="auto",
                        help="gatewayd's wireguard.poll_interval: auto (the default) or seconds")
    args = parser.parse_args(argv)
    global POLL_INTERVAL
    POLL_INTERVAL = args.poll_interval
    if not is_root():
        return 1
    write_report(args.out, {
        "poll_interval": args.poll_interval,
        "scales": [run_scale(int(n), args.calls, args.baseline_calls) for n in args.peers.split(",")],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
