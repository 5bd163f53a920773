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


def _prefix(value: str) -> str:
    """wireguard-go prints canonical prefixes (Go's netip); normalize only what is not obviously canonical."""
    address, _, length = value.partition("/")
    if length and (("." in address and length == "32") or (":" in address and length == "128"
                                                                 and address == address.lower())):
        return value
    return str(ipaddress.ip_network(value, strict=False))


def parse_peer(block: str) -> PeerSnapshot:
    """One peer's lines, starting with its hex public key (without "public_key=")."""
    lines = block.split("\n")
    endpoint = None
    allowed: list[str] = []
    sec = nsec = rx = tx = keepalive = 0
    psk = ZERO_KEY
    for line in lines[1:]:
        key, _, value = line.partition("=")
        if key == "allowed_ip":
            allowed.append(_prefix(value))
        elif key == "rx_bytes":
            rx = int(value)
        elif key == "tx_bytes":
            tx = int(value)
        elif key == "last_handshake_time_sec":
            sec = int(value)
        elif key == "last_handshake_time_nsec":
            nsec = int(value)
        elif key == "endpoint":
            endpoint = value or None
        elif key == "persistent_keepalive_interval":
            keepalive = int(value)
        elif key == "preshared_key":
            psk = value
    return PeerSnapshot(
        public_key=hex_to_b64(lines[0]), endpoint=endpoint, allowed_ips=tuple(allowed),
        last_handshake=(sec + nsec / 1e9) if sec else None, rx_bytes=rx, tx_bytes=tx, keepalive=keepalive,
        preshared_key=None if psk == ZERO_KEY else bytes.fromhex(psk))


def _blocks(text: str) -> tuple[list[str], int | None]:
    """The peers' blocks (each starting with the hex key) and the errno of a "get=1" answer."""
    head, _, tail = text.rpartition("errno=")
    errno = int(tail.split("\n", 1)[0]) if tail.strip() else None
    body = head if head else text
    parts = body.split("public_key=")
    return [p.rstrip("\n") for p in parts[1:]], errno


def parse_get(text: str) -> dict[str, PeerSnapshot]:
    """Decode a "get=1" answer into peer snapshots."""
    blocks, errno = _blocks(text)
    if errno not in (0, None):
        raise UapiError(f"UAPI get failed with errno {errno}")
    peers = {}
    for block in blocks:
        snap = parse_peer(block)
        peers[snap.public_key] = snap
    return peers


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
        # The raw text of each peer's block at the last read, and what it parsed to: an idle peer's block does
        # not change between polls, so it costs one string comparison instead of a parse.
        self._cache: dict[str, tuple[str, PeerSnapshot]] = {}

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
        head, _, tail = text.rpartition("errno=")
        if tail.strip() and int(tail.split("\n", 1)[0]) != 0:
            raise UapiError(f"UAPI get failed with {tail.strip()}")
        peers: dict[str, PeerSnapshot] = {}
        cache: dict[str, tuple[str, PeerSnapshot]] = {}
        marker = "public_key="
        start = head.find(marker)
        count = 0
        while start != -1:
            end = head.find("\n" + marker, start)
            block = head[start + len(marker): end if end != -1 else len(head)].rstrip("\n")
            start = end + 1 if end != -1 else -1
            cached = self._cache.get(block[:64])
            snap = cached[1] if cached is not None and cached[0] == block else parse_peer(block)
            cache[block[:64]] = (block, snap)
            peers[snap.public_key] = snap
            count += 1
            if count % PEERS_PER_SLICE == 0:
                await asyncio.sleep(0)  # let a Disconnect run between slices
        self._cache = cache
        return peers

    async def reset_sessions(self, peers: Sequence[PeerSnapshot]) -> None:
        answer = await self._exchange(reset_request(peers))
        if answer.strip() != "errno=0":
            raise UapiError(f"UAPI set failed: {answer.strip()}")
