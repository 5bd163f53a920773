"""Fleet benchmark: N gatewayd processes x P peers on one 3-member etcd cluster (gatewayd.lab.fleet).

1. Fleet Disconnect: M members, one after the other, each disconnected with scope FLEET at gateway 0; the time
   from the call to the moment the member's peer is in the quarantine set of *every* gateway, as the kernel
   reports it (`nft monitor` in the gateways' namespace, one line per element added). p50/p99 over M.
2. Proofs: every gateway's peers owe a TOTP proof (TOTP Prior Connection); the client apps (in the clients'
   namespace, each from its own tunnel address) submit one proof per member, at concurrency 1 and 64 across the
   fleet, once with the fleet ledger (etcd spend) and once with the same gateways without [fleet] (local only).

    python -m bench.fleet [--gateways 10] [--peers 1000] [--disconnects 200] [--out bench/fleet.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pyotp

from bench.common import is_root, write_report
from gatewayd.lab.fleet import FleetLab, challenge_port, random_key, target_ip, tunnel_ip
from gatewayd.v1 import challenge_pb2, challenge_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2

TEAM = "everyone"


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return {"n": len(ordered), "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2),
            "max_ms": round(ordered[-1] * 1000, 2), "mean_ms": round(statistics.fmean(ordered) * 1000, 2)}


# ---- set-up ---------------------------------------------------------------------------------------------------

async def enroll(lab: FleetLab, keys: list[list[str]], secrets: list[bytes], prior: bool) -> None:
    """Member k has one peer per gateway (keys[g][k]); enrolled at every gateway."""
    async def at(g: int) -> None:
        path = lab.gateways[g].lab.workdir / "control.sock"
        async with grpc.aio.secure_channel(f"unix:{path}",
                                           grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)) as ch:
            stub = control_pb2_grpc.ControlServiceStub(ch)
            await stub.ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
                team_id=TEAM, version=1, scope=types_pb2.MFA_SCOPE_BOTH, roles=types_pb2.MFA_ROLES_ALL,
                totp_prior_connection=prior)))
            sem = asyncio.Semaphore(32)

            async def one(k: int) -> None:
                async with sem:
                    await stub.UpsertMember(control_pb2.UpsertMemberRequest(
                        member_id=f"m{k}", team_id=TEAM, role=types_pb2.MEMBER_ROLE_MEMBER,
                        peer_public_keys=[keys[x][k] for x in range(len(keys))],
                        totp=control_pb2.TotpEnrollment(secret=secrets[k], digits=6)), timeout=60)

            await asyncio.gather(*(one(k) for k in range(len(secrets))))

    await asyncio.gather(*(at(g) for g in range(len(lab.gateways))))


def build(gateways: int, peers: int, *, fleet: bool, prior: bool) -> tuple[FleetLab, list[list[str]], list[bytes]]:
    # Reads of the interface every 5 s (the tests use 0.5 s): ten gateways share two cores here.
    slow = {"poll_interval": 5.0}
    lab = (FleetLab(gateways, wireguard=slow) if fleet
           else FleetLab(gateways, wireguard=slow, fleet={"endpoints": []}))
    lab.up()
    try:
        started = time.monotonic()
        for g in lab.gateways:
            g.gw.start(timeout=120)
        keys = [[random_key() for _ in range(peers)] for _ in range(gateways)]
        secrets = [os.urandom(20) for _ in range(peers)]
        asyncio.run(enroll(lab, keys, secrets, prior))
        for g in lab.gateways:
            lab.connect_many(g, keys[g.index])
        want = "PEER_STATE_QUARANTINED" if prior else "PEER_STATE_AUTHORIZED"
        deadline = time.monotonic() + 300
        for g in lab.gateways:
            ctl = g.gw.control()
            while True:
                if _settled(ctl, keys[g.index], want):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway {g.index} did not decide its peers")
                time.sleep(0.5)
        print(f"fleet={fleet}: {gateways} gateways x {peers} peers ready in {time.monotonic() - started:.1f} s",
              file=sys.stderr)
    except BaseException:
        lab.down()
        raise
    return lab, keys, secrets


def _settled(ctl: Any, keys: list[str], want: str) -> bool:
    """The first and last peer are decided as wanted (peers are decided in one read)."""
    for key in (keys[0], keys[-1]):
        try:
            s = ctl.GetSession(control_pb2.GetSessionRequest(peer_public_key=key))
        except grpc.RpcError:
            return False
        if types_pb2.PeerState.Name(s.state) != want or not list(s.tunnel_ips):
            return False
    return True


# ---- 1. fleet Disconnect ----------------------------------------------------------------------------------------

class ElementWatch:
    """`nft monitor` in the gateways' namespace: when each tunnel address entered which table's quarantine set."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "monitor", "elements"],
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.seen: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.perf_counter()
            # add element inet gwdfleet3 quarantine4 { 10.103.0.5 }
            parts = line.split()
            if len(parts) >= 7 and parts[0] == "add" and parts[1] == "element" and parts[4].startswith("quarantine"):
                for address in line[line.index("{") + 1:line.rindex("}")].split(","):
                    with self.lock:
                        self.seen.setdefault((parts[3], address.strip()), now)

    def when(self, table: str, address: str) -> float | None:
        with self.lock:
            return self.seen.get((table, address))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def fleet_disconnects(lab: FleetLab, members: int) -> dict[str, Any]:
    watch = ElementWatch(lab.ns)
    time.sleep(1)
    ctl = lab.gateways[0].gw.control()
    everywhere, first_remote, answered = [], [], []
    try:
        for k in range(members):
            started = time.perf_counter()
            answer = ctl.Disconnect(control_pb2.DisconnectRequest(
                member_id=f"m{k}", reason="bench", idempotency_key=f"fleet-{k}",
                scope=control_pb2.DISCONNECT_SCOPE_FLEET), timeout=30)
            answered.append(time.perf_counter() - started)
            assert answer.fleet_demand_recorded, answer
            deadline = time.monotonic() + 30
            while True:
                times = [watch.when(f"gwdfleet{g.index}", tunnel_ip(g.index, k)) for g in lab.gateways]
                if all(t is not None for t in times):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"member {k} not enforced everywhere: {times}")
                time.sleep(0.001)
            enforced = [t - started for t in times if t is not None]
            everywhere.append(max(enforced))
            first_remote.append(min(enforced[1:]))
    finally:
        watch.close()
    return {"members": members, "answered_at_gateway_0": summary(answered),
            "enforced_on_every_gateway": summary(everywhere), "enforced_on_first_other_gateway": summary(first_remote)}


