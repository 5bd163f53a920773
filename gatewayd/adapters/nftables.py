"""nftables enforcement through libnftables (JSON), in one table that gatewayd owns and nothing else.

table inet <name>:
  sets quarantine4 / quarantine6 (interval): the tunnel prefixes of peers that owe a proof;
  chain forward: nothing from or to a quarantined prefix is forwarded (ICMP administratively prohibited);
  chain input: a quarantined prefix reaches only the challenge port, and only over the WireGuard interface.
Rules match addresses statelessly, so an established flow stalls the moment its source enters the set.
Every change is one transaction: a batch's additions (or removals) are one libnftables call.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Collection, Sequence
from typing import Any

import nftables

FAMILY = "inet"
SET4, SET6 = "quarantine4", "quarantine6"


class NftError(RuntimeError):
    pass


def _normalize(prefix: str) -> str:
    return str(ipaddress.ip_network(prefix, strict=False))


def _elem(prefix: str) -> Any:
    net = ipaddress.ip_network(prefix, strict=False)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _from_elem(elem: Any) -> str:
    if isinstance(elem, str):
        return _normalize(elem)
    if isinstance(elem, dict) and "prefix" in elem:
        return _normalize(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
    if isinstance(elem, dict) and "range" in elem:
        lo, hi = (ipaddress.ip_address(a) for a in elem["range"])
        nets = list(ipaddress.summarize_address_range(lo, hi))
        return ",".join(str(n) for n in nets)
    raise NftError(f"unexpected set element {elem!r}")


class NftEnforcer:
    def __init__(self, *, table: str, interface: str, challenge_port: int) -> None:
        self.table, self.interface, self.port = table, interface, challenge_port
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._held: set[str] = set()
        # libnftables contexts are not thread-safe; calls may come from worker threads.
        self._lock = threading.Lock()

    # ---- the table --------------------------------------------------------------------------------

    def _sets(self) -> list[dict[str, Any]]:
        return [
            {"set": {"family": FAMILY, "table": self.table, "name": name, "type": kind, "flags": ["interval"]}}
            for name, kind in ((SET4, "ipv4_addr"), (SET6, "ipv6_addr"))
        ]

    def _chains(self) -> list[dict[str, Any]]:
        return [
            {"chain": {"family": FAMILY, "table": self.table, "name": name, "type": "filter", "hook": hook,
                       "prio": -10, "policy": "accept"}}
            for name, hook in (("forward_quarantine", "forward"), ("input_quarantine", "input"))
        ]

    def _rules(self) -> list[dict[str, Any]]:
        def match(proto: str, field: str, right: Any, op: str = "==") -> dict[str, Any]:
            return {"match": {"op": op, "left": {"payload": {"protocol": proto, "field": field}}, "right": right}}

        def reject(icmp: str) -> dict[str, Any]:
            return {"reject": {"type": icmp, "expr": "admin-prohibited"}}

        def rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
            return {"rule": {"family": FAMILY, "table": self.table, "chain": chain, "expr": list(expr)}}

        iif = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": self.interface}}
        rules = []
        for proto, set_, icmp in (("ip", SET4, "icmp"), ("ip6", SET6, "icmpv6")):
            for field in ("saddr", "daddr"):
                rules.append(rule("forward_quarantine", match(proto, field, f"@{set_}"), reject(icmp)))
        for proto, set_, icmp in (("ip", SET4, "icmp"), ("ip6", SET6, "icmpv6")):
            rules.append(rule("input_quarantine", iif, match(proto, "saddr", f"@{set_}"),
                              match("tcp", "dport", self.port), {"accept": None}))
            rules.append(rule("input_quarantine", match(proto, "saddr", f"@{set_}"), reject(icmp)))
        return rules

    def _structure(self) -> list[dict[str, Any]]:
        return [*self._sets(), *self._chains(), *self._rules()]

    # ---- libnftables ------------------------------------------------------------------------------

    def _run(self, commands: list[dict[str, Any]]) -> Any:
        with self._lock:
            rc, out, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(err.strip() or f"libnftables failed with {rc}")
        return out

    def _list(self) -> list[dict[str, Any]] | None:
        with self._lock:
            rc, out, err = self._nft.cmd(f"list table {FAMILY} {self.table}")
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(err.strip())
        items: list[dict[str, Any]] = json.loads(out)["nftables"]
        return [i for i in items if "metainfo" not in i]

    def _current(self) -> tuple[list[dict[str, Any]], set[str]] | None:
        """The table's structure (sets without elements, chains, rules) and its set elements."""
        listing = self._list()
        if listing is None:
            return None
        structure, elements = [], set()
        for item in listing:
            if "table" in item:
                continue
            if "set" in item:
                s = dict(item["set"])
                for e in s.pop("elem", []):
                    elements.update(_from_elem(e).split(","))
                s.pop("handle", None)
                structure.append({"set": s})
            elif "chain" in item:
                c = {k: v for k, v in item["chain"].items() if k != "handle"}
                structure.append({"chain": c})
            elif "rule" in item:
                r = {k: v for k, v in item["rule"].items() if k != "handle"}
                structure.append({"rule": r})
        return structure, elements

    def _elements(self, verb: str, prefixes: Collection[str]) -> list[dict[str, Any]]:
        out = []
        for name, version in ((SET4, 4), (SET6, 6)):
            elems = [_elem(p) for p in prefixes if ipaddress.ip_network(p, strict=False).version == version]
            if elems:
                out.append({verb: {"element": {"family": FAMILY, "table": self.table, "name": name,
                                               "elem": elems}}})
        return out

    # ---- the port ---------------------------------------------------------------------------------

    def quarantined(self) -> frozenset[str]:
        return frozenset(self._held)

    async def reconcile(self, prefixes: Collection[str]) -> bool:
        desired = {_normalize(p) for p in prefixes}
        current = self._current()
        if current is None or current[0] != self._structure():
            # (Re)build the whole table and its elements in one transaction: no moment without it.
            table = {"table": {"family": FAMILY, "name": self.table}}
            commands: list[dict[str, Any]] = [{"add": table}, {"delete": table}, {"add": table}]
            commands += [{"add": item} for item in self._structure()]
            commands += self._elements("add", desired)
            self._run(commands)
            self._held = desired
            return True
        held = current[1]
        add, remove = desired - held, held - desired
        if add or remove:
            self._run([*self._elements("add", add), *self._elements("delete", remove)])
        self._held = desired
        return bool(add or remove)

    async def apply(self, add: Sequence[str], remove: Sequence[str]) -> None:
        add_n = {_normalize(p) for p in add}
        remove_n = {_normalize(p) for p in remove} & self._held
        commands = [*self._elements("add", add_n), *self._elements("delete", remove_n)]
        if commands:
            self._run(commands)
        self._held = (self._held | add_n) - remove_n

    def delete_table(self) -> None:
        """Remove the table (tests and lab teardown only; the daemon never does this)."""
        with self._lock:
            self._nft.cmd(f"delete table {FAMILY} {self.table}")
        self._held = set()
