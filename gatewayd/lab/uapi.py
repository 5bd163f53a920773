"""A WireGuard UAPI socket that answers like wireguard-go for a device whose peers are listed in a JSON file
(re-read at every `get`, so that a test adds and removes peers by rewriting it). For labs that need many
gateways or many peers without WireGuard's data path (the fleet lab, benchmarks): gatewayd reads it exactly as
it reads wireguard-go. `set` requests (session resets) are answered with success.

    python -m gatewayd.lab.uapi <socket path> <peers.json>

peers.json: [{"public_key": base64, "allowed_ips": ["10.0.0.2/32"], "endpoint": "ip:port"}, ...]
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def answer(peers: list[dict[str, Any]]) -> bytes:
    """A `get=1` answer, as wireguard-go prints it."""
    lines = [f"private_key={'11' * 32}", "listen_port=51820"]
    for p in peers:
        lines += [f"public_key={base64.b64decode(p['public_key']).hex()}", "preshared_key=" + "0" * 64,
                  "protocol_version=1", f"endpoint={p.get('endpoint', '198.18.0.1:51820')}",
                  "last_handshake_time_sec=0", "last_handshake_time_nsec=0", "tx_bytes=0", "rx_bytes=0",
                  "persistent_keepalive_interval=0", *(f"allowed_ip={ip}" for ip in p["allowed_ips"])]
    return ("\n".join(lines) + "\nerrno=0\n\n").encode()


def serve(path: str, get: Callable[[], bytes]) -> None:
    """Answer `get=1` with `get()` and every `set` with success, on a unix socket at `path`, until SIGTERM."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readline()
        while (await reader.readline()) not in (b"\n", b""):
            pass
        writer.write(get() if first == b"get=1\n" else b"errno=0\n\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        Path(path).unlink(missing_ok=True)
        server = await asyncio.start_unix_server(client, path, limit=64 * 1024 * 1024)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())


def from_file(peers_file: str) -> bytes:
    try:
        peers = json.loads(Path(peers_file).read_text())
    except (OSError, ValueError):
        peers = []
    return answer(peers)


if __name__ == "__main__":
    serve(sys.argv[1], lambda: from_file(sys.argv[2]))
