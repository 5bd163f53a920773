"""The fleet lab: N real gatewayd processes sharing a real 3-member etcd cluster (mTLS), for the fleet tests and
benchmark. Everything lives in two namespaces the lab creates:

- F (gateways): the etcd members on F's loopback; gateway i's "WireGuard interface" is the veth `wgf<i>`, whose
  peers a UAPI emulator (gatewayd.lab.uapi) lists from a JSON file; its nftables table is `gwdfleet<i>` and its
  challenge listener answers on every address of 172.(20+i).0.0/16 (a local route), port 9443+i.
- C (client apps): member k's peer at gateway i has the tunnel address 10.(100+i).(k//250).(k%250+1) (local
  in C); it calls gateway i at 172.(20+i).(k//250).(k%250+1) through a route whose source is its tunnel
  address, so that gateway i identifies the caller as that peer.

WireGuard's data path is not part of this lab (the namespace lab with wireguard-go covers it): here the subject
is what gateways share. Addresses are only inside the lab's namespaces.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatewayd.lab.etcd import EtcdCluster
from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import Lab, run
from gatewayd.lab.pki import Authority

ETCD_PORTS = [(2379, 2380), (22379, 22380), (32379, 32380)]


def tunnel_ip(gateway: int, k: int) -> str:
    return f"10.{100 + gateway}.{k // 250}.{k % 250 + 1}"


def target_ip(gateway: int, k: int) -> str:
    return f"172.{20 + gateway}.{k // 250}.{k % 250 + 1}"


def challenge_port(gateway: int) -> int:
    return 9443 + gateway


def random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@dataclass
class FleetGateway:
    index: int
    lab: Lab
    """Its own scratch directory and processes (the namespace is the fleet's)."""
    gw: LabGateway
    peers_file: Path
    peers: dict[str, int] = field(default_factory=dict)
    """Configured peers: public key -> member slot k."""
    emulator: subprocess.Popen[bytes] | None = None

    @property
    def gw_id(self) -> str:
        """The gateway's id (LabGateway names it after its lab)."""
        return f"lab-{self.lab.tag}"

    @property
    def iface(self) -> str:
        return f"wgf{self.index}"

    def address_of(self, k: int) -> str:
        """Where the client app of slot k calls this gateway's challenge API."""
        return f"{target_ip(self.index, k)}:{challenge_port(self.index)}"


class FleetLab:
    def __init__(self, gateways: int = 3, *, tag: str | None = None, **overrides: dict[str, Any]) -> None:
        self.tag = tag or secrets.token_hex(2)
        self.ns, self.clients = f"gwdfl{self.tag}", f"gwdfl{self.tag}c"
        self.workdir = Path(tempfile.mkdtemp(prefix="gatewayd-fleet-"))
        self.size = gateways
        self.overrides = overrides
        self.gateways: list[FleetGateway] = []
        self._namespaces: list[str] = []
        self._routed: set[tuple[int, int]] = set()
        ca = Authority("fleet-ca")
        self.ca_file = self._write("ca.pem", ca.pem)
        cert, key = ca.issue("localhost", server=True, client_too=True)
        self.etcd = EtcdCluster(cert_file=self._write("etcd.pem", cert), key_file=self._write("etcd.key", key),
                                ca_file=self.ca_file, netns=self.ns, ports=ETCD_PORTS)
        self._client_certs = [ca.issue(f"gateway-{i}") for i in range(gateways)]

    def _write(self, name: str, data: bytes) -> Path:
        path = self.workdir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    # ---- building ---------------------------------------------------------------------------------

    def up(self) -> FleetLab:
        try:
            for name in (self.ns, self.clients):
                run("ip", "netns", "add", name)
                self._namespaces.append(name)
                run("ip", "link", "set", "lo", "up", ns=name)
            self.etcd.start()
            for i in range(self.size):
                self.gateways.append(self._gateway(i))
        except BaseException:
            self.down()
            raise
        return self

    def _gateway(self, i: int) -> FleetGateway:
        iface, peer_end = f"wgf{i}", f"cl{i}"
        run("ip", "link", "add", iface, "type", "veth", "peer", "name", peer_end, ns=self.ns)
        run("ip", "link", "set", peer_end, "netns", self.clients, ns=self.ns)
        link_gw, link_client = f"192.168.{100 + i}.1", f"192.168.{100 + i}.2"
        run("ip", "addr", "add", f"{link_gw}/24", "dev", iface, ns=self.ns)
        run("ip", "link", "set", iface, "up", ns=self.ns)
        run("ip", "addr", "add", f"{link_client}/24", "dev", peer_end, ns=self.clients)
        run("ip", "link", "set", peer_end, "up", ns=self.clients)
        run("ip", "route", "add", "local", f"172.{20 + i}.0.0/16", "dev", "lo", ns=self.ns)
        run("ip", "route", "add", f"10.{100 + i}.0.0/16", "via", link_client, ns=self.ns)
        run("ip", "route", "add", "local", f"10.{100 + i}.0.0/16", "dev", "lo", ns=self.clients)

        lab = Lab(peers_wanted=0)
        lab.gw_ns, lab.gw_iface = self.ns, iface
        uapi = lab.workdir / "uapi"
        uapi.mkdir()
        peers_file = lab.workdir / "peers.json"
        peers_file.write_text("[]")
        cert, key = self._client_certs[i]
        cert_file, key_file = self._write(f"gateway-{i}.pem", cert), self._write(f"gateway-{i}.key", key)
        fleet = {"endpoints": [f"127.0.0.1:{c}" for c, _ in ETCD_PORTS], "name": f"lab{self.tag}",
                 "ca_file": str(self.ca_file), "cert_file": str(cert_file), "key_file": str(key_file),
                 "server_name": "localhost", **self.overrides.get("fleet", {})}
        overrides = {
            **{k: v for k, v in self.overrides.items() if k not in ("fleet", "wireguard")},
            "wireguard": {"backend": "uapi", "uapi_socket_dir": str(uapi), "poll_interval": 0.5,
                          **self.overrides.get("wireguard", {})},
            "handshake": {"detect": False},
            "enforcement": {"table": f"gwdfleet{i}"},
            "challenge": {"listen": [f"0.0.0.0:{challenge_port(i)}"], "port": challenge_port(i)},
            "metrics": {"listen": ""},
            "fleet": fleet,
        }
        gw = LabGateway(lab, **overrides)
        emulator = lab.spawn(self.ns, sys.executable, "-m", "gatewayd.lab.uapi", str(uapi / f"{iface}.sock"),
                             str(peers_file), log="uapi.log")
        deadline = time.monotonic() + 20
        while not (uapi / f"{iface}.sock").exists():
            if time.monotonic() > deadline or emulator.poll() is not None:
                raise RuntimeError("the UAPI emulator did not start")
            time.sleep(0.05)
        return FleetGateway(index=i, lab=lab, gw=gw, peers_file=peers_file, emulator=emulator)

    # ---- peers ------------------------------------------------------------------------------------

    def connect(self, g: FleetGateway, public_key: str, k: int) -> None:
        """Configure peer `public_key` (member slot k) on gateway g's interface, as a WireGuard peer would be."""
        if (g.index, k) not in self._routed:
            run("ip", "route", "add", f"{target_ip(g.index, k)}/32", "via", f"192.168.{100 + g.index}.1", "src",
                tunnel_ip(g.index, k), ns=self.clients)
            self._routed.add((g.index, k))
        g.peers[public_key] = k
        self._write_peers(g)

    def connect_many(self, g: FleetGateway, keys: list[str]) -> None:
        """Configure many peers at once (slot = position), with their routes in one batch."""
        routes = "".join(f"route add {target_ip(g.index, k)}/32 via 192.168.{100 + g.index}.1 src "
                         f"{tunnel_ip(g.index, k)}\n" for k in range(len(keys)) if (g.index, k) not in self._routed)
        if routes:
            run("ip", "-batch", "-", ns=self.clients, input_=routes)
        self._routed.update((g.index, k) for k in range(len(keys)))
        g.peers.update({key: k for k, key in enumerate(keys)})
        self._write_peers(g)

    def disconnect(self, g: FleetGateway, public_key: str) -> None:
        g.peers.pop(public_key, None)
        self._write_peers(g)

    def _write_peers(self, g: FleetGateway) -> None:
        peers = [{"public_key": key, "allowed_ips": [f"{tunnel_ip(g.index, k)}/32"],
                  "endpoint": f"198.18.{g.index}.{k % 250 + 1}:51820"} for key, k in g.peers.items()]
        tmp = g.peers_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(peers))
        tmp.replace(g.peers_file)

    # ---- client apps ------------------------------------------------------------------------------

    def client(self, g: FleetGateway, k: int, *args: str, timeout: float = 30) -> dict[str, Any]:
        """Run a client-app command (gatewayd.lab.agent) as slot k towards gateway g; its JSON answer."""
        result = subprocess.run(["ip", "netns", "exec", self.clients, sys.executable, "-m", "gatewayd.lab.agent",
                                 args[0], "--gateway", g.address_of(k), *args[1:]],
                                capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return data

    def client_background(self, g: FleetGateway, k: int, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.clients, sys.executable, "-m", "gatewayd.lab.agent",
                                 args[0], "--gateway", g.address_of(k), *args[1:]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def quarantined(self, g: FleetGateway) -> set[str]:
        """The addresses in gateway g's IPv4 quarantine set, as the kernel has them."""
        out = run("nft", "-j", "list", "set", "inet", f"gwdfleet{g.index}", "quarantine4", ns=self.ns).stdout
        for item in json.loads(out)["nftables"]:
            if "set" in item:
                return {e if isinstance(e, str) else e["prefix"]["addr"] for e in item["set"].get("elem", [])}
        return set()

    # ---- teardown ---------------------------------------------------------------------------------

    def down(self) -> None:
        for g in self.gateways:
            with contextlib.suppress(Exception):
                g.gw.stop()
            g.lab.down()
        self.etcd.stop()
        for ns in reversed(self._namespaces):
            run("ip", "netns", "delete", ns, check=False)
        self._namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[FleetLab]:
        self.up()
        try:
            yield self
        finally:
            self.down()
