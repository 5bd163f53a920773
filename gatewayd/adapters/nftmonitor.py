"""nftables change notifications (what `nft monitor` reads): who changed gatewayd's table, at once.

A raw NETLINK_NETFILTER socket subscribed to NFNLGRP_NFTABLES. The kernel sends one message per object a
transaction adds or deletes (tables, chains, rules, sets, set elements), then NFT_MSG_NEWGEN naming the process
that committed it. A transaction by another process (or thread) that touched our table - `nft delete table`,
`flush ruleset` from a reload of nftables.service, firewalld, a deleted element - is reported to the callback
when its NEWGEN arrives; our own transactions (made on the event loop's thread or an enforcer's writer thread)
are not. If the socket overflowed, notifications were lost: that is reported too, so the caller verifies the
whole table.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
import threading
from collections.abc import Callable, Collection

from gatewayd.netlink import Subscription, attrs, messages
from gatewayd.ports import RULES

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10
QUEUE_RULE_TABLES = {NFPROTO_IPV4: "mangle", NFPROTO_IPV6: "mangle"}
"""Where iptables-nft keeps the xt queue rule (adapters/nfqueue.py); the native one is in inet <table>_queue."""
NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE = 0, 2
NFT_MSG_NEWGEN = 15
TABLE_ATTR = 1
"""NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_SET_ELEM_LIST_TABLE: all 1."""
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
OBJECT_MESSAGES = frozenset(range(NFT_MSG_NEWTABLE, NFT_MSG_NEWGEN))

Drift = Callable[[str, dict[str, set[str]] | None], None]
"""Called with who changed the table and what they did ("nft (pid 123) deleted set elements"), or
"notifications lost"; and what must be put back: the deleted elements by set name when that is all the change
did, {RULES: set()} when it touched only chains and rules, None when the whole table must be put back."""


WHAT = {0: "added the table", 2: "deleted the table", 3: "added chains", 5: "deleted chains", 6: "added rules",
        8: "deleted rules", 9: "added sets", 11: "deleted sets", 12: "added set elements",
        14: "deleted set elements"}


RULES_ONLY = frozenset({"added chains", "deleted chains", "added rules", "deleted rules"})
NFT_MSG_DELSETELEM = 14
NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE = 1, 1, 1


def deleted_elements(body: bytes) -> tuple[str, set[str]] | None:
    """(set name, host prefixes) of a DELSETELEM message whose elements all carry an address key; None when it
    does not say which (a flushed set, interval elements)."""
    found = dict(attrs(body))
    name = found.get(NFTA_SET_ELEM_LIST_SET, b"").split(b"\0", 1)[0].decode(errors="replace")
    prefixes: set[str] = set()
    for kind, elem in attrs(found.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
        if kind != NFTA_LIST_ELEM:
            return None
        key = dict(attrs(elem)).get(NFTA_SET_ELEM_KEY)
        value = dict(attrs(key)).get(NFTA_DATA_VALUE) if key is not None else None
        if value is None or len(value) not in (4, 16):
            return None
        prefixes.add(f"{ipaddress.ip_address(value)}/{len(value) * 8}")
    return (name, prefixes) if name and prefixes else None


def decode(data: bytes, table: str) -> list[tuple[str, object]]:
    """("touched", (what, the body of a DELSETELEM or None)) for each message about `table` (family inet),
    ("queue", what) for each about the tables where the handshake queue rule lives, ("gen", (pid, name)) for each
    NEWGEN. Deleted elements are decoded (deleted_elements) only for transactions of others: the NEWGEN that
    names the process ends the transaction, and most are gatewayd's own (a release per batch)."""
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
                deleted = body[4:] if msg == NFT_MSG_DELSETELEM else None
                out.append(("touched", (WHAT.get(msg, f"message {msg}"), deleted)))
            elif name == f"{table}_queue":
                out.append(("queue", WHAT.get(msg, f"message {msg}")))
        elif msg in OBJECT_MESSAGES and QUEUE_RULE_TABLES.get(family) is not None:
            name = found.get(TABLE_ATTR, b"").split(b"\0", 1)[0].decode(errors="replace")
            if name == QUEUE_RULE_TABLES[family]:
                out.append(("queue", WHAT.get(msg, f"message {msg}")))
    return out


