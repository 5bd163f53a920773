"""Benchmark: one gateway with 100,000 peers (wireguard-go caps a device at 65,536: an emulated UAPI socket).

The gateway is a namespace with a veth link named as the WireGuard interface, so rtnetlink and nftables see a
real interface, and a process that answers WireGuard's UAPI on the socket gatewayd reads (`get=1`: 100,000
peers, each with a key, an endpoint, a tunnel /32 and counters, as wireguard-go prints them; `set=1`: accepted
and counted). Every peer belongs to a member (with a TOTP secret) of one team without a connection policy, so
that all are admitted and a team Disconnect has 100,000 peers to quarantine; members are stored by gatewayd's
own store code (SqliteState, sealed secrets) before the daemon starts: enrolling 100,000 members over gRPC is
not what is measured here.

Measured: start -> READY with the members stored (first start) and again with members and peers stored
(restart), and until the first read after READY decided every peer; the daemon's RSS once settled and the
Python heap per peer (tracemalloc, in-process: the core's state and one snapshot for 100,000 members and
peers); a team Disconnect of all 100,000 members: call -> all in the kernel's quarantine set (watched from
a thread: the last peer's address, the set being written in one transaction) and call -> answer (enforced,
sessions reset, committed), checked against the kernel's set. Also the hand-scripted way: one `nft add
element` transaction listing every tunnel address (what an admin script that knows the addresses does).
Writes JSON. Run as root: `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import grpc

from bench.common import Spy, is_root, write_report
from bench.disconnect import tunnel_ip
from gatewayd.lab import uapi
from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import Lab, run
from gatewayd.v1 import control_pb2, control_pb2_grpc

TEAM = "everyone"


def peer_key(i: int) -> bytes:
    return (i + 1).to_bytes(4, "big") + b"\x5a" * 28


def uapi_answer(n: int) -> bytes:
    """A `get=1` answer for n peers, as wireguard-go prints it."""
    lines = [f"private_key={'11' * 32}", "listen_port=51820"]
    for i in range(n):
        lines += [f"public_key={peer_key(i).hex()}", "preshared_key=" + "0" * 64,
                  "protocol_version=1", f"endpoint=198.18.{i // 250 % 250}.{i % 250 + 1}:51820",
                  "last_handshake_time_sec=0", "last_handshake_time_nsec=0", "tx_bytes=0", "rx_bytes=0",
                  "persistent_keepalive_interval=0", f"allowed_ip={tunnel_ip(i)}/32"]
    return ("\n".join(lines) + "\nerrno=0\n\n").encode()


def serve_uapi(path: str, n: int) -> None:
    """`python -m bench.scale uapi <socket> <peers>`: the emulated device, until SIGTERM."""
    answer = uapi_answer(n)
    uapi.serve(path, lambda: answer)


async def fill_store(database: Path, key_file: Path, n: int) -> None:
    """n members of one team, each with one peer and a TOTP secret, written by gatewayd's own store code."""
    from gatewayd.adapters.sqlite.database import Database
    from gatewayd.adapters.sqlite.secretbox import SecretBox
    from gatewayd.adapters.sqlite.state import SqliteState
    from gatewayd.auth.totp import TotpFactor
    from gatewayd.core.model import Role, Roles, Scope, TeamPolicy

    db = Database(database)
    await db.open()
    state = SqliteState(db, SecretBox(key_file.read_bytes()))
    await db.begin()
    await state.save_team(TeamPolicy(team_id=TEAM, version=1, scope=Scope.CLIENT_APP, roles=Roles.ALL,
                                     totp_prior_connection=False, device_prior_connection=False,
                                     reverify_interval=0.0))
    for i in range(n):
        member = f"m{i}"
        await state.save_member(member, TEAM, Role.MEMBER, [base64.b64encode(peer_key(i)).decode()])
        await state.save_totp(member, "active", TotpFactor(secret=os.urandom(20)))
    await db.commit()
    await db.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def quarantined_count(ns: str, name: str = "quarantine4") -> int:
    out = run("nft", "-j", "list", "set", "inet", "gatewayd", name, ns=ns).stdout
    return sum(len(i["set"].get("elem", [])) for i in json.loads(out)["nftables"] if "set" in i)


