"""Connection tracking: delete the flows from or to quarantined prefixes (pyroute2, in a worker thread).

For a few host prefixes the kernel filters the dump by address (CTA_FILTER); for many, or for wider prefixes,
one full dump is filtered here. pyroute2's sync classes are used: its async ones do not run under uvloop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator, Sequence
from typing import Any

FILTERED_DUMP_LIMIT = 16

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class Conntrack:
    def _entries(self, ct: Any, family: int, nets: list[Net]) -> Iterator[Any]:
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        hosts = all(n.prefixlen == n.max_prefixlen for n in nets)
        if hosts and len(nets) <= FILTERED_DUMP_LIMIT:
            for n in nets:
                address = str(n.network_address)
                yield from ct.dump(tuple_orig=NFCTAttrTuple(family=family, saddr=address))
                yield from ct.dump(tuple_orig=NFCTAttrTuple(family=family, daddr=address))
            return
        for entry in ct.dump():
            t = NFCTAttrTuple.from_netlink(family, entry.get_attr("CTA_TUPLE_ORIG"))
            addrs = [ipaddress.ip_address(a) for a in (t.saddr, t.daddr) if a]
            if any(a in n for a in addrs for n in nets if a.version == n.version):
                yield entry

    def _flush(self, prefixes: Sequence[str]) -> int:
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, NFCTSocket

        nets: list[Net] = [ipaddress.ip_network(p, strict=False) for p in prefixes]
        deleted = 0
        for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            wanted = [n for n in nets if n.version == version]
            if not wanted:
                continue
            with NFCTSocket(nfgen_family=family) as ct:
                origs = [NFCTAttrTuple.from_netlink(family, e.get_attr("CTA_TUPLE_ORIG"))
                         for e in self._entries(ct, family, wanted)]
                for orig in origs:
                    try:
                        ct.entry("del", tuple_orig=orig)
                        deleted += 1
                    except NetlinkError as exc:
                        if exc.code != 2:  # ENOENT: already gone (seen by both dumps, or expired)
                            raise
        return deleted

    async def flush(self, prefixes: Sequence[str]) -> int:
        return await asyncio.to_thread(self._flush, prefixes)
