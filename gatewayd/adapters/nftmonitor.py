"""nftables change notifications (what `nft monitor` reads): who changed gatewayd's table, at once.

A raw NETLINK_NETFILTER socket subscribed to NFNLGRP_NFTABLES. The kernel sends one message per object a
transaction adds or deletes (tables, chains, rules, sets, set elements), then NFT_MSG_NEWGEN naming the process
that committed it. A transaction by another process (or thread) that touched our table - `nft delete table`,
`flush ruleset` from a reload of nftables.service, firewalld, a deleted element - is reported to the callback
when its NEWGEN arrives; our own transactions (made on the event loop's thread) are not. If the socket
overflowed, notifications were lost: that is reported too, so the caller verifies the whole table.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable

from gatewayd.netlink import attrs, messages

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET = 1
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE = 0, 2
NFT_MSG_NEWGEN = 15
TABLE_ATTR = 1
"""NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_SET_ELEM_LIST_TABLE: all 1."""
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
OBJECT_MESSAGES = frozenset(range(NFT_MSG_NEWTABLE, NFT_MSG_NEWGEN))

Drift = Callable[[str], None]
"""Called with who changed the table ("nft (pid 123)") or "notifications lost"."""


def decode(data: bytes, table: str) -> list[tuple[str, object]]:
    """("touched", None) for each message about `table` (family inet), ("gen", (pid, name)) for each NEWGEN."""
    out: list[tuple[str, object]] = []
    for kind, body in messages(data):
        if kind >> 8 != NFNL_SUBSYS_NFTABLES or len(body) < 4:
            continue
        msg, family = kind & 0xFF, body[0]
        found = dict(attrs(body[4:]))
        if msg == NFT_MSG_NEWGEN:
            pid = struct.unpack(">I", found[NFTA_GEN_PROC_PID])[0] if NFTA_GEN_PROC_PID in found else 0
            name = found.get(NFTA_GEN_PROC_NAME, b"").split(b"\0", 1)[0].decode(errors="replace")
            out.append(("gen", (pid, name)))
        elif msg in OBJECT_MESSAGES and family == NFPROTO_INET:
            name = found.get(TABLE_ATTR, b"").split(b"\0", 1)[0].decode(errors="replace")
            if name == table:
                out.append(("touched", None))
    return out


class NftMonitor:
    """Reports transactions of others that touched one inet table."""

    def __init__(self, table: str, on_drift: Drift) -> None:
        self.table = table
        self.on_drift = on_drift
        self._sock: socket.socket | None = None
        self._touched = False
        self._own: set[int] = {os.getpid()}

    async def start(self) -> None:
        # Our transactions run on the event loop's thread: its id is what the kernel names as their process.
        self._own.add(threading.get_native_id())
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    async def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as exc:
                # ENOBUFS: notifications were lost; only a full comparison can tell what changed.
                log.warning("nftables notifications lost (%s): verifying the table", exc)
                self._touched = False
                self.on_drift("notifications lost")
                continue
            for what, value in decode(data, self.table):
                if what == "touched":
                    self._touched = True
                    continue
                assert isinstance(value, tuple)
                pid, name = value
                if self._touched and pid not in self._own:
                    self.on_drift(f"{name or 'unknown'} (pid {pid})")
                self._touched = False