def settled(ns: str, n: int, since: float, timeout: float = 600) -> float:
    """Seconds from `since` until all n peers are in the tracked sets (the first read after READY decided them);
    the answer is late by up to one listing (~0.3 s at 100,000)."""
    deadline = time.monotonic() + timeout
    while quarantined_count(ns, "tracked4") < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not all {n} peers quarantined after {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - since


class Enforced(threading.Thread):
    """Notes when traffic from `address` stops reaching the gateway: a datagram every 0.5 ms from that address
    (made local to the gateway namespace) to a receiver on loopback, which the quarantine rule rejects once the
    address is in the set. (Asking nftables instead costs a core: `nft get element` of an absent element lists
    the whole set, 0.3 s CPU at 100,000.)"""

    def __init__(self, ns: str, address: str) -> None:
        super().__init__(daemon=True)
        self.ns, self.address = ns, address
        self.last: float | None = None
        """When the last datagram arrived."""
        self.sent = self.received = 0
        self._done = threading.Event()
        run("ip", "addr", "add", f"{address}/32", "dev", "lo", ns=ns)
        self.ready = threading.Event()

    def run(self) -> None:
        import socket

        from gatewayd.lab.netlab import entered
        with entered(self.ns):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rx.bind(("127.0.0.1", 0))
            rx.setblocking(False)
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx.bind((self.address, 0))
        self.ready.set()
        while not self._done.is_set():
            with contextlib.suppress(OSError):  # rejected: ICMP errors surface on the sender
                tx.sendto(b"probe", rx.getsockname())
                self.sent += 1
            while True:
                try:
                    rx.recv(64)
                except BlockingIOError:
                    break
                self.received += 1
                self.last = time.perf_counter()
            time.sleep(0.0005)
        rx.close()
        tx.close()

    def finish(self) -> None:
        self._done.set()
        self.join(10)


async def team_disconnect(socket_path: Path) -> float:
    async with grpc.aio.secure_channel(f"unix:{socket_path}",
                                       grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)) as ch:
        stub = control_pb2_grpc.ControlServiceStub(ch)
        started = time.perf_counter()
        await stub.Disconnect(control_pb2.DisconnectRequest(team_id=TEAM, reason="bench",
                                                            idempotency_key=os.urandom(8).hex()), timeout=120)
        return time.perf_counter() - started


