"""The WireGuard cross-platform UAPI (wireguard-go and other userspace implementations).

Protocol: a unix stream socket; "get=1\n\n" answers key=value lines ending with "errno=N\n\n"; keys are hex.
One "set=1" operation can remove and re-add several peers: that is how session keys are dropped while the
peer's configuration (endpoint, preshared key, allowed IPs, keepalive) stays.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from gatewayd.core.tracking import PeerSnapshot, Traffic
from gatewayd.ports import InterfaceIdentity
from gatewayd.scheduling import Pause, Slices, no_pause

# An answer takes ~330 bytes per peer (3.3 MB for 10,000): read it in pieces large enough to be few, small
# enough that splitting one never holds the event loop for long.
RECV_SIZE = 256 * 1024
ZERO_KEY = "0" * 64


class UapiError(OSError):
    pass


def hex_to_b64(value: str) -> str:
    # Interned: a peer's key is held by the core, the store's rows, the tracker and every read; one string object
    # serves them all (at 100,000 peers each copy is ~9 MB).
    return sys.intern(base64.b64encode(bytes.fromhex(value)).decode())


def b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _prefix(value: str) -> str:
    """wireguard-go prints canonical prefixes (Go's netip); normalize only what is not obviously canonical.
    Interned, like endpoints: the core and the store's rows hold the same values (one object instead of two)."""
    address, _, length = value.partition("/")
    if length and (("." in address and length == "32") or (":" in address and length == "128"
                                                                 and address == address.lower())):
        return sys.intern(value)
    return sys.intern(str(ipaddress.ip_network(value, strict=False)))


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
            endpoint = sys.intern(value) if value else None
        elif key == "persistent_keepalive_interval":
            keepalive = int(value)
        elif key == "preshared_key":
            psk = value
    return PeerSnapshot(
        public_key=hex_to_b64(lines[0]), endpoint=endpoint, allowed_ips=tuple(allowed),
        last_handshake=(sec + nsec / 1e9) if sec else None, traffic=Traffic(rx, tx), keepalive=keepalive,
        preshared_key=None if psk == ZERO_KEY else bytes.fromhex(psk))


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


_Cached = tuple[int, PeerSnapshot]
"""What a read keeps of a peer's block for the next one, and its snapshot. In one integer (`_pack`; one object
instead of three): the hashes of the whole block and of the block without its byte counters, and where the
counters are (the lengths before and after them; none found: 0). Hashes, not the block (at 100,000 peers the
blocks were 36 MB): Python's hash of bytes is SipHash with a key drawn at start-up, so a changed block that
hashes like the old one (a missed change) cannot be made on purpose and happens by chance once in 2**64."""

_M64 = (1 << 64) - 1


def _pack(whole: int, fixed: int, head: int, tail: int) -> int:
    return whole & _M64 | (fixed & _M64) << 64 | tail << 128 | head << 160


class UapiWireGuard:
    def __init__(self, socket_path: Path) -> None:
        self.path = socket_path
        # Per peer (the hash of its hex key), from the last read. An idle peer's block does not change between
        # polls (one hash); a busy peer's usually changes only in its counters (two integers parsed, the rest
        # hashed). A clash of two keys' hashes costs a parse, never a wrong snapshot: entries are checked by
        # the block's own hash.
        self._cache: dict[int, _Cached] = {}
        self.read_seconds = 0.0
        self._identity: InterfaceIdentity | None = None
        """From the device lines of the latest read."""

    async def _exchange(self, request: str) -> str:
        """One request on a fresh connection; the answer ends with an empty line."""
        chunks: list[bytes] = []
        async for chunk in self._ask(request.encode()):
            chunks.append(chunk)
        return b"".join(chunks).decode()

    async def _ask(self, request: bytes) -> AsyncIterator[bytes]:
        """Send one request; yield the answer as it arrives, in large pieces, up to its empty line."""
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, str(self.path))
            await loop.sock_sendall(sock, request)
            tail = b""
            while tail != b"\n\n":
                chunk = await loop.sock_recv(sock, RECV_SIZE)
                if not chunk:
                    raise UapiError(f"{self.path}: connection closed mid-answer")
                tail = (tail + chunk)[-2:]
                yield chunk

    async def _get(self) -> bytes:
        """A whole "get=1" answer, in one piece: peer blocks are cut from it one at a time while they are
        decoded, rather than all at once (100,000 blocks were 36 MB of small objects, which the allocator then
        kept). wireguard-go holds its configuration lock until it has written the whole answer, so the reading
        never pauses."""
        return b"".join([chunk async for chunk in self._ask(b"get=1\n\n")])

    async def read(self, pause: Pause = no_pause) -> dict[str, PeerSnapshot]:
        await pause()
        asked = time.perf_counter()
        answer = await self._get()
        self.read_seconds = time.perf_counter() - asked
        end = _status_at(answer)
        # The device's lines come first; each peer's block starts after "\npublic_key=" with the hex key.
        at = answer.find(_PEER, 0, end)
        self._identity = device_identity(answer[:end] if at == -1 else answer[:at])
        peers: dict[str, PeerSnapshot] = {}
        old, cache = self._cache, {}
        slices = Slices(pause)
        count = 0
        while at != -1:
            start = at + len(_PEER)
            at = answer.find(_PEER, start, end)
            block = answer[start:at] if at != -1 else answer[start:end].rstrip(b"\n")
            key = hash(block[:64])
            cached = old.get(key)
            whole = hash(block) & _M64
            entry = cached if cached is not None and cached[0] & _M64 == whole else _decode(block, whole, cached)
            cache[key] = entry
            snap = entry[1]
            peers[snap.public_key] = snap
            count += 1
            if count & 15 == 0 and slices.due():
                await slices.pause()
        self._cache = cache
        return peers

    async def identity(self) -> InterfaceIdentity | None:
        if self._identity is None:
            # The device lines come first: read up to the first peer and hang up (wireguard-go stops writing
            # on the closed connection), rather than read 100,000 peers for two values.
            head = b""
            async for chunk in self._ask(b"get=1\n\n"):
                head += chunk
                if b"\npublic_key=" in head or b"errno=" in head:
                    break
            device, peers, _ = head.partition(b"\npublic_key=")
            self._identity = device_identity(device if peers else _without_status(device))
        return self._identity

    async def reset_sessions(self, peers: Sequence[PeerSnapshot]) -> None:
        answer = await self._exchange(reset_request(peers))
        if answer.strip() != "errno=0":
            raise UapiError(f"UAPI set failed: {answer.strip()}")


