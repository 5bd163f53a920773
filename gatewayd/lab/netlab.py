"""Build and tear down the namespace lab. Addresses live only inside namespaces the lab creates:
underlay 198.18.<n>.0/30 (RFC 2544 benchmarking range), server 198.19.0.0/24, tunnel 10.99.0.0/16 and fd99::/64."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

UAPI_DIR = Path("/var/run/wireguard")
WG_PORT = 51820
SERVER_IP = "198.19.0.2"
GATEWAY_TUNNEL_IP = "10.99.0.1"
GATEWAY_TUNNEL_IP6 = "fd99::1"
CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    pass


def keypair() -> tuple[str, str]:
    key = X25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(private).decode(), base64.b64encode(public).decode()


def run(*cmd: str, ns: str | None = None, check: bool = True, input_: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    result = subprocess.run(argv, capture_output=True, text=True, input=input_, check=False, timeout=60)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


@dataclass
class LabPeer:
    index: int
    """1-based."""
    ns: str
    """Network namespace."""
    iface: str
    """Its WireGuard interface."""
    private_key: str
    """Base64."""
    public_key: str
    """Base64."""

    @property
    def tunnel_ip(self) -> str:
        return f"10.99.{self.index // 250}.{self.index % 250 + 2}"

    @property
    def tunnel_ip6(self) -> str:
        return f"fd99::{self.index + 1:x}"

    @property
    def underlay_gw(self) -> str:
        return f"198.18.{self.index}.1"

    @property
    def underlay(self) -> str:
        return f"198.18.{self.index}.2"


@dataclass
class Lab:
    """The lab. `up()` builds it; `down()` removes every namespace, process and file it made."""

    peers_wanted: int = 2
    """Peer namespaces with their own wireguard-go."""
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    """Makes names unique so that labs never collide."""
    gateway_keepalive: int = 25
    """Keepalive the gateway configures for its peers (so a reset peer re-handshakes at once)."""
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gatewayd-lab-")))
    """Scratch files (keys, configs, logs)."""
    keep_files: bool = False
    """Keep the scratch files after `down()` (for debugging)."""

    def __post_init__(self) -> None:
        self.gw_ns, self.srv_ns = f"gwd{self.tag}-gw", f"gwd{self.tag}-srv"
        self.gw_iface = f"gwd{self.tag}"
        self.gw_private, self.gw_public = keypair()
        self.peers: list[LabPeer] = []
        for i in range(1, self.peers_wanted + 1):
            private, public = keypair()
            self.peers.append(LabPeer(index=i, ns=f"gwd{self.tag}-p{i}", iface=f"gwd{self.tag}p{i}",
                                      private_key=private, public_key=public))
        self._processes: list[subprocess.Popen[bytes]] = []
        self._namespaces: list[str] = []

    # ---- building ---------------------------------------------------------------------------------

    def up(self) -> Lab:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _netns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._namespaces.append(name)
        run("ip", "link", "set", "lo", "up", ns=name)

    def _wireguard_go(self, ns: str, iface: str) -> None:
        sock = UAPI_DIR / f"{iface}.sock"
        if sock.exists():
            raise LabError(f"{sock} exists: another wireguard-go uses {iface}")
        with open(self.workdir / f"{iface}.log", "wb") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, "wireguard-go", "-f", iface], stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "LOG_LEVEL": "error"})
        self._processes.append(proc)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"wireguard-go for {iface} did not start (see {log.name})")
            time.sleep(0.01)

    def _up(self) -> None:
        for tool in ("ip", "wireguard-go", "wg", "nft"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} is missing (make demo installs it)")
        self._netns(self.gw_ns)
        self._netns(self.srv_ns)
        run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.gw_ns)
        run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1", ns=self.gw_ns)
        # gateway <-> server
        run("ip", "link", "add", f"gwd{self.tag}s0", "netns", self.gw_ns, "type", "veth", "peer", "name",
            f"gwd{self.tag}s1", "netns", self.srv_ns)
        run("ip", "addr", "add", "198.19.0.1/24", "dev", f"gwd{self.tag}s0", ns=self.gw_ns)
        run("ip", "link", "set", f"gwd{self.tag}s0", "up", ns=self.gw_ns)
        run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", f"gwd{self.tag}s1", ns=self.srv_ns)
        run("ip", "link", "set", f"gwd{self.tag}s1", "up", ns=self.srv_ns)
        run("ip", "route", "add", "10.99.0.0/16", "via", "198.19.0.1", ns=self.srv_ns)
        # the gateway's WireGuard interface
        self._wireguard_go(self.gw_ns, self.gw_iface)
        key_file = self.workdir / "gw.key"
        key_file.write_text(self.gw_private)
        key_file.chmod(0o600)
        run("wg", "set", self.gw_iface, "private-key", str(key_file), "listen-port", str(WG_PORT), ns=self.gw_ns)
        run("ip", "addr", "add", f"{GATEWAY_TUNNEL_IP}/16", "dev", self.gw_iface, ns=self.gw_ns)
        run("ip", "addr", "add", f"{GATEWAY_TUNNEL_IP6}/64", "dev", self.gw_iface, ns=self.gw_ns)
        run("ip", "link", "set", self.gw_iface, "up", ns=self.gw_ns)
        for peer in self.peers:
            self._add_peer(peer)

    def _add_peer(self, peer: LabPeer, *, tunnel: LabPeer | None = None, client_keepalive: int = 25) -> None:
        """The peer's namespace, underlay link and wireguard-go. `tunnel`: use that peer's tunnel addresses and
        leave the gateway's configuration alone (another machine holding the same key)."""
        addresses = tunnel or peer
        self._netns(peer.ns)
        a, b = f"gwd{self.tag}u{peer.index}", f"gwd{self.tag}v{peer.index}"
        run("ip", "link", "add", a, "netns", self.gw_ns, "type", "veth", "peer", "name", b, "netns", peer.ns)
        run("ip", "addr", "add", f"{peer.underlay_gw}/30", "dev", a, ns=self.gw_ns)
        run("ip", "link", "set", a, "up", ns=self.gw_ns)
        run("ip", "addr", "add", f"{peer.underlay}/30", "dev", b, ns=peer.ns)
        run("ip", "link", "set", b, "up", ns=peer.ns)
        if tunnel is None:
            # The gateway knows the peer by key and tunnel addresses before the peer's first initiation; it
            # learns the endpoint from the handshake.
            run("wg", "set", self.gw_iface, "peer", peer.public_key, "allowed-ips",
                f"{peer.tunnel_ip}/32,{peer.tunnel_ip6}/128", "persistent-keepalive", str(self.gateway_keepalive),
                ns=self.gw_ns)
        self._wireguard_go(peer.ns, peer.iface)
        key_file = self.workdir / f"p{peer.index}.key"
        key_file.write_text(peer.private_key)
        key_file.chmod(0o600)
        run("wg", "set", peer.iface, "private-key", str(key_file), ns=peer.ns)
        self._client_peer(peer, keepalive=client_keepalive)
        run("ip", "addr", "add", f"{addresses.tunnel_ip}/32", "dev", peer.iface, ns=peer.ns)
        run("ip", "addr", "add", f"{addresses.tunnel_ip6}/128", "dev", peer.iface, ns=peer.ns)
        run("ip", "link", "set", peer.iface, "up", ns=peer.ns)
        for dest in ("10.99.0.1/32", "198.19.0.0/24"):
            run("ip", "route", "add", dest, "dev", peer.iface, ns=peer.ns)
        run("ip", "-6", "route", "add", "fd99::1/128", "dev", peer.iface, ns=peer.ns)

    def _client_peer(self, peer: LabPeer, *, keepalive: int) -> None:
        run("wg", "set", peer.iface, "peer", self.gw_public, "endpoint", f"{peer.underlay_gw}:{WG_PORT}",
            "allowed-ips", "10.99.0.1/32,fd99::1/128,198.19.0.0/24", "persistent-keepalive", str(keepalive),
            ns=peer.ns)

    def restart_client(self, peer: LabPeer, *, keepalive: int = 25) -> None:
        """What a client restart leaves: the same key and port, no session keys (the gateway peer is removed
        and added again on the client's interface). Its next packet starts a handshake.
        Handshake times have a resolution of one second (`wg show`): the restart waits until a second has passed
        since the latest handshake, so that the next one reads as later (`wait_handshake(after=...)`)."""
        time.sleep(max(0.0, self.handshake_of(peer) + 1.05 - time.time()))
        run("wg", "set", peer.iface, "peer", self.gw_public, "remove", ns=peer.ns)
        self._client_peer(peer, keepalive=keepalive)

    def set_client_keepalive(self, peer: LabPeer, seconds: int) -> None:
        run("wg", "set", peer.iface, "peer", self.gw_public, "persistent-keepalive", str(seconds), ns=peer.ns)

    def add_clone(self, peer: LabPeer) -> LabPeer:
        """Another machine holding `peer`'s key (its own namespace and underlay, the same tunnel addresses); the
        gateway's configuration is not changed. Quiet until it sends."""
        index = 200 + sum(1 for p in self.peers if p.index >= 200)
        clone = LabPeer(index=index, ns=f"gwd{self.tag}-c{index}", iface=f"gwd{self.tag}c{index}",
                        private_key=peer.private_key, public_key=peer.public_key)
        self.peers.append(clone)
        self._add_peer(clone, tunnel=peer, client_keepalive=0)
        return clone

    def add_peer(self) -> LabPeer:
        """A new peer namespace, configured on the gateway's interface now (as a control plane would)."""
        index = max((p.index for p in self.peers if p.index < 200), default=0) + 1
        private, public = keypair()
        peer = LabPeer(index=index, ns=f"gwd{self.tag}-p{index}", iface=f"gwd{self.tag}p{index}",
                       private_key=private, public_key=public)
        self.peers.append(peer)
        self._add_peer(peer)
        return peer

    # ---- running things ---------------------------------------------------------------------------

    def spawn(self, ns: str, *cmd: str, log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.workdir / log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        self._processes.append(proc)
        return proc

    def python(self, ns: str, module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `python -m module args` inside a namespace and wait for it."""
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", module, *args],
                              capture_output=True, text=True, timeout=timeout, check=False)

    @staticmethod
    def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Stop one process we started, by its PID."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def handshake_of(self, peer: LabPeer) -> float:
        """The gateway's latest handshake time with the peer, 0 if none."""
        out = run("wg", "show", self.gw_iface, "latest-handshakes", ns=self.gw_ns).stdout
        for line in out.splitlines():
            key, _, when = line.partition("\t")
            if key == peer.public_key:
                return float(when)
        return 0.0

    def wait_handshake(self, peer: LabPeer, after: float = 0.0, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            when = self.handshake_of(peer)
            if when > after:
                return when
            # Traffic makes the peer's wireguard-go handshake.
            self.nudge(peer)
            time.sleep(0.05)
        raise LabError(f"peer {peer.index} did not handshake")

    def nudge(self, peer: LabPeer) -> None:
        """Send one UDP datagram from the peer into the tunnel (discard port)."""
        code = ("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                f".sendto(b'x', ('{GATEWAY_TUNNEL_IP}', 9))")
        run(sys.executable, "-c", code, ns=peer.ns, check=False)

    # ---- teardown ---------------------------------------------------------------------------------

    def down(self) -> None:
        for proc in reversed(self._processes):
            self.stop(proc, timeout=5)
        self._processes.clear()
        for ns in reversed(self._namespaces):
            run("ip", "netns", "delete", ns, check=False)
        self._namespaces.clear()
        for iface in [self.gw_iface, *(p.iface for p in self.peers)]:
            with contextlib.suppress(FileNotFoundError):
                (UAPI_DIR / f"{iface}.sock").unlink()
        if not self.keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def namespaces(self) -> Sequence[str]:
        return list(self._namespaces)

    @contextlib.contextmanager
    def running(self) -> Iterator[Lab]:
        self.up()
        try:
            yield self
        finally:
            self.down()


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Move the calling thread into a network namespace (namespaces are per thread) and back afterwards.
    Sockets and child processes created meanwhile belong to that namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        yield
    finally:
        libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)
