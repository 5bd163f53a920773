"""Kernel WireGuard over generic netlink (pyroute2).

pyroute2's async classes do not work under uvloop (netlink sockets are refused), so its sync classes run in
a worker thread. Kernel WireGuard is absent on the machines this project is tested on: the decoding of
device messages is tested; the socket calls are exercised only where the module exists.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from gatewayd.core.tracking import PeerSnapshot, Traffic
from gatewayd.ports import InterfaceIdentity
from gatewayd.scheduling import Pause, no_pause


def _family_exists() -> bool:
    from pyroute2 import WireGuard
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with WireGuard():
            return True
    except NetlinkError:
        return False


def family_exists() -> bool:
    """Whether the kernel's "wireguard" genetlink family exists. pyroute2's sync classes run their own event
    loop, which fails on a thread whose loop is running: the probe always runs on a worker thread."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_family_exists).result()


def _endpoint(attr: Any) -> str | None:
    if attr is None:
        return None
    addr, port = attr["addr"], attr["port"]
    if ipaddress.ip_address(addr).version == 6:
        return sys.intern(f"[{addr}]:{port}")
    if addr == "0.0.0.0" and port == 0:
        return None
    return sys.intern(f"{addr}:{port}")  # interned as adapters/wireguard/uapi.py does


def decode_device(messages: Iterable[Any]) -> dict[str, PeerSnapshot]:
    """Peer snapshots from WG_CMD_GET_DEVICE answers (a device's peers may span several messages)."""
    peers: dict[str, PeerSnapshot] = {}
    for msg in messages:
        for peer in msg.get_attrs("WGDEVICE_A_PEERS") or []:
            items = peer if isinstance(peer, list) else [peer]
            for p in items:
                key = p.get_attr("WGPEER_A_PUBLIC_KEY")
                key = sys.intern(key.decode() if isinstance(key, bytes) else key)  # as adapters/wireguard/uapi.py
                hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
                when = hs["tv_sec"] + hs["tv_nsec"] / 1e9 if hs and hs["tv_sec"] else None
                allowed = tuple(sys.intern(str(ipaddress.ip_network(a["addr"], strict=False)))
                                for a in (p.get_attr("WGPEER_A_ALLOWEDIPS") or []) if a.get("addr"))
                psk = p.get_attr("WGPEER_A_PRESHARED_KEY")
                psk_raw = None
                if psk:
                    import base64

                    raw = base64.b64decode(psk)
                    psk_raw = raw if any(raw) else None
                prev = peers.get(key)
                peers[key] = PeerSnapshot(
                    public_key=key, endpoint=_endpoint(p.get_attr("WGPEER_A_ENDPOINT")),
                    allowed_ips=(prev.allowed_ips if prev else ()) + allowed, last_handshake=when,
                    traffic=Traffic(p.get_attr("WGPEER_A_RX_BYTES") or 0, p.get_attr("WGPEER_A_TX_BYTES") or 0),
                    keepalive=p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0, preshared_key=psk_raw)
    return peers


def device_identity(messages: Iterable[Any]) -> InterfaceIdentity | None:
    """The private key and listen port from WG_CMD_GET_DEVICE answers (None without a key)."""
    import base64

    for msg in messages:
        key = msg.get_attr("WGDEVICE_A_PRIVATE_KEY")
        if key:
            raw = base64.b64decode(key) if isinstance(key, (str, bytes)) and len(key) == 44 else bytes(key)
            if len(raw) == 32 and any(raw):
                return InterfaceIdentity(private_key=raw,
                                         listen_port=msg.get_attr("WGDEVICE_A_LISTEN_PORT") or 0)
    return None


class KernelWireGuard:
    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.read_seconds = 0.0
        self._identity: InterfaceIdentity | None = None

    def _read(self) -> dict[str, PeerSnapshot]:
        from pyroute2 import WireGuard

        with WireGuard() as wg:
            answers = list(wg.info(self.interface))
        self._identity = device_identity(answers)
        return decode_device(answers)

    async def identity(self) -> InterfaceIdentity | None:
        if self._identity is None:
            await self.read()
        return self._identity

    async def read(self, pause: Pause = no_pause) -> dict[str, PeerSnapshot]:
        await pause()  # the dump itself runs in a worker thread, in chunks the kernel locks one at a time
        asked = time.perf_counter()
        try:
            return await asyncio.to_thread(self._read)
        finally:
            self.read_seconds = time.perf_counter() - asked

    def _reset(self, peers: Sequence[PeerSnapshot]) -> None:
        import base64

        from pyroute2 import WireGuard

        with WireGuard() as wg:
            for p in peers:
                wg.set(self.interface, peer={"public_key": p.public_key, "remove": True})
                spec: dict[str, Any] = {"public_key": p.public_key, "allowed_ips": list(p.allowed_ips),
                                        "persistent_keepalive": p.keepalive}
                if p.preshared_key:
                    spec["preshared_key"] = base64.b64encode(p.preshared_key).decode()
                if p.endpoint:
                    host, _, port = p.endpoint.rpartition(":")
                    spec["endpoint_addr"], spec["endpoint_port"] = host.strip("[]"), int(port)
                wg.set(self.interface, peer=spec)

    async def reset_sessions(self, peers: Sequence[PeerSnapshot]) -> None:
        await asyncio.to_thread(self._reset, peers)
