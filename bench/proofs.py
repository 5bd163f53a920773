"""Benchmark: proofs per second through the challenge API, 10,000 members on a wireguard-go gateway.

Every member has one peer, quarantined until it proves with TOTP (a team with TOTP Prior Connection). The client
apps are emulated in a namespace of their own, connected to the gateway by a veth pair: member i's calls come from
its tunnel address (the challenge API identifies a caller by it) through a route with that source address, over
one gRPC channel (one TCP connection) per member, connected before the timed calls as a client app's is while it
watches its status. gatewayd takes that link for its WireGuard interface (see as_tunnel): the peers are read from
the real wireguard-go and the quarantine is real nftables on the link; only WireGuard's own encryption, which is
not gatewayd's work, is left out. Each call is timed from send to answer
(accepted = released in nftables and committed). The daemon's CPU time per call is read from /proc, by thread.

The clients are bench.h2client (pre-encoded HTTP/2 frames on plain sockets, ~0.08 ms of CPU a call) in one process:
on these two cores grpc.aio's client (0.44-0.63 ms a call) took half of the machine from the daemon at 2,000
calls a second. A run with grpc.aio clients (two processes) is kept beside them for comparison.

Runs: a baseline of gRPC alone (the same connections calling the health service, with both clients), then TOTP
proofs at concurrency 64 over all members, then (each after a team Disconnect put everyone back into quarantine
and the next TOTP step began) 64 again with grpc.aio clients, 16 and 1 over subsets. Each run notes the share
of the machine's CPU time the hypervisor gave to other guests meanwhile (steal), the noise of this host. Also
the hand-scripted way: verify the code with pyotp and release the peer with one `nft delete element` process
per proof.

`--workers 0,2` (the default): all of it once per value, each on a gateway of its own over the same members -
0: the daemon serves the challenge API's gRPC itself ("gatewayd" in the JSON); N: N challenge worker processes
serve it and relay each call to the daemon ("gatewayd_N_workers"; the workers' CPU per call beside the daemon's).
Writes JSON. Run as root: `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import pyotp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import h2client
from bench.common import Spy, is_root, write_report
from bench.disconnect import summary, tunnel_ip
from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import UAPI_DIR, Lab, run
from gatewayd.v1 import challenge_pb2, challenge_pb2_grpc, control_pb2, control_pb2_grpc, types_pb2

TEAM = "prior"
PORT = 9443
GW_LINK, CLIENT_LINK = "198.20.0.1", "198.20.0.2"


def target_ip(i: int) -> str:
    """The gateway address member i calls: one per member, so that a route can give each its source address."""
    return f"172.20.{i // 256}.{i % 256}"


def wire(lab: Lab, ns: str, n: int) -> None:
    """The clients' namespace: every tunnel address is local there, and member i reaches target_ip(i) from
    tunnel_ip(i). The gateway answers on all of 172.20.0.0/16 and routes the tunnel addresses back."""
    lab._netns(ns)  # removed with the lab
    run("ip", "link", "add", f"gwd{lab.tag}c0", "netns", lab.gw_ns, "type", "veth", "peer", "name",
        f"gwd{lab.tag}c1", "netns", ns)
    run("ip", "addr", "add", f"{GW_LINK}/24", "dev", f"gwd{lab.tag}c0", ns=lab.gw_ns)
    run("ip", "link", "set", f"gwd{lab.tag}c0", "up", ns=lab.gw_ns)
    run("ip", "addr", "add", f"{CLIENT_LINK}/24", "dev", f"gwd{lab.tag}c1", ns=ns)
    run("ip", "link", "set", f"gwd{lab.tag}c1", "up", ns=ns)
    run("ip", "route", "add", "local", "172.20.0.0/16", "dev", "lo", ns=lab.gw_ns)
    run("ip", "route", "add", "10.100.0.0/14", "via", CLIENT_LINK, ns=lab.gw_ns)
    run("ip", "route", "add", "local", "10.100.0.0/14", "dev", "lo", ns=ns)
    routes = "".join(f"route add {target_ip(i)}/32 via {GW_LINK} src {tunnel_ip(i)}\n" for i in range(n))
    run("ip", "-batch", "-", ns=ns, input_=routes)


def as_tunnel(lab: Lab) -> dict[str, Any]:
    """The [wireguard] settings that make gatewayd take the clients' link for its WireGuard interface: it reads
    the peers from the real wireguard-go (through a UAPI socket path named after the link), and its nftables
    rules treat the link's traffic as tunnel traffic (only the challenge port open to quarantined sources)."""
    uapi = lab.workdir / "uapi"
    uapi.mkdir(exist_ok=True)
    link = f"gwd{lab.tag}c0"
    (uapi / f"{link}.sock").unlink(missing_ok=True)
    (uapi / f"{link}.sock").symlink_to(UAPI_DIR / f"{lab.gw_iface}.sock")
    return {"interface": link, "backend": "uapi", "uapi_socket_dir": str(uapi)}