class NftMonitor:
    """Reports transactions of others that touched one inet table, and (to `on_queue_rule`) those that touched
    the tables where the handshake queue rule lives."""

    def __init__(self, table: str, on_drift: Drift, on_queue_rule: Callable[[str], None] | None = None, *,
                 own_threads: Collection[int] = ()) -> None:
        """`own_threads`: kernel thread ids (a live collection) of other threads whose transactions are ours, such
        as the enforcer's writer thread (NftEnforcer.writer_threads)."""
        self.table = table
        self._own_threads = own_threads
        self.on_drift = on_drift
        self.on_queue_rule = on_queue_rule
        self._queue_touched = False
        # Our own transactions are announced too, while the event loop is still inside them: the buffer holds
        # a transaction of 100,000 elements (a team Disconnect, a start-up). At 4 MiB such a transaction
        # overflowed it, and each time the loss was verified as possible drift (the whole table put back, a
        # false "drift repaired" event). It is a limit, not memory set aside.
        self._sub = Subscription(NETLINK_NETFILTER, 1 << (NFNLGRP_NFTABLES - 1), self._received, self._lost,
                                 rcvbuf=64 << 20)
        self._touched: dict[str, int] = {}
        """What the transaction under way did to our table, and how many times."""
        self._deleted: list[bytes] = []
        """The DELSETELEM bodies of the transaction under way (decoded if it is not ours)."""
        self._precise = True
        """The transaction under way only deleted elements (listed in _deleted)."""
        self._own: set[int] = {os.getpid()}

    async def start(self) -> None:
        # Our transactions run on the event loop's thread: its id is what the kernel names as their process.
        self._own.add(threading.get_native_id())
        self._sub.start()

    async def close(self) -> None:
        self._sub.close()

    def _lost(self, exc: OSError) -> None:
        # ENOBUFS: notifications were lost; only a full comparison can tell what changed.
        log.warning("nftables notifications lost (%s): verifying the table", exc)
        self._touched, self._deleted, self._precise = {}, [], True
        self.on_drift("notifications lost", None)

    def _received(self, data: bytes) -> None:
        for what, value in decode(data, self.table):
            if what == "queue":
                self._queue_touched = True
                continue
            assert isinstance(value, tuple)
            if what == "touched":
                kind, deleted = value
                self._touched[kind] = self._touched.get(kind, 0) + 1
                if deleted is None:
                    self._precise = False
                elif self._precise:
                    self._deleted.append(deleted)
                continue
            pid, name = value
            if self._touched and pid not in self._own and pid not in self._own_threads:
                done = ", ".join(f"{w} ({n})" if n > 1 else w for w, n in self._touched.items())
                if self._touched.keys() <= RULES_ONLY:
                    scope: dict[str, set[str]] | None = {RULES: set()}
                else:
                    scope = self._deleted_scope() if self._precise else None
                self.on_drift(f"{name or 'unknown'} (pid {pid}) {done}", scope)
            if self._queue_touched and self.on_queue_rule is not None:
                # Our own iptables-nft calls land here too (another process): checking then finds nothing to do.
                self.on_queue_rule(f"{name or 'unknown'} (pid {pid})")
            self._touched, self._deleted, self._precise = {}, [], True
            self._queue_touched = False

    def _deleted_scope(self) -> dict[str, set[str]] | None:
        """The elements the transaction deleted, by set; None if one message cannot be read as such."""
        scope: dict[str, set[str]] = {}
        for body in self._deleted:
            deleted = deleted_elements(body)
            if deleted is None:
                return None
            name, prefixes = deleted
            scope.setdefault(name, set()).update(prefixes)
        return scope