# ---- 2. proofs ----------------------------------------------------------------------------------------------------

async def _prove(members: list[tuple[str, str]], concurrency: int) -> dict[str, Any]:
    """(address, base32 secret) per member; connect all, say ready, wait for go, prove."""
    channels: list[tuple[grpc.aio.Channel, str]] = []
    sem = asyncio.Semaphore(64)

    async def connect(address: str, secret: str) -> None:
        async with sem:
            ch = grpc.aio.insecure_channel(address)
            await asyncio.wait_for(ch.channel_ready(), 20)
            channels.append((ch, secret))

    await asyncio.gather(*(connect(a, s) for a, s in members))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    async def one(ch: grpc.aio.Channel, secret: str) -> None:
        async with sem:
            code = pyotp.TOTP(secret).now()
            started = time.perf_counter()
            try:
                r = await challenge_pb2_grpc.ChallengeServiceStub(ch).SubmitTotp(
                    challenge_pb2.SubmitTotpRequest(code=code), timeout=30)
                outcome = "accepted" if r.accepted else "refused"
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            latencies.append(time.perf_counter() - started)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(one(ch, s) for ch, s in channels))
    return {"latencies": latencies, "outcomes": outcomes, "seconds": time.perf_counter() - started}


def client_main(argv: list[str]) -> int:
    """`python -m bench.fleet client <concurrency>`: JSON lines [address, secret] on stdin up to an empty line,
    then the go line; JSON out."""
    import uvloop
    members: list[tuple[str, str]] = []
    for line in sys.stdin:
        if not line.strip():
            break
        address, secret = json.loads(line)
        members.append((address, secret))
    sys.stdout.write(json.dumps(uvloop.run(_prove(members, int(argv[0])))) + "\n")
    sys.stdout.flush()
    os._exit(0)


def proofs(lab: FleetLab, secrets: list[bytes], members: range, concurrency: int) -> dict[str, Any]:
    """Member k proves at gateway k % N (every proof is a different member: a TOTP code is one per member and
    step in a fleet)."""
    n = len(lab.gateways)
    rows = [(f"{target_ip(k % n, k)}:{challenge_port(k % n)}", base64.b32encode(secrets[k]).decode())
            for k in members]
    proc = subprocess.Popen(["ip", "netns", "exec", lab.clients, sys.executable, "-m", "bench.fleet", "client",
                             str(concurrency)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    proc.stdin.flush()
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the client process failed")
    proc.stdin.write("go\n")
    proc.stdin.close()
    result = json.loads(proc.stdout.read())
    proc.wait(30)
    accepted = result["outcomes"].get("accepted", 0)
    return {"concurrency": concurrency, "members": len(rows), "outcomes": result["outcomes"],
            "accepted_per_s": round(accepted / result["seconds"], 1), "latency": summary(result["latencies"])}


def wait_next_step() -> None:
    """Start a proof round at the beginning of a TOTP step (every member's code stays valid through it)."""
    time.sleep(30 - time.time() % 30 + 0.2)


def run_bench(gateways: int, peers: int, disconnects: int) -> dict[str, Any]:
    out: dict[str, Any] = {"gateways": gateways, "peers_per_gateway": peers, "etcd_members": 3}
    # Proof rounds: members [0, half) at concurrency 1 (a sample), the rest at 64; each member proves once.
    sample = range(0, min(200, peers // 4))
    bulk = range(len(sample), peers)
    for fleet in (True, False):
        lab, _, secrets = build(gateways, peers, fleet=fleet, prior=True)
        try:
            name = "fleet_etcd_spend" if fleet else "local_only"
            wait_next_step()
            out[f"proofs_{name}_c1"] = proofs(lab, secrets, sample, 1)
            out[f"proofs_{name}_c64"] = proofs(lab, secrets, bulk, 64)
        finally:
            lab.down()
    c1_fleet, c1_local = out["proofs_fleet_etcd_spend_c1"]["latency"], out["proofs_local_only_c1"]["latency"]
    out["fleet_spend_adds_ms"] = {"p50": round(c1_fleet["p50_ms"] - c1_local["p50_ms"], 2),
                                  "p99": round(c1_fleet["p99_ms"] - c1_local["p99_ms"], 2)}
    lab, _, _ = build(gateways, peers, fleet=True, prior=False)
    try:
        out["fleet_disconnect"] = fleet_disconnects(lab, disconnects)
    finally:
        lab.down()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "client":
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(prog="bench.fleet")
    parser.add_argument("--gateways", type=int, default=10)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--disconnects", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/fleet.json"))
    args = parser.parse_args(argv)
    if not is_root():
        return 2
    write_report(args.out, run_bench(args.gateways, args.peers, args.disconnects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