def configure(lab: Lab, n: int) -> list[str]:
    from bench.handshakes import configure as add_peers
    return [public for _, public in add_peers(lab, n)]


async def enroll(socket_path: Path, keys: list[str], secrets: list[bytes]) -> None:
    async with grpc.aio.secure_channel(f"unix:{socket_path}",
                                       grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)) as ch:
        stub = control_pb2_grpc.ControlServiceStub(ch)
        await stub.ApplyTeamPolicy(control_pb2.ApplyTeamPolicyRequest(policy=control_pb2.TeamPolicy(
            team_id=TEAM, version=1, scope=types_pb2.MFA_SCOPE_CLIENT_APP, roles=types_pb2.MFA_ROLES_ALL,
            totp_prior_connection=True)))
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                await stub.UpsertMember(control_pb2.UpsertMemberRequest(
                    member_id=f"m{i}", team_id=TEAM, role=types_pb2.MEMBER_ROLE_MEMBER, peer_public_keys=[keys[i]],
                    totp=control_pb2.TotpEnrollment(secret=secrets[i], digits=6)))

        await asyncio.gather(*(one(i) for i in range(len(keys))))


async def disconnect_team(socket_path: Path) -> None:
    async with grpc.aio.secure_channel(f"unix:{socket_path}",
                                       grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)) as ch:
        stub = control_pb2_grpc.ControlServiceStub(ch)
        await stub.Disconnect(control_pb2.DisconnectRequest(team_id=TEAM, reason="bench",
                                                            idempotency_key=os.urandom(8).hex()), timeout=60)


# ---- the client apps (run in the clients' namespace, several processes) ----------------------------------------

