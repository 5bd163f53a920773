"""Connection tracking: delete the flows from or to given prefixes, over ctnetlink directly.

Every conntrack dump walks the kernel's whole hash table (~10 ms here even when empty, filtered or not), which
a Disconnect cannot afford. So the adapter keeps an index of flows by address, fed by ctnetlink NEW and
DESTROY events and seeded by one dump at start. A flush first drains pending events (a flow confirmed before
the quarantine rule took effect has its event queued by then), then deletes the exact tuples in one batch.
If the event socket ever overflows, the next flush walks the table once and reseeds the index.
No library: pyroute2's conntrack classes cost ~11 ms per call on top.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence

from gatewayd.netlink import attrs, messages, nla

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
GROUP_NEW, GROUP_DESTROY = 1 << 0, 1 << 2  # NFNLGRP_CONNTRACK_NEW (1) and _DESTROY (3) as bind() bits
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG = 1
CTA_TUPLE_IP = 1
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def orig_addresses(tuple_orig: bytes, family: int) -> tuple[bytes | None, bytes | None]:
    """(source, destination) of an original-direction tuple."""
    src_kind, dst_kind = (CTA_IP_V4_SRC, CTA_IP_V4_DST) if family == socket.AF_INET else (CTA_IP_V6_SRC,
                                                                                            CTA_IP_V6_DST)
    for kind, payload in attrs(tuple_orig):
        if kind == CTA_TUPLE_IP:
            found = dict(attrs(payload))
            return found.get(src_kind), found.get(dst_kind)
    return None, None


class Conntrack:
    def __init__(self, max_indexed: int = 1_000_000) -> None:
        self._seq = 0
        self._lock = threading.Lock()
        self._events: socket.socket | None = None
        self._by_address: dict[bytes, set[tuple[int, bytes]]] = {}
        self._indexed = 0
        self._max_indexed = max_indexed
        self._stale = True

    # ---- messages ---------------------------------------------------------------------------------

    def _message(self, msg_type: int, flags: int, family: int, body: bytes) -> bytes:
        self._seq += 1
        payload = struct.pack("=BBH", family, 0, 0) + body
        return struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_CTNETLINK << 8) | msg_type, flags,
                           self._seq, 0) + payload

    @staticmethod
    def _parse(data: bytes) -> Iterator[tuple[int, int, bytes]]:
        """(netlink type, ctnetlink family, payload after nfgenmsg) of each message in a datagram."""
        for kind, payload in messages(data):
            family = payload[0] if kind not in (NLMSG_ERROR, NLMSG_DONE) and payload else 0
            yield kind, family, payload

    def _request(self, sock: socket.socket, messages: bytes, answers: int | None
                 ) -> tuple[list[tuple[int, bytes]], int]:
        """Send; collect (family, tuple_orig) of dumped entries until DONE, or wait for `answers` acks.
        Returns the entries and how many acks reported success."""
        sock.sendall(messages)
        found: list[tuple[int, bytes]] = []
        acks = succeeded = 0
        while True:
            for kind, family, payload in self._parse(sock.recv(1 << 20)):
                if kind == NLMSG_DONE:
                    return found, succeeded
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code not in (0, -errno.ENOENT):  # ENOENT: the flow ended meanwhile
                        raise OSError(-code, f"ctnetlink: {os.strerror(-code)}")
                    acks += 1
                    succeeded += code == 0
                    if answers is not None and acks >= answers:
                        return found, succeeded
                    continue
                for attr, value in attrs(payload[4:]):
                    if attr == CTA_TUPLE_ORIG:
                        found.append((family, value))

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.settimeout(5)
        sock.bind((0, 0))
        return sock

    # ---- the index --------------------------------------------------------------------------------

    def _index(self, family: int, tuple_orig: bytes, add: bool) -> None:
        for address in orig_addresses(tuple_orig, family):
            if address is None:
                continue
            entries = self._by_address.setdefault(address, set())
            if add:
                if (family, tuple_orig) not in entries:
                    entries.add((family, tuple_orig))
                    self._indexed += 1
            elif (family, tuple_orig) in entries:
                entries.discard((family, tuple_orig))
                self._indexed -= 1
                if not entries:
                    del self._by_address[address]
        if self._indexed > self._max_indexed:
            self._stale = True

    def _reseed(self) -> None:
        self._by_address.clear()
        self._indexed = 0
        with self._socket() as sock:
            for family in (socket.AF_INET, socket.AF_INET6):
                msg = self._message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family, b"")
                for fam, t in self._request(sock, msg, None)[0]:
                    self._index(fam, t, True)
        self._stale = self._indexed > self._max_indexed

    def drain(self) -> None:
        """Apply every queued NEW/DESTROY event to the index."""
        if self._events is None:
            return
        while True:
            try:
                data = self._events.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._stale = True  # events were lost: the next flush walks the table once
                    continue
                raise
            for kind, family, payload in self._parse(data):
                msg_type = kind & 0xFF
                if kind >> 8 != NFNL_SUBSYS_CTNETLINK or msg_type not in (IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE):
                    continue
                for attr, value in attrs(payload[4:]):
                    if attr == CTA_TUPLE_ORIG:
                        self._index(family, value, msg_type == IPCTNL_MSG_CT_NEW)

    # ---- the port ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to conntrack events and seed the index (one walk of the table)."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 * 1024 * 1024)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)
        sock.bind((0, GROUP_NEW | GROUP_DESTROY))
        sock.setblocking(False)
        self._events = sock
        await asyncio.to_thread(self._reseed)
        asyncio.get_running_loop().add_reader(sock.fileno(), self.drain)

    async def close(self) -> None:
        if self._events is not None:
            asyncio.get_running_loop().remove_reader(self._events.fileno())
            self._events.close()
            self._events = None

    def flush_sync(self, prefixes: Sequence[str]) -> int:
        hosts: list[bytes] = []
        wide: list[Net] = []
        for p in prefixes:
            host, _, length = p.partition("/")
            af = socket.AF_INET6 if ":" in host else socket.AF_INET
            if length in ("", "128" if af == socket.AF_INET6 else "32"):
                hosts.append(socket.inet_pton(af, host))
            else:
                wide.append(ipaddress.ip_network(p, strict=False))
        with self._lock:
            self.drain()
            if self._stale or self._events is None:
                self._reseed()
            doomed: set[tuple[int, bytes]] = set()
            for packed in hosts:
                doomed |= self._by_address.get(packed, set())
            if wide:
                for raw, entries in self._by_address.items():
                    ip = ipaddress.ip_address(raw)
                    if any(ip in n for n in wide if n.version == ip.version):
                        doomed |= entries
            if not doomed:
                return 0
            batch = b"".join(self._message(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, fam,
                                           nla(CTA_TUPLE_ORIG | NLA_F_NESTED, t)) for fam, t in doomed)
            with self._socket() as sock:
                _, deleted = self._request(sock, batch, len(doomed))
            for fam, t in doomed:
                self._index(fam, t, False)
            return deleted

    async def flush(self, prefixes: Sequence[str]) -> int:
        # A few syscalls and no table walk: cheaper inline than a hop to a thread.
        return self.flush_sync(prefixes)
