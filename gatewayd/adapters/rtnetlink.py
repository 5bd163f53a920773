"""rtnetlink: when the WireGuard interface or its addresses appear, go down or vanish.

A raw NETLINK_ROUTE socket subscribed to link and address groups, read with the event loop's add_reader
(pyroute2's async classes refuse to run under uvloop; a plain socket and a small decoder do not need them).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

from gatewayd.netlink import Subscription, attrs, messages

RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 16, 17, 20, 21, 22
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
IFLA_IFNAME = 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFF_UP = 0x1

Change = Callable[[str, dict[str, Any]], None]


def decode(data: bytes) -> Iterator[tuple[int, dict[str, Any]]]:
    """(message type, fields) of each link or address message in a datagram."""
    for kind, body in messages(data):
        if kind in (RTM_NEWLINK, RTM_DELLINK) and len(body) >= 16:
            _family, _pad, _type, index, flags, _change = struct.unpack_from("=BBHiII", body)
            fields: dict[str, Any] = {"index": index, "up": bool(flags & IFF_UP)}
            for attr, value in attrs(body[16:]):
                if attr == IFLA_IFNAME:
                    fields["name"] = value.split(b"\0", 1)[0].decode(errors="replace")
            yield kind, fields
        elif kind in (RTM_NEWADDR, RTM_DELADDR) and len(body) >= 8:
            family, prefixlen, _flags, _scope, index = struct.unpack_from("=BBBBI", body)
            found: dict[int, bytes] = dict(attrs(body[8:]))
            raw = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
            if raw is None:
                continue
            address = ipaddress.ip_address(raw)
            yield kind, {"index": index, "family": family, "address": f"{address}/{prefixlen}"}


def interface_addresses(interface: str) -> list[str]:
    """The interface's addresses now ("10.0.0.1/24", "fd00::1/64"), from one RTM_GETADDR dump; [] if the
    interface does not exist."""
    try:
        index = socket.if_nametoindex(interface)
    except OSError:
        return []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        request = struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(struct.pack("=IHHII", 16 + len(request), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request)
        found: list[str] = []
        while True:
            data = sock.recv(1 << 16)
            for kind, fields in decode(data):
                if kind == RTM_NEWADDR and fields["index"] == index:
                    found.append(fields["address"])
            if any(kind in (NLMSG_DONE, NLMSG_ERROR) for kind, _ in messages(data)):
                return found


class LinkWatcher:
    """Reports changes of one interface: link.up, link.down, link.removed, address.added, address.removed."""

    def __init__(self, interface: str, on_change: Change) -> None:
        self.interface = interface
        self.on_change = on_change
        self.index: int | None = None
        self.up: bool | None = None
        self._sub = Subscription(socket.NETLINK_ROUTE, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
                                 self._received, self._lost)

    async def start(self) -> None:
        with contextlib.suppress(OSError):
            self.index = socket.if_nametoindex(self.interface)
        self._sub.start()

    async def close(self) -> None:
        self._sub.close()

    def _lost(self, exc: OSError) -> None:
        # ENOBUFS: changes were lost; say so, the tracker re-reads the interface anyway.
        self.on_change("link.resync", {"interface": self.interface})

    def _received(self, data: bytes) -> None:
        for kind, fields in decode(data):
            self._handle(kind, fields)

    def _handle(self, kind: int, fields: dict[str, Any]) -> None:
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            if fields.get("name") != self.interface and fields["index"] != self.index:
                return
            if kind == RTM_DELLINK:
                self.index, self.up = None, None
                self.on_change("link.removed", {"interface": self.interface})
                return
            self.index = fields["index"]
            if fields["up"] != self.up:
                self.up = fields["up"]
                self.on_change("link.up" if self.up else "link.down", {"interface": self.interface})
        elif fields["index"] == self.index:
            name = "address.added" if kind == RTM_NEWADDR else "address.removed"
            self.on_change(name, {"interface": self.interface, "address": fields["address"]})