async def _prove(members: list[tuple[int, str]], concurrency: int, call: str) -> dict[str, Any]:
    """Connect every member's channel (a client app holds its connection while it watches its status), say
    "ready", wait for the go line on stdin, then submit the proofs with `concurrency` in flight."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    channels: list[tuple[grpc.aio.Channel, int, str]] = []

    async def connect(i: int, secret_b32: str) -> None:
        async with sem:
            ch = grpc.aio.insecure_channel(f"{target_ip(i)}:{PORT}")
            try:
                await asyncio.wait_for(ch.channel_ready(), 10)
            except TimeoutError:
                outcomes["no_connection"] = outcomes.get("no_connection", 0) + 1
                await ch.close()
                return
            channels.append((ch, i, secret_b32))

    async def one(ch: grpc.aio.Channel, secret_b32: str) -> None:
        async with sem:
            code = pyotp.TOTP(secret_b32).now()
            started = time.perf_counter()
            try:
                if call == "health":
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
                    outcome = "accepted"
                else:
                    result = await challenge_pb2_grpc.ChallengeServiceStub(ch).SubmitTotp(
                        challenge_pb2.SubmitTotpRequest(code=code), timeout=30)
                    outcome = "accepted" if result.accepted else "refused"
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            latencies.append(time.perf_counter() - started)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    sem = asyncio.Semaphore(64)
    await asyncio.gather(*(connect(i, s) for i, s in members))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    sem = asyncio.Semaphore(concurrency)
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(ch, s) for ch, _, s in channels))
    seconds = time.perf_counter() - started
    return {"latencies": latencies, "outcomes": outcomes, "seconds": seconds, "cpu": time.process_time() - cpu}


HEALTH_PATH = "/grpc.health.v1.Health/Check"
TOTP_PATH = "/gatewayd.v1.ChallengeService/SubmitTotp"


async def _prove_lean(members: list[tuple[int, str]], concurrency: int, call: str) -> dict[str, Any]:
    """As _prove, through bench.h2client: every call's frames encoded at the go line (the TOTP codes of the
    current step; the daemon accepts one step on each side), `concurrency` workers taking the next member."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    connections: list[tuple[h2client.Connection, int, str]] = []
    sem = asyncio.Semaphore(64)

    async def connect(i: int, secret_b32: str) -> None:
        async with sem:
            try:
                _, conn = await asyncio.wait_for(loop.create_connection(h2client.Connection, target_ip(i), PORT), 10)
                await asyncio.wait_for(conn.ready, 10)
            except (OSError, TimeoutError):
                outcomes["no_connection"] = outcomes.get("no_connection", 0) + 1
                return
            connections.append((conn, i, secret_b32))

    await asyncio.gather(*(connect(i, s) for i, s in members))
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    path = HEALTH_PATH if call == "health" else TOTP_PATH
    calls = []
    for conn, i, secret in connections:
        message = (health_pb2.HealthCheckRequest() if call == "health"
                   else challenge_pb2.SubmitTotpRequest(code=pyotp.TOTP(secret).now())).SerializeToString()
        calls.append((conn, h2client.unary(1, h2client.request_headers(f"{target_ip(i)}:{PORT}", path), message)))
    todo = iter(calls)

    async def worker() -> None:
        for conn, frames in todo:
            started = time.perf_counter()
            try:
                answer = await asyncio.wait_for(conn.call(frames), 30)
            except TimeoutError:
                answer = None
            latencies.append(time.perf_counter() - started)
            if answer is None:
                outcome = "grpc_error"
            elif call == "health":
                outcome = "accepted"
            else:
                outcome = "accepted" if challenge_pb2.ProofResult.FromString(answer).accepted else "refused"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return {"latencies": latencies, "outcomes": outcomes, "seconds": seconds, "cpu": time.process_time() - cpu}


def client_main(argv: list[str]) -> int:
    """`python -m bench.proofs client <concurrency> <totp|health> <grpc|lean> <report path>`: members as JSON
    lines [i, secret] on stdin up to an empty line, then the go line; the report as JSON to the path."""
    import resource

    import uvloop
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    members: list[tuple[int, str]] = []
    for line in sys.stdin:
        if not line.strip():
            break
        i, secret = json.loads(line)
        members.append((i, secret))
    run_calls = _prove_lean if argv[2] == "lean" else _prove
    result = uvloop.run(run_calls(members, int(argv[0]), argv[1]))
    # The report goes to a file: on the inherited pipe (which the event loop or gRPC may leave non-blocking)
    # a report larger than its 64 KiB, written while the parent read another client's, was cut short.
    Path(argv[3]).write_text(json.dumps(result))
    # Thousands of open channels: tearing gRPC down can take long (or crash) after the answer is written.
    os._exit(0)


