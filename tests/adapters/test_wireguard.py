"""WireGuard sources: UAPI against a real wireguard-go; the kernel path's message decoding."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.generic.wireguard import wgmsg

from gatewayd.adapters.wireguard.kernel import decode_device
from gatewayd.adapters.wireguard.kernel import device_identity as kernel_identity
from gatewayd.adapters.wireguard.uapi import UapiWireGuard, device_identity, reset_request
from gatewayd.core.tracking import PeerSnapshot
from gatewayd.lab.netlab import UAPI_DIR, WG_PORT, Lab, keypair, run
from gatewayd.ports import InterfaceIdentity

Counters = dict[str, tuple[int, int]]


async def read_answers(sock: Path, answers: list[str], piece: int = 7
                       ) -> list[tuple[dict[str, PeerSnapshot], Counters]]:
    """Each answer read by one UapiWireGuard (the daemon's decoder, with its cache) from a UAPI socket that
    writes in `piece`-byte pieces (the terminating empty line split too), with the byte counters as they were
    right after that read (they are updated in place by later reads)."""
    pending = list(answers)
    handlers: list[asyncio.Task[Any] | None] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())
        assert await reader.readuntil(b"\n\n") == b"get=1\n\n"
        data = pending.pop(0).encode()
        for i in range(0, len(data), piece):
            writer.write(data[i:i + piece])
            await writer.drain()
        await reader.read()  # the client closes
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_unix_server(serve, path=str(sock))
    try:
        source = UapiWireGuard(sock)
        out = []
        for _ in answers:
            peers = await source.read()
            out.append((peers, {k: (p.rx_bytes, p.tx_bytes) for k, p in peers.items()}))
        return out
    finally:
        server.close()
        await asyncio.gather(*(t for t in handlers if t is not None))
        sock.unlink(missing_ok=True)


async def test_uapi_get_answer_decodes(tmp_path: Path) -> None:
    key = bytes(range(32))
    text = (f"private_key={'11' * 32}\nlisten_port=51820\npublic_key={key.hex()}\npreshared_key={'22' * 32}\n"
            "protocol_version=1\nendpoint=[2001:db8::1]:4000\nlast_handshake_time_sec=1700000000\n"
            "last_handshake_time_nsec=500000000\ntx_bytes=10\nrx_bytes=20\npersistent_keepalive_interval=25\n"
            "allowed_ip=10.0.0.2/32\nallowed_ip=fd00::2/128\n"
            f"public_key={'33' * 32}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
            f"preshared_key={'00' * 32}\nerrno=0\n\n")
    ((peers, _),) = await read_answers(tmp_path / "wg0.sock", [text])
    p = peers[base64.b64encode(key).decode()]
    assert p.endpoint == "[2001:db8::1]:4000" and p.allowed_ips == ("10.0.0.2/32", "fd00::2/128")
    assert p.last_handshake == 1700000000.5 and (p.rx_bytes, p.tx_bytes, p.keepalive) == (20, 10, 25)
    assert p.preshared_key == bytes([0x22]) * 32
    other = peers[base64.b64encode(bytes([0x33]) * 32).decode()]
    assert other.last_handshake is None and other.preshared_key is None and other.endpoint is None
    assert "22" * 32 not in repr(p)


def test_the_interface_identity_comes_from_the_device_lines() -> None:
    found = device_identity(f"\nprivate_key={'11' * 32}\nlisten_port=51820\nfwmark=0".encode())
    assert found == InterfaceIdentity(private_key=b"\x11" * 32, listen_port=51820)
    assert "11" * 32 not in repr(found) and "EREREREREREREREREREREREREREREREREREREREREQ" not in repr(found)
    assert device_identity(f"\nprivate_key={'00' * 32}\nlisten_port=51820".encode()) is None  # no key set
    assert device_identity(b"\nlisten_port=51820") is None
    assert device_identity(b"\nprivate_key=zz\nlisten_port=1") is None


def test_reset_request_restores_the_configuration() -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    snap = PeerSnapshot(public_key=key, endpoint="198.18.1.2:4000", allowed_ips=("10.0.0.2/32",),
                        last_handshake=1.0, keepalive=25, preshared_key=b"\x01" * 32)
    text = reset_request([snap])
    hexkey = bytes(range(32)).hex()
    assert text.startswith(f"set=1\npublic_key={hexkey}\nremove=true\npublic_key={hexkey}\n")
    for line in (f"preshared_key={'01' * 32}", "endpoint=198.18.1.2:4000", "persistent_keepalive_interval=25",
                 "replace_allowed_ips=true", "allowed_ip=10.0.0.2/32"):
        assert line in text.splitlines()
    assert text.endswith("\n\n")


def _answer(handshake: int, tx: int, rx: int, allowed: str = "10.0.0.2/32", endpoint: str = "198.18.1.2:4000") -> str:
    return (f"private_key={'11' * 32}\nlisten_port=51820\n"
            f"public_key={'44' * 32}\npreshared_key={'00' * 32}\nprotocol_version=1\nendpoint={endpoint}\n"
            f"last_handshake_time_sec={handshake}\nlast_handshake_time_nsec=0\ntx_bytes={tx}\nrx_bytes={rx}\n"
            f"persistent_keepalive_interval=25\nallowed_ip={allowed}\n"
            f"public_key={'55' * 32}\npreshared_key={'00' * 32}\nprotocol_version=1\n"
            "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n"
            "persistent_keepalive_interval=0\nallowed_ip=10.0.0.3/32\nerrno=0\n\n")


async def test_uapi_reader_reuses_what_did_not_change(tmp_path: Path) -> None:
    """Against a UAPI socket that writes its answers in 7-byte pieces (the terminating empty line split too):
    each read equals a full parse of the answer by a fresh reader, counters included, whatever changed between
    reads; a peer whose counters alone changed keeps its snapshot object (counters are updated in place)."""
    answers = [_answer(1700000000, 10, 20), _answer(1700000000, 10, 20), _answer(1700000000, 15, 90),
               _answer(1700000130, 16, 95), _answer(1700000130, 17, 99, allowed="10.0.0.9/32"),
               _answer(1700000130, 17, 99, allowed="10.0.0.9/32", endpoint="198.18.1.2:4001"),
               _answer(1700000130, 18, 99, allowed="10.0.0.9/32", endpoint="198.18.1.3:4001")]
    done = await read_answers(tmp_path / "wg0.sock", answers)
    reads, counters = [r for r, _ in done], [c for _, c in done]
    key, idle = base64.b64encode(b"\x44" * 32).decode(), base64.b64encode(b"\x55" * 32).decode()
    for got, seen, text in zip(reads, counters, answers, strict=True):
        ((expected, expected_counters),) = await read_answers(tmp_path / "fresh.sock", [text], piece=1 << 20)
        assert got == expected and seen == expected_counters  # a fresh reader (no cache) parses all of it
    assert reads[1][key] is reads[0][key]  # unchanged: not parsed again
    assert reads[2][key] is reads[1][key] and counters[2][key] == (90, 15)  # counters only
    assert reads[3][key] is not reads[2][key] and reads[3][key].last_handshake == 1700000130  # a handshake too
    assert reads[4][key].allowed_ips == ("10.0.0.9/32",)  # configuration as well as counters
    assert reads[5][key].endpoint == "198.18.1.2:4001"  # a block of the same length, counters unchanged
    assert reads[6][key].endpoint == "198.18.1.3:4001" and counters[6][key] == (99, 18)
    assert all(r[idle] is reads[0][idle] for r in reads)


def test_kernel_device_messages_decode() -> None:
    """The genetlink path cannot run here (no kernel WireGuard); its decoding of WG_CMD_GET_DEVICE is real."""
    key = base64.b64encode(bytes(range(32))).decode()
    psk = base64.b64encode(b"\x07" * 32).decode()
    msg = wgmsg()
    msg["cmd"], msg["version"] = 0, 1
    msg["attrs"] = [("WGDEVICE_A_IFNAME", "wg0"), ("WGDEVICE_A_PEERS", [{"attrs": [
        ("WGPEER_A_PUBLIC_KEY", {"value": key}),
        ("WGPEER_A_PRESHARED_KEY", {"value": psk}),
        ("WGPEER_A_ENDPOINT", {"addr": "198.18.1.2", "port": 4000}),
        ("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25),
        ("WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1700000000, "tv_nsec": 250000000}),
        ("WGPEER_A_RX_BYTES", 20), ("WGPEER_A_TX_BYTES", 10),
        ("WGPEER_A_ALLOWEDIPS", [{"attrs": [("WGALLOWEDIP_A_FAMILY", socket.AF_INET),
                                            ("WGALLOWEDIP_A_IPADDR", socket.inet_pton(socket.AF_INET, "10.0.0.2")),
                                            ("WGALLOWEDIP_A_CIDR_MASK", 32)]}]),
    ]}])]
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    peers = decode_device([decoded])
    assert kernel_identity([decoded]) is None  # no private key in this answer
    private = base64.b64encode(b"\x09" * 32).decode()
    device = wgmsg()
    device["cmd"], device["version"] = 0, 1
    device["attrs"] = [("WGDEVICE_A_IFNAME", "wg0"), ("WGDEVICE_A_PRIVATE_KEY", {"value": private}),
                       ("WGDEVICE_A_LISTEN_PORT", 51820)]
    device.encode()
    decoded_device = wgmsg(device.data)
    decoded_device.decode()
    assert kernel_identity([decoded_device]) == InterfaceIdentity(private_key=b"\x09" * 32, listen_port=51820)
    p = peers[key]
    assert p.endpoint == "198.18.1.2:4000" and p.allowed_ips == ("10.0.0.2/32",)
    assert p.last_handshake == 1700000000.25 and p.keepalive == 25 and (p.rx_bytes, p.tx_bytes) == (20, 10)
    assert p.preshared_key == b"\x07" * 32


@pytest.mark.kernel
async def test_uapi_reads_and_resets_a_real_wireguard_go() -> None:
    lab = Lab(peers_wanted=1)
    with lab.running():
        peer = lab.peers[0]
        first = lab.wait_handshake(peer)
        psk = base64.b64encode(b"\x05" * 32).decode()
        run("wg", "set", lab.gw_iface, "peer", peer.public_key, "preshared-key", "/dev/stdin", ns=lab.gw_ns,
            input_=psk)
        run("wg", "set", peer.iface, "peer", lab.gw_public, "preshared-key", "/dev/stdin", ns=peer.ns, input_=psk)
        source = UapiWireGuard(UAPI_DIR / f"{lab.gw_iface}.sock")
        snap = (await source.read())[peer.public_key]
        assert await source.identity() == InterfaceIdentity(private_key=base64.b64decode(lab.gw_private),
                                                            listen_port=WG_PORT)
        assert snap.allowed_ips == (f"{peer.tunnel_ip}/32", f"{peer.tunnel_ip6}/128")
        assert snap.endpoint and snap.endpoint.startswith(peer.underlay) and snap.keepalive == 25
        assert snap.last_handshake == pytest.approx(first, abs=1.0)
        await asyncio.sleep(1.1)  # handshake times have a resolution of one second in `wg show`
        await source.reset_sessions([snap])
        after = (await source.read())[peer.public_key]
        assert (after.allowed_ips, after.endpoint, after.keepalive) == (snap.allowed_ips, snap.endpoint, 25)
        assert after.preshared_key == b"\x05" * 32
        # The keys were dropped: the next exchange needs (and gets) a fresh handshake.
        assert lab.wait_handshake(peer, after=first, timeout=10) > first
        # Traffic moves the byte counters; the rest of the peer stays as it was read.
        before = (await source.read())[peer.public_key]
        received = before.rx_bytes
        for _ in range(3):
            lab.nudge(peer)
        await asyncio.sleep(0.2)
        busy = (await source.read())[peer.public_key]
        assert busy.rx_bytes > received
        assert (busy.allowed_ips, busy.endpoint, busy.last_handshake) == (
            before.allowed_ips, before.endpoint, before.last_handshake)


@pytest.mark.kernel
async def test_uapi_reads_thousands_of_peers() -> None:
    lab = Lab(peers_wanted=0)
    with lab.running():
        lines = ["set=1"]
        for i in range(2000):
            _, public = keypair()
            lines += [f"public_key={base64.b64decode(public).hex()}", f"allowed_ip=10.{100 + i // 250}.{i % 250}.1/32"]
        source = UapiWireGuard(UAPI_DIR / f"{lab.gw_iface}.sock")
        assert (await source._exchange("\n".join(lines) + "\n\n")).strip() == "errno=0"
        started = time.perf_counter()
        first = await source.read()
        assert len(first) == 2000
        # What wireguard-go's lock costs (the ask, up to the end of its answer) is told apart from decoding.
        assert 0 < source.read_seconds < time.perf_counter() - started
        # Unchanged peers are not parsed again: the very same snapshot objects come back.
        again = await source.read()
        assert all(again[k] is first[k] for k in first)
        run("wg", "set", lab.gw_iface, "peer", next(iter(first)), "persistent-keepalive", "7", ns=lab.gw_ns)
        changed = await source.read()
        key = next(iter(first))
        assert changed[key].keepalive == 7 and changed[key] is not first[key]
        assert sum(changed[k] is first[k] for k in first) == 1999


async def test_the_identity_is_read_without_reading_every_peer(tmp_path: Path) -> None:
    """identity() hangs up after the device lines: a device whose peer list never ends still answers it; a
    device without peers, or one that refuses, answers as a whole."""
    sock = tmp_path / "wg0.sock"
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\n\n")
        writer.write(f"private_key={'11' * 32}\nlisten_port=51821\n".encode())
        try:
            while True:  # until the client hangs up
                writer.write(f"public_key={sent:064x}\nallowed_ip=10.0.0.1/32\n".encode() * 100)
                sent += 100
                await writer.drain()
        except (ConnectionError, OSError):
            writer.close()

    server = await asyncio.start_unix_server(endless, path=str(sock))
    try:
        identity = await asyncio.wait_for(UapiWireGuard(sock).identity(), 10)
    finally:
        server.close()
    assert identity == InterfaceIdentity(private_key=b"\x11" * 32, listen_port=51821)
    sock.unlink()
    for answer, expected in ((f"private_key={'11' * 32}\nlisten_port=7\nerrno=0\n\n",
                              InterfaceIdentity(private_key=b"\x11" * 32, listen_port=7)),
                             (f"private_key={'00' * 32}\nlisten_port=7\nerrno=0\n\n", None)):
        async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str = answer) -> None:
            await reader.readuntil(b"\n\n")
            writer.write(text.encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(once, path=str(sock))
        try:
            assert await UapiWireGuard(sock).identity() == expected
        finally:
            server.close()
            sock.unlink()

    async def refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\n\n")
        writer.write(b"errno=1\n\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(refusing, path=str(sock))
    try:
        with pytest.raises(OSError, match="errno=1"):
            await UapiWireGuard(sock).identity()
    finally:
        server.close()
