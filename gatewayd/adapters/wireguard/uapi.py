"""The WireGuard cross-platform UAPI (wireguard-go and other userspace implementations).

Protocol: a unix stream socket; "get=1\n\n" answers key=value lines ending with "errno=N\n\n"; keys are hex.
One "set=1" operation can remove and re-add several peers: that is how session keys are dropped while the
peer's configuration (endpoint, preshared key, allowed IPs, keepalive) stays.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from gatewayd.core.tracking import PeerSnapshot

# ~325 bytes per peer: the reader's buffer must hold far more than asyncio's 64 KiB default.
READ_LIMIT = 64 * 1024 * 1024
ZERO_KEY = "0" * 64
PEERS_PER_SLICE = 500


class UapiError(OSError):
    pass


def hex_to_b64(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode()


def b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def parse_get(text: str) -> dict[str, PeerSnapshot]:
    """Decode a "get=1" answer into peer snapshots."""
    peers: dict[str, PeerSnapshot] = {}
    current: dict[str, object] | None = None

    def finish() -> None:
        if current is None:
            return
        sec, nsec = int(str(current.get("hs_sec", 0))), int(str(current.get("hs_nsec", 0)))
        psk = str(current.get("psk", ZERO_KEY))
        key = str(current["key"])
        allowed = current.get("allowed", [])
        assert isinstance(allowed, list)
        peers[key] = PeerSnapshot(
            public_key=key, endpoint=current.get("endpoint") or None,  # type: ignore[arg-type]
            allowed_ips=tuple(allowed), last_handshake=(sec + nsec / 1e9) if sec else None,
            rx_bytes=int(str(current.get("rx", 0))), tx_bytes=int(str(current.get("tx", 0))),
            keepalive=int(str(current.get("keepalive", 0))),
            preshared_key=None if psk == ZERO_KEY else bytes.fromhex(psk))

    errno = None
    for line in text.split("\n"):
        if not line:
            continue
        key, _, value = line.partition("=")
        if key == "errno":
            errno = int(value)
        elif key == "public_key":
            finish()
            current = {"key": hex_to_b64(value), "allowed": []}
        elif current is None:
            continue  # interface-level keys (private_key, listen_port, fwmark)
        elif key == "endpoint":
            current["endpoint"] = value
        elif key == "allowed_ip":
            allowed = current["allowed"]
            assert isinstance(allowed, list)
            allowed.append(str(ipaddress.ip_network(value, strict=False)))
        elif key == "last_handshake_time_sec":
            current["hs_sec"] = value
        elif key == "last_handshake_time_nsec":
            current["hs_nsec"] = value
        elif key == "rx_bytes":
            current["rx"] = value
        elif key == "tx_bytes":
            current["tx"] = value
        elif key == "persistent_keepalive_interval":
            current["keepalive"] = value
        elif key == "preshared_key":
            current["psk"] = value
    finish()
    if errno not in (0, None):
        raise UapiError(f"UAPI get failed with errno {errno}")
    return peers


def split_peers(text: str, per_chunk: int) -> list[str]:
    """Cut a "get=1" answer into pieces of whole peers, each parseable by parse_get (errno stays last)."""
    starts = []
    pos = text.find("public_key=")
    while pos != -1:
        starts.append(pos)
        pos = text.find("\npublic_key=", pos + 1)
        pos = pos + 1 if pos != -1 else -1
    if not starts:
        return [text]
    cuts = [*starts[::per_chunk][1:], len(text)]
    pieces, begin = [], 0
    for cut in cuts:
        pieces.append(text[begin:cut])
        begin = cut
    return pieces


def reset_request(peers: Sequence[PeerSnapshot]) -> str:
    """One "set=1" that removes each peer and re-adds it with its saved configuration."""
    lines = ["set=1"]
    for p in peers:
        key = b64_to_hex(p.public_key)
        lines += [f"public_key={key}", "remove=true", f"public_key={key}"]
        if p.preshared_key:
            lines.append(f"preshared_key={p.preshared_key.hex()}")
        if p.endpoint:
            lines.append(f"endpoint={p.endpoint}")
        lines.append(f"persistent_keepalive_interval={p.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={a}" for a in p.allowed_ips]
    return "\n".join(lines) + "\n\n"


class UapiWireGuard:
    def __init__(self, socket_path: Path) -> None:
        self.path = socket_path

    async def _exchange(self, request: str) -> str:
        reader, writer = await asyncio.open_unix_connection(self.path, limit=READ_LIMIT)
        try:
            writer.write(request.encode())
            await writer.drain()
            data = await reader.readuntil(b"\n\n")
        except asyncio.IncompleteReadError as exc:
            raise UapiError(f"{self.path}: connection closed mid-answer") from exc
        finally:
            writer.close()
        return data.decode()

    async def read(self) -> dict[str, PeerSnapshot]:
        text = await self._exchange("get=1\n\n")
        # ~4 ms of parsing per 1,000 peers: parse in slices and let other work (a Disconnect) run between.
        peers: dict[str, PeerSnapshot] = {}
        for chunk in split_peers(text, PEERS_PER_SLICE):
            peers.update(parse_get(chunk))
            await asyncio.sleep(0)
        return peers

    async def reset_sessions(self, peers: Sequence[PeerSnapshot]) -> None:
        answer = await self._exchange(reset_request(peers))
        if answer.strip() != "errno=0":
            raise UapiError(f"UAPI set failed: {answer.strip()}")