def prove(ns: str, members: list[tuple[int, str]], concurrency: int, gw: LabGateway, processes: int = 2,
          call: str = "totp", client: str = "grpc") -> dict[str, Any]:
    """The members' proofs from `processes` client processes sharing `concurrency` calls in flight, once every
    channel is connected; with the daemon's CPU time over the calls."""
    processes = max(1, min(processes, concurrency))
    shares = [members[k::processes] for k in range(processes)]
    per = [concurrency // processes + (1 if k < concurrency % processes else 0) for k in range(processes)]
    reports = [Path(tempfile.gettempdir()) / f"gatewayd-bench-client-{os.getpid()}-{k}.json" for k in range(processes)]
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "bench.proofs", "client", str(c), call,
                              client, str(report)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for c, report in zip(per, reports, strict=True)]
    for proc, share in zip(procs, shares, strict=True):
        assert proc.stdin is not None
        proc.stdin.write("".join(json.dumps(m) + "\n" for m in share) + "\n")
        proc.stdin.flush()
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a client process failed")
    cpu, threads, stolen, helpers = daemon_cpu(gw), daemon_threads_cpu(gw), steal(), workers_cpu(gw)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
    results = []
    for proc, report in zip(procs, reports, strict=True):
        if proc.wait(120) != 0:
            raise RuntimeError(f"a client process failed with {proc.returncode}")
        results.append(json.loads(report.read_text()))
        report.unlink()
    cpu = daemon_cpu(gw) - cpu
    helpers = workers_cpu(gw) - helpers
    stolen_jiffies, all_jiffies = (after - before for after, before in zip(steal(), stolen, strict=True))
    calls = sum(r["outcomes"].get("accepted", 0) for r in results) or 1
    by_thread = {name: round((seconds - threads.get(name, 0.0)) * 1000 / calls, 3)
                 for name, seconds in daemon_threads_cpu(gw).items() if seconds - threads.get(name, 0.0) > 0}
    latencies = [x for r in results for x in r["latencies"]]
    outcomes: dict[str, int] = {}
    for r in results:
        for k, v in r["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    busy = max(r["seconds"] for r in results)
    return {"client": client, "concurrency": concurrency, "members": len(members), "client_processes": processes,
            "outcomes": outcomes, "accepted_per_s": outcomes.get("accepted", 0) / busy, "seconds": busy,
            "daemon_cpu_ms_per_call": cpu * 1000 / max(1, len(latencies)),
            "daemon_cpu_ms_per_accepted_call_by_thread": by_thread,
            "workers_cpu_ms_per_call": round(helpers * 1000 / max(1, len(latencies)), 3),
            "client_cpu_ms_per_call": round(sum(r["cpu"] for r in results) * 1000 / max(1, len(latencies)), 3),
            "latency": summary(latencies),
            "cpu_stolen_by_the_host": round(stolen_jiffies / max(1, all_jiffies), 3)}


def steal() -> tuple[int, int]:
    """(steal, all) jiffies of the machine so far: the share of CPU time the hypervisor gave other guests."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7], sum(fields)


def daemon_cpu(gw: LabGateway) -> float:
    return sum(daemon_threads_cpu(gw).values())


def gw_workers(gw: LabGateway) -> list[int]:
    """The daemon's child processes: its challenge workers."""
    assert gw.proc is not None
    children: list[int] = []
    for task in Path(f"/proc/{gw.proc.pid}/task").glob("*/children"):
        try:
            children += map(int, task.read_text().split())
        except FileNotFoundError:
            continue  # the thread ended meanwhile
    return sorted(children)


def workers_cpu(gw: LabGateway) -> float:
    """CPU seconds of the challenge workers (all their threads)."""
    total = 0.0
    for pid in gw_workers(gw):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def daemon_threads_cpu(gw: LabGateway) -> dict[str, float]:
    """CPU seconds of the daemon's threads by thread name ("event_loop", Python's other threads "python",
    gRPC's "event_engine")."""
    assert gw.proc is not None
    # The daemon runs under `ip netns exec` (which execs it): the pid is the daemon's.
    out: dict[str, float] = {}
    for task in Path(f"/proc/{gw.proc.pid}/task").iterdir():
        try:
            name, _, rest = task.joinpath("stat").read_text().partition(" (")[2].rpartition(")")
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        if task.name == str(gw.proc.pid):
            name = "event_loop"  # the main thread; Python's other threads (SQLite, nftables writer) are "python"
        fields = rest.split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def quarantined(ns: str) -> int:
    out = run("nft", "-j", "list", "set", "inet", "gatewayd", "quarantine4", ns=ns).stdout
    return sum(len(i["set"].get("elem", [])) for i in json.loads(out)["nftables"] if "set" in i)


def wait_next_step() -> None:
    time.sleep(30 - time.time() % 30 + 0.5)


def by_hand(ns: str, keys_ips: list[tuple[str, str]], secrets: list[str], calls: int) -> dict[str, Any]:
    """The hand-scripted way: check the code with pyotp, then one `nft delete element` per proof."""
    latencies = []
    for (_, ip), secret in list(zip(keys_ips, secrets, strict=True))[:calls]:
        started = time.perf_counter()
        totp = pyotp.TOTP(secret)
        assert totp.verify(totp.now(), valid_window=1)
        run("nft", "delete", "element", "inet", "gatewayd", "quarantine4", "{", ip, "}", ns=ns)
        latencies.append(time.perf_counter() - started)
    return {"calls": calls, "per_s": calls / sum(latencies), "latency": summary(latencies)}


def run_bench(n: int, profile: Path | None, workers: list[int]) -> dict[str, Any]:
    lab = Lab(peers_wanted=0)
    out: dict[str, Any] = {"members": n}
    with lab.running():
        clients = f"gwd{lab.tag}-c"
        keys = configure(lab, n)
        wire(lab, clients, n)
        raw = [os.urandom(20) for _ in range(n)]
        secrets = [base64.b32encode(s).decode() for s in raw]
        members = list(enumerate(secrets))
        for k, count in enumerate(workers):
            gw = LabGateway(lab, challenge={"listen": [f"0.0.0.0:{PORT}"], "workers": count}, wireguard=as_tunnel(lab))
            gw.start(timeout=120)
            try:
                if k == 0:
                    asyncio.run(enroll(lab.workdir / "control.sock", keys, raw))
                else:
                    wait_next_step()  # the previous runs spent this step's codes
                key = "gatewayd" if count == 0 else f"gatewayd_{count}_workers"
                out[key] = runs_on(gw, clients, members, profile if k == 0 else None, grpcio=count == 0)
                asyncio.run(disconnect_team(lab.workdir / "control.sock"))
            finally:
                gw.stop()
        out["by_hand"] = by_hand(lab.gw_ns, [(k, tunnel_ip(i)) for i, k in enumerate(keys)], secrets, 200)
        for key, value in list(out.items()):
            if key.startswith("gatewayd"):
                out[f"ratio_c64_to_by_hand_{key}"] = value["runs"][0]["accepted_per_s"] / out["by_hand"]["per_s"]
    return out


def runs_on(gw: LabGateway, clients: str, members: list[tuple[int, str]], profile: Path | None, grpcio: bool
            ) -> dict[str, Any]:
    """The baseline (health checks) and the proofs at c64, c16 and c1 (and c64 with grpc.aio clients if
    `grpcio`) against one started gateway whose members are all quarantined."""
    n = len(members)
    out: dict[str, Any] = {"workers": gw_workers(gw)}
    out["quarantined_before"] = quarantined(gw.lab.gw_ns)
    out["grpc_baseline"] = prove(clients, members, 64, gw, processes=1, call="health", client="lean")
    if grpcio:
        out["grpc_baseline_grpcio_clients"] = prove(clients, members, 64, gw, call="health")
    with Spy(lambda: gw.proc.pid if gw.proc else None, profile, rate=1000):
        time.sleep(1 if profile else 0)
        runs = [prove(clients, members, 64, gw, processes=1, client="lean")]
    out["quarantined_after_c64"] = quarantined(gw.lab.gw_ns)
    later = ((64, n, "grpc"),) if grpcio else ()
    for concurrency, count, client in (*later, (16, min(n, 2000), "lean"), (1, min(n, 300), "lean")):
        asyncio.run(disconnect_team(gw.lab.workdir / "control.sock"))
        wait_next_step()
        runs.append(prove(clients, members[:count], concurrency, gw, processes=2 if client == "grpc" else 1,
                          client=client))
    out["runs"] = runs
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "client":
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--profile", type=Path, help="py-spy raw (collapsed) stacks of the c64 run to this file")
    parser.add_argument("--out", type=Path, default=Path("bench/proofs.json"))
    parser.add_argument("--workers", default="0,1,2",
                        help="challenge worker processes, one gateway per value (0: the daemon serves gRPC itself)")
    args = parser.parse_args(argv)
    if not is_root():
        return 1
    write_report(args.out, run_bench(args.members, args.profile, [int(w) for w in args.workers.split(",")]))
    return 0


if __name__ == "__main__":
    multiprocessing.freeze_support()
    sys.exit(main())