def heap_per_peer(n: int) -> dict[str, float]:
    """The core's state for n members and peers, measured with tracemalloc in this process."""
    from gatewayd.core.model import Member, PeerRecord, PeerState, ProofKind, Role, Roles, Scope, TeamPolicy
    from gatewayd.core.state import CoreConfig, GatewayState
    from gatewayd.core.tracking import PeerSnapshot

    keys = [base64.b64encode(peer_key(i)).decode() for i in range(n)]
    team = TeamPolicy(team_id=TEAM, version=1, scope=Scope.CLIENT_APP, roles=Roles.ALL,
                      totp_prior_connection=True, device_prior_connection=False, reverify_interval=0.0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    core = GatewayState(CoreConfig())
    members = [Member(member_id=f"m{i}", team_id=TEAM, role=Role.MEMBER, peers=(keys[i],),
                      factors=frozenset(), locked=False) for i in range(n)]
    records = [PeerRecord(public_key=keys[i], state=PeerState.QUARANTINED, owes=frozenset([ProofKind.OTP]),
                          owes_since=0.0, proven_at=None, locked_reason=None, allowed_ips=(f"{tunnel_ip(i)}/32",),
                          session_started_at=None, last_handshake=None, step_up=False, admitted_at=None)
               for i in range(n)]
    core.restore([team], members, records, now=time.time())
    del members, records
    snapshots = {keys[i]: PeerSnapshot(public_key=keys[i], endpoint="198.18.0.1:51820",
                                       allowed_ips=(f"{tunnel_ip(i)}/32",), last_handshake=None, keepalive=0)
                 for i in range(n)}
    core_bytes = tracemalloc.get_traced_memory()[0] - before
    del snapshots
    tracemalloc.stop()
    return {"peers": n, "core_and_one_snapshot_bytes_per_peer": core_bytes / n}


def run_bench(n: int, profile: Path | None = None) -> dict[str, Any]:
    # Byte-code as an installed gatewayd has it (the package compiles it at install): a start then does not
    # compile gatewayd's modules (~0.3 s here, where PYTHONDONTWRITEBYTECODE may be set).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).resolve().parents[1] / "gatewayd")],
                   check=True)
    lab = Lab(peers_wanted=0)
    out: dict[str, Any] = {"peers": n}
    lab.workdir.mkdir(parents=True, exist_ok=True)
    ns = f"gwd{lab.tag}-gw"
    iface = f"gwd{lab.tag}"
    lab.gw_ns, lab.gw_iface = ns, iface
    emulator = None
    try:
        lab._netns(ns)
        run("ip", "link", "add", iface, "type", "veth", "peer", "name", f"{iface}x", ns=ns)  # no dummy module here
        run("ip", "addr", "add", "10.99.0.1/16", "dev", iface, ns=ns)
        run("ip", "link", "set", iface, "up", ns=ns)
        uapi = lab.workdir / "uapi"
        uapi.mkdir()
        sock = uapi / f"{iface}.sock"
        emulator = subprocess.Popen([sys.executable, "-m", "bench.scale", "uapi", str(sock), str(n)])
        deadline = time.monotonic() + 60
        while not sock.exists():
            if time.monotonic() > deadline or emulator.poll() is not None:
                raise RuntimeError("the UAPI emulator did not start")
            time.sleep(0.05)
        gw = LabGateway(lab, wireguard={"backend": "uapi", "uapi_socket_dir": str(uapi)},
                        handshake={"detect": False})
        filled = time.perf_counter()
        asyncio.run(fill_store(lab.workdir / "state.db", lab.workdir / "secrets.key", n))
        out["store_fill_seconds"] = time.perf_counter() - filled
        started = time.monotonic()
        out["first_start_ready_seconds"] = gw.start(timeout=600)
        out["first_start_all_peers_decided_seconds"] = settled(ns, n, started)
        time.sleep(2)
        assert gw.proc is not None
        out["rss_mb_after_first_start"] = rss_mb(gw.proc.pid)
        out["tracked_after_first_start"] = quarantined_count(ns, "tracked4")
        gw.stop()
        with Spy(lambda: gw.proc.pid if gw.proc else None, profile and profile.with_suffix(".start.raw")):
            started = time.monotonic()
            out["restart_ready_seconds"] = gw.start(timeout=600)
        time.sleep(5)  # the first read after READY
        assert gw.proc is not None
        out["rss_mb_after_restart"] = rss_mb(gw.proc.pid)
        out["quarantined_before_disconnect"] = quarantined_count(ns)
        out["tracked_after_restart"] = quarantined_count(ns, "tracked4")
        with Spy(lambda: gw.proc.pid if gw.proc else None, profile and profile.with_suffix(".disconnect.raw")):
            time.sleep(1 if profile else 0)
            watch = Enforced(ns, tunnel_ip(n - 1))
            watch.start()
            watch.ready.wait(10)
            time.sleep(0.2)
            started = time.perf_counter()
            out["team_disconnect_answer_seconds"] = asyncio.run(team_disconnect(lab.workdir / "control.sock"))
            time.sleep(0.2)
            watch.finish()
            out["team_disconnect_enforced_seconds"] = watch.last - started if watch.last else None
            out["probe_datagrams_sent_received"] = [watch.sent, watch.received]
        out["quarantined_after_disconnect"] = quarantined_count(ns)
        out["rss_mb_after_disconnect"] = rss_mb(gw.proc.pid)
        time.sleep(5)  # the allocator's free pages are returned 2 s after a bulk batch
        out["rss_mb_after_disconnect_settled"] = rss_mb(gw.proc.pid)
        gw.stop()
        # gatewayd's own large transactions must not read as someone else's change (a lost notification is
        # verified as possible drift): both starts and the team Disconnect, from the daemon's log.
        logged = (lab.workdir / "gatewayd.log").read_text(errors="replace")
        out["monitor_notifications_lost"] = logged.count("nftables notifications lost")
        out["drift_repairs_reported"] = logged.count("enforcement drift repaired")
        # By hand: one `nft` process adding every address to the emptied set.
        run("nft", "flush", "set", "inet", "gatewayd", "quarantine4", ns=ns)
        elements = ", ".join(tunnel_ip(i) for i in range(n))
        started = time.perf_counter()
        run("nft", "-f", "-", ns=ns, input_=f"add element inet gatewayd quarantine4 {{ {elements} }}\n")
        out["by_hand_one_nft_transaction_seconds"] = time.perf_counter() - started
    finally:
        if emulator is not None:
            emulator.terminate()
            emulator.wait(10)
        lab.down()
    out["heap"] = heap_per_peer(n)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "uapi":
        serve_uapi(argv[1], int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("bench/scale.json"))
    parser.add_argument("--profile", type=Path, help="py-spy raw stacks of the restart and the team Disconnect: "
                        "<profile>.start.raw, <profile>.disconnect.raw")
    args = parser.parse_args(argv)
    if not is_root():
        return 1
    write_report(args.out, run_bench(args.peers, args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
