"""The nftables rules against real packets: a peer namespace reaches a gateway namespace over a link named like
the WireGuard interface, and an upstream server namespace behind the gateway. What may reach the gateway itself
from a quarantined or an undecided (untracked) tunnel address is TCP to the challenge port and nothing else: no
ICMP echo, no UDP, no other TCP port, on IPv4 and IPv6; nothing is forwarded to the server, and nothing from the
server reaches the peer. A decided, authorized peer reaches all of it (the probes can see traffic)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from gatewayd.adapters.nftables import NftEnforcer
from tests.netns import inside, namespace

pytestmark = pytest.mark.kernel

CHALLENGE, OTHER_TCP, UDP = 9443, 8080, 5353
PEER = {4: "10.77.0.2", 6: "fd77::2"}
GATEWAY = {4: "10.77.0.1", 6: "fd77::1"}
SERVER = {4: "10.78.0.2", 6: "fd78::2"}
UPLINK = {4: "10.78.0.1", 6: "fd78::1"}


def sh(ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def linked() -> Iterator[tuple[str, str, str]]:
    """(gateway, peer, server) namespaces: the peer on a veth whose gateway end is called wg0, the server on
    another link; the gateway forwards between them."""
    with namespace() as gw, namespace() as peer, namespace() as server:
        subprocess.run(["ip", "link", "add", "wg0", "netns", gw, "type", "veth", "peer", "name", "eth0",
                        "netns", peer], check=True)
        subprocess.run(["ip", "link", "add", "up0", "netns", gw, "type", "veth", "peer", "name", "eth0",
                        "netns", server], check=True)
        for ns, dev, v in ((gw, "wg0", GATEWAY), (peer, "eth0", PEER), (gw, "up0", UPLINK), (server, "eth0", SERVER)):
            sh(ns, "ip", "addr", "add", f"{v[4]}/24", "dev", dev)
            sh(ns, "ip", "addr", "add", f"{v[6]}/64", "dev", dev, "nodad")
            sh(ns, "ip", "link", "set", dev, "up")
        for ns, via in ((peer, GATEWAY), (server, UPLINK)):
            sh(ns, "ip", "route", "add", "default", "via", via[4])
            sh(ns, "ip", "-6", "route", "add", "default", "via", via[6])
        sh(gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh(gw, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        yield gw, peer, server


@contextlib.contextmanager
def listeners(ns: str) -> Iterator[dict[str, socket.socket]]:
    """TCP on the challenge port and another port, UDP on one port; dual-stack, in a namespace."""
    socks: dict[str, socket.socket] = {}
    with inside(ns):
        for name, kind, port in (("challenge", socket.SOCK_STREAM, CHALLENGE), ("tcp", socket.SOCK_STREAM, OTHER_TCP),
                                 ("udp", socket.SOCK_DGRAM, UDP)):
            s = socket.socket(socket.AF_INET6, kind)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", port))
            if kind == socket.SOCK_STREAM:
                s.listen(16)
            s.settimeout(0.5)
            socks[name] = s
    try:
        yield socks
    finally:
        for s in socks.values():
            s.close()


def _checksum(data: bytes) -> int:
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data) - 1, 2))
    if len(data) % 2:
        total += data[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo(peer: str, target: str, version: int) -> bool:
    """One ICMP echo request from a namespace (raw socket); True if the target's reply came back."""
    with inside(peer):
        if version == 4:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        else:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    request_type, reply_type = (8, 0) if version == 4 else (128, 129)
    body = (0x4242).to_bytes(2, "big") + (1).to_bytes(2, "big") + b"gatewayd-probe"
    header = bytes([request_type, 0]) + b"\0\0"
    packet = header[:2] + (_checksum(header + body) if version == 4 else 0).to_bytes(2, "big") + body  # v6: kernel
    sock.settimeout(1.0)
    try:
        sock.sendto(packet, (target, 0))
        while True:
            data, source = sock.recvfrom(2048)
            icmp = data[(data[0] & 0x0F) * 4:] if version == 4 else data
            if source[0] == target and icmp[0] == reply_type and icmp[4:6] == body[:2]:
                return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def reaches(peer: str, socks: dict[str, socket.socket], target: str, version: int) -> set[str]:
    """What of ICMP echo, UDP, TCP to the challenge port and TCP to another port gets to the target."""
    got = set()
    if echo(peer, target, version):
        got.add("icmp")
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    with inside(peer):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = {name: socket.socket(family, socket.SOCK_STREAM) for name in ("challenge", "tcp")}
    try:
        token = os.urandom(8)  # a late datagram of an earlier probe must not count for this one
        udp.sendto(token, (target, UDP))
        try:
            while socks["udp"].recvfrom(64)[0] != token:
                pass
            got.add("udp")
        except TimeoutError:
            pass
        for name, port in (("challenge", CHALLENGE), ("tcp", OTHER_TCP)):
            tcp[name].settimeout(1.0)
            try:
                tcp[name].connect((target, port))
                socks[name].accept()[0].close()
                got.add(name)
            except OSError:
                pass
    finally:
        udp.close()
        for s in tcp.values():
            s.close()
    return got


@pytest.mark.parametrize("version", [4, 6])
async def test_only_the_challenge_port_is_reachable_from_an_owing_or_undecided_peer(version: int) -> None:
    prefixes = {f"{PEER[4]}/32", f"{PEER[6]}/128"}
    with linked() as (gw, peer, server), listeners(gw) as at_gateway, listeners(server) as at_server, \
            listeners(peer) as at_peer:
        with inside(gw):
            enforcer = NftEnforcer(table="gatewayd", interface="wg0", challenge_port=CHALLENGE)

        async def state(quarantined: set[str], tracked: set[str]) -> tuple[set[str], set[str], set[str]]:
            with inside(gw):
                await enforcer.reconcile(quarantined, tracked)
            return (reaches(peer, at_gateway, GATEWAY[version], version),
                    reaches(peer, at_server, SERVER[version], version),
                    reaches(server, at_peer, PEER[version], version))

        everything = {"icmp", "udp", "challenge", "tcp"}
        await state(set(), prefixes)  # neighbour discovery on every link first (a first IPv6 packet may wait)
        assert await state(set(), prefixes) == (everything, everything, everything)  # decided and authorized
        assert await state(prefixes, prefixes) == ({"challenge"}, set(), set())  # quarantined
        assert await state(set(), set()) == ({"challenge"}, set(), set())  # not decided yet (untracked)