_PEER = b"\npublic_key="


def _status_at(answer: bytes) -> int:
    """Where a "get=1" answer's closing "errno=N" line starts; UapiError unless N is 0."""
    at = answer.rfind(b"errno=")
    if at == -1:
        raise UapiError("UAPI get answer without its errno line")
    status = answer[at + 6:].strip()
    if status != b"0":
        raise UapiError(f"UAPI get failed with errno={status.decode(errors='replace')}")
    return at


def _without_status(answer: bytes) -> bytes:
    """A "get=1" answer (or its end) without its closing "errno=N" line; UapiError unless N is 0."""
    return answer[:_status_at(answer)]


def device_identity(device: bytes) -> InterfaceIdentity | None:
    """The private key and listen port from a "get=1" answer's device lines (None without a key)."""
    fields = dict(line.split(b"=", 1) for line in device.split(b"\n") if b"=" in line)
    key = fields.get(b"private_key", b"")
    if len(key) != 64 or key == ZERO_KEY.encode():
        return None
    try:
        return InterfaceIdentity(private_key=bytes.fromhex(key.decode()),
                                 listen_port=int(fields.get(b"listen_port", b"0")))
    except ValueError:
        return None


def _decode(block: bytes, whole: int, cached: _Cached | None) -> _Cached:
    """A peer block whose hash is `whole`, and what the cache keeps of it (see _Cached)."""
    if cached is not None and cached[0] >> 128:
        packed = cached[0]
        fixed, tail, head = packed >> 64 & _M64, packed >> 128 & 0xFFFFFFFF, packed >> 160
        if block.startswith(b"\ntx_bytes=", head) and hash((block[:head], block[len(block) - tail:])) & _M64 == fixed:
            # Only the counters may differ: "\ntx_bytes=N\nrx_bytes=M" between the unchanged parts.
            tx, sep, rx = block[head + 10:len(block) - tail].partition(b"\nrx_bytes=")
            if sep and tx.isdigit() and rx.isdigit():
                snap = cached[1]
                snap.traffic.rx_bytes, snap.traffic.tx_bytes = int(rx), int(tx)
                return _pack(whole, fixed, head, tail), snap
    snap = parse_peer(block.decode())
    start = block.find(b"\ntx_bytes=")
    rx_at = block.find(b"\n", start + 1)
    if start <= 0 or not block.startswith(b"\nrx_bytes=", rx_at):
        return whole, snap
    end = block.find(b"\n", rx_at + 1)
    end = len(block) if end == -1 else end
    return _pack(whole, hash((block[:start], block[end:])), start, len(block) - end), snap
