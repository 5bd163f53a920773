"""nftables enforcement through libnftables (JSON), in one table that gatewayd owns and nothing else.

table inet <name>:
  sets quarantine4/6: tunnel addresses of peers that owe a proof (plain hash sets: WireGuard peers usually hold
    host prefixes, and libnftables' interval handling is pathologically slow for mass deletions), with
    quarantine4_nets/6_nets (interval) for wider prefixes;
  sets tracked4/6 (+ _nets): tunnel prefixes of every configured peer whose state gatewayd has decided;
  chain forward_quarantine: nothing from or to a quarantined prefix is forwarded, and nothing from or to a
    tunnel address gatewayd has not decided on yet (a peer added to WireGuard between two polls);
  chain input_quarantine: over the WireGuard interface, the challenge port is open; otherwise a quarantined
    or undecided source reaches nothing on the gateway;
  chain handshake (when handshake detection is on; input, priority -200): remembers for a few seconds which
    endpoints sent WireGuard data packets (sets handshake_recent4/6), rate-limits initiations per source
    address (sets handshake_flood4/6; the excess is dropped), and marks each initiation that goes on - with the
    "recent" bit if its endpoint sent data lately - for the queue rule (adapters/nfqueue.py), which lives
    outside this table; chain handshake_out (output, -200) marks the initiations the gateway's WireGuard
    sends itself.
Blocked traffic is rejected with ICMP administratively prohibited so client apps notice at once. Rules match
addresses statelessly, so an established flow stalls the moment its source enters the set. Every change is
one transaction.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import os
import threading
from collections.abc import Callable, Collection
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import nftables

from gatewayd.ports import HandshakeRules, SetChange

FAMILY = "inet"
SETS = {"quarantine": ("quarantine4", "quarantine6"), "tracked": ("tracked4", "tracked6")}
NETS = "_nets"  # suffix of the interval set beside each host set


class NftError(RuntimeError):
    pass


CLONE_NEWNET = 0x40000000


def _this_netns() -> int | None:
    """The calling thread's network namespace (a descriptor), if /proc shows it."""
    try:
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    except OSError:
        return None


def _writer_thread(netns: int | None, ids: set[int]) -> None:
    """A writer thread notes its kernel thread id in `ids`, and works in the network namespace its enforcer was
    made in (libnftables' socket is opened there already; this keeps any reopened one there too). Usually that
    is the process's own: no setns, which would need CAP_SYS_ADMIN."""
    ids.add(threading.get_native_id())
    if netns is None:
        return
    try:
        here, there = os.stat("/proc/thread-self/ns/net"), os.fstat(netns)
        if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(netns, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns to the enforcer's network namespace")
    finally:
        os.close(netns)


def _normalize(prefix: str) -> str:
    # Prefixes from the core are already normalized (str(ip_network)): skip the costly parse for those.
    address, _, length = prefix.partition("/")
    if length in ("32", "128") and prefix == f"{address}/{length}" and address == address.lower():
        return prefix
    return str(ipaddress.ip_network(prefix, strict=False))


def _split(prefix: str) -> tuple[int, bool, Any]:
    """(IP version, is a host, nftables element) of a normalized prefix."""
    address, _, length = prefix.partition("/")
    version = 6 if ":" in address else 4
    if length == ("128" if version == 6 else "32"):
        return version, True, address
    return version, False, {"prefix": {"addr": address, "len": int(length)}}


def _from_elem(elem: Any) -> str:
    if isinstance(elem, str):
        # nft lists a host element as its canonical address: no parse needed (100,000 of them at start-up).
        return f"{elem}/128" if ":" in elem else f"{elem}/32"
    if isinstance(elem, dict) and "prefix" in elem:
        return _normalize(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
    if isinstance(elem, dict) and "range" in elem:
        lo, hi = (ipaddress.ip_address(a) for a in elem["range"])
        nets = list(ipaddress.summarize_address_range(lo, hi))
        return ",".join(str(n) for n in nets)
    raise NftError(f"unexpected set element {elem!r}")


def _describe(kind: str, missing: set[str], extra: set[str]) -> list[str]:
    out = []
    for what, which in (("missing from", missing), ("extra in", extra)):
        if which:
            shown = ", ".join(sorted(which)[:5]) + (f" and {len(which) - 5} more" if len(which) > 5 else "")
            out.append(f"{len(which)} prefixes {what} the {kind} sets ({shown})")
    return out


class NftEnforcer:
    def __init__(self, *, table: str, interface: str, challenge_port: int) -> None:
        self.table, self.interface, self.port = table, interface, challenge_port
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._held: dict[str, set[str]] = {kind: set() for kind in SETS}
        # libnftables contexts are not thread-safe; calls may come from worker threads.
        self._lock = threading.Lock()
        self._reader_nft = nftables.Nftables()
        self._reader_nft.set_json_output(True)
        self._reader_nft.set_handle_output(False)
        self._reader_lock = threading.Lock()
        self._handshake: HandshakeRules | None = None
        # Releases are written from this thread: the event loop answers other calls meanwhile (a batch of proofs
        # waits for its release either way). Tightenings stay on the loop's thread, where they are quickest.
        self.writer_threads: set[int] = set()
        """Kernel thread ids of the writer thread: its transactions are gatewayd's own, which the nftables
        monitor must not report (NftMonitor's own_threads)."""
        self._writer = ThreadPoolExecutor(1, "nft-writer", initializer=_writer_thread,
                                          initargs=(_this_netns(), self.writer_threads))
        self._prefetched: asyncio.Future[tuple[list[dict[str, Any]], dict[str, set[str]]] | None] | None = None

    # ---- the table --------------------------------------------------------------------------------

    def _sets(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for v4, v6 in SETS.values():
            for name, kind in ((v4, "ipv4_addr"), (v6, "ipv6_addr")):
                out.append({"set": {"family": FAMILY, "table": self.table, "name": name, "type": kind}})
                out.append({"set": {"family": FAMILY, "table": self.table, "name": name + NETS, "type": kind,
                                    "flags": ["interval"]}})
        if self._handshake is not None:
            timeout = self._handshake.recent_seconds
            for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
                # Filled from the packet path: nftables makes them "dynamic" itself when the rules that update
                # them come in the same transaction, and does not list that flag.
                out.append({"set": {"family": FAMILY, "table": self.table, "name": f"handshake_recent{version}",
                                    "type": [kind, "inet_service"], "size": 65535, "flags": ["timeout"],
                                    "timeout": timeout}})
                out.append({"set": {"family": FAMILY, "table": self.table, "name": f"handshake_flood{version}",
                                    "type": kind, "size": 65535, "flags": ["timeout"], "timeout": 10}})
        return out

    def _chains(self) -> list[dict[str, Any]]:
        return [
            {"chain": {"family": FAMILY, "table": self.table, "name": name, "type": "filter", "hook": hook,
                       "prio": -10, "policy": "accept"}}
            for name, hook in (("forward_quarantine", "forward"), ("input_quarantine", "input"))
        ] + ([{"chain": {"family": FAMILY, "table": self.table, "name": name, "type": "filter",
                         "hook": hook, "prio": -200, "policy": "accept"}}
              for name, hook in (("handshake", "input"), ("handshake_out", "output"))] if self._handshake else [])

    def _rules(self) -> list[dict[str, Any]]:
        def addr(proto: str, field: str, right: Any, op: str = "==") -> dict[str, Any]:
            return {"match": {"op": op, "left": {"payload": {"protocol": proto, "field": field}}, "right": right}}

        def iface(key: str) -> dict[str, Any]:
            return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": self.interface}}

        def reject(icmp: str) -> dict[str, Any]:
            return {"reject": {"type": icmp, "expr": "admin-prohibited"}}

        def rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
            return {"rule": {"family": FAMILY, "table": self.table, "chain": chain, "expr": list(expr)}}

        rules = []
        families = (("ip", 0, "icmp"), ("ip6", 1, "icmpv6"))
        for proto, i, icmp in families:
            for suffix in ("", NETS):
                quarantine = SETS["quarantine"][i] + suffix
                rules += [
                    rule("forward_quarantine", addr(proto, "saddr", f"@{quarantine}"), reject(icmp)),
                    rule("forward_quarantine", addr(proto, "daddr", f"@{quarantine}"), reject(icmp)),
                ]
            # Undecided tunnel addresses: neither in the host set nor in the prefix set of tracked peers.
            tracked, nets = SETS["tracked"][i], SETS["tracked"][i] + NETS
            for key, field in (("iifname", "saddr"), ("oifname", "daddr")):
                rules.append(rule("forward_quarantine", iface(key), addr(proto, field, f"@{tracked}", "!="),
                                  addr(proto, field, f"@{nets}", "!="), reject(icmp)))
        for proto, i, icmp in families:
            tracked, nets = SETS["tracked"][i], SETS["tracked"][i] + NETS
            for suffix in ("", NETS):
                quarantine = SETS["quarantine"][i] + suffix
                rules += [
                    rule("input_quarantine", iface("iifname"), addr(proto, "saddr", f"@{quarantine}"),
                         addr("tcp", "dport", self.port), {"accept": None}),
                    rule("input_quarantine", addr(proto, "saddr", f"@{quarantine}"), reject(icmp)),
                ]
            # Two rules, not one with "tcp dport != port": that match implies TCP, so ICMP, UDP and every other
            # protocol from an undecided address would pass.
            undecided = (iface("iifname"), addr(proto, "saddr", f"@{tracked}", "!="),
                         addr(proto, "saddr", f"@{nets}", "!="))
            rules += [
                rule("input_quarantine", *undecided, addr("tcp", "dport", self.port), {"accept": None}),
                rule("input_quarantine", *undecided, reject(icmp)),
            ]
        return rules + self._handshake_rules()

    def _handshake_rules(self) -> list[dict[str, Any]]:
        h = self._handshake
        if h is None:
            return []

        def rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
            return {"rule": {"family": FAMILY, "table": self.table, "chain": chain, "expr": list(expr)}}

        def match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
            return {"match": {"op": op, "left": left, "right": right}}

        def mark(op: str, value: int) -> dict[str, Any]:
            return {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {op: [{"meta": {"key": "mark"}}, value]}}}

        def field(proto: str, name: str) -> dict[str, Any]:
            return {"payload": {"protocol": proto, "field": name}}

        families = (("ip", 4), ("ip6", 6))
        bits = h.queue_mark | h.recent_mark
        clear = mark("&", 0xFFFFFFFF & ~bits)
        # WireGuard messages start with a type byte and three zero bytes; an initiation is 148 bytes (UDP 156).
        data = match({"payload": {"base": "th", "offset": 64, "len": 32}}, 0x04000000)
        kind = match({"payload": {"base": "th", "offset": 64, "len": 32}}, 0x01000000)
        initiation = match(field("udp", "length"), 156)
        port, sport = match(field("udp", "dport"), h.listen_port), match(field("udp", "sport"), h.listen_port)
        # Nothing before this chain may leave gatewayd's bits set (the "recent" bit lets a rekey through; the
        # queue bit sends a packet to the queue): not another chain, nor the gateway's own output looped back.
        rules = [rule("handshake", match({"&": [{"meta": {"key": "mark"}}, bits]}, 0, "!="), clear)]
        for proto, version in families:
            endpoint = {"concat": [field(proto, "saddr"), field("udp", "sport")]}
            rules.append(rule("handshake", port, data, {"set": {"op": "update", "elem": endpoint,
                                                                "set": f"@handshake_recent{version}"}}))
        for proto, version in families:
            limit = {"limit": {"rate": h.rate, "burst": h.burst, "per": "second", "inv": True}}
            rules.append(rule("handshake", port, initiation, {"set": {
                "op": "add", "elem": field(proto, "saddr"), "set": f"@handshake_flood{version}", "stmt": [limit]}},
                {"drop": None}))
        for proto, version in families:
            endpoint = {"concat": [field(proto, "saddr"), field("udp", "sport")]}
            rules.append(rule("handshake", port, initiation, match(endpoint, f"@handshake_recent{version}"),
                              mark("|", h.recent_mark)))
        rules.append(rule("handshake", port, initiation, mark("|", h.queue_mark)))
        # The gateway's own initiations (WireGuard re-initiating a session): the same marks, towards the peer.
        rules.append(rule("handshake_out", sport, initiation, kind, clear))
        for proto, version in families:
            endpoint = {"concat": [field(proto, "daddr"), field("udp", "dport")]}
            rules.append(rule("handshake_out", sport, initiation, kind, match(endpoint, f"@handshake_recent{version}"),
                              mark("|", h.recent_mark)))
        rules.append(rule("handshake_out", sport, initiation, kind, mark("|", h.queue_mark)))
        return rules

    async def set_handshake(self, rules: HandshakeRules | None) -> None:
        previous, self._handshake = self._handshake, rules
        current = self._current()
        if current is None or current[0] == self._structure():
            return  # no table yet (the next reconcile builds it with the chain), or already as wanted
        present = {(kind, item[kind]["name"]) for item in current[0] for kind in ("set", "chain") if kind in item}
        commands: list[dict[str, Any]] = []
        for chain in ("handshake", "handshake_out"):
            if ("chain", chain) in present:
                commands.append({"delete": {"chain": {"family": FAMILY, "table": self.table, "name": chain}}})
        commands += [{"delete": {"set": {"family": FAMILY, "table": self.table, "name": name}}}
                     for kind, name in sorted(present) if kind == "set" and name.startswith("handshake_")]
        if rules is not None:
            commands += [{"add": item} for item in self._sets() if item["set"]["name"].startswith("handshake_")]
            commands += [{"add": item} for item in self._chains() if item["chain"]["name"].startswith("handshake")]
            commands += [{"add": item} for item in self._handshake_rules()]
        try:
            self._run(commands)
        except NftError:
            self._handshake = previous
            raise

    def _structure(self) -> list[dict[str, Any]]:
        return [*self._sets(), *self._chains(), *self._rules()]


    # ---- libnftables ------------------------------------------------------------------------------

    def _run(self, commands: list[dict[str, Any]]) -> Any:
        with self._lock:
            rc, out, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(err.strip() or f"libnftables failed with {rc}")
        return out

    def _list(self, *, reader: bool = False) -> list[dict[str, Any]] | None:
        # A verification lists through its own context (and lock) from a worker thread: the writes of the event
        # loop's thread never wait for a listing of 20,000 elements.
        nft, lock = (self._reader_nft, self._reader_lock) if reader else (self._nft, self._lock)
        with lock:
            rc, out, err = nft.cmd(f"list table {FAMILY} {self.table}")
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(err.strip())
        items: list[dict[str, Any]] = json.loads(out)["nftables"]
        return [i for i in items if "metainfo" not in i]

    def _current(self, *, reader: bool = False) -> tuple[list[dict[str, Any]], dict[str, set[str]]] | None:
        """The table's structure (sets without elements, chains, rules) and the elements of each set."""
        listing = self._list(reader=reader)
        if listing is None:
            return None
        structure: list[dict[str, Any]] = []
        elements: dict[str, set[str]] = {kind: set() for kind in SETS}
        for item in listing:
            if "table" in item:
                continue
            if "set" in item:
                s = dict(item["set"])
                base = s["name"].removesuffix(NETS)
                kind = next((k for k, names in SETS.items() if base in names), None)
                for e in s.pop("elem", []):
                    if kind is not None:
                        elements[kind].update(_from_elem(e).split(","))
                s.pop("handle", None)
                structure.append({"set": s})
            elif "chain" in item:
                structure.append({"chain": {k: v for k, v in item["chain"].items() if k != "handle"}})
            elif "rule" in item:
                structure.append({"rule": {k: v for k, v in item["rule"].items() if k != "handle"}})
        return structure, elements

    def _elements(self, verb: str, kind: str, prefixes: Collection[str]) -> list[dict[str, Any]]:
        groups: dict[str, list[Any]] = {}
        for p in prefixes:
            version, host, elem = _split(p)
            name = SETS[kind][0 if version == 4 else 1] + ("" if host else NETS)
            groups.setdefault(name, []).append(elem)
        return [{verb: {"element": {"family": FAMILY, "table": self.table, "name": name, "elem": elems}}}
                for name, elems in sorted(groups.items())]

    # ---- the port ---------------------------------------------------------------------------------

    def quarantined(self) -> AbstractSet[str]:
        return self._held["quarantine"]

    def tracked(self) -> AbstractSet[str]:
        return self._held["tracked"]

    async def verify(self, quarantined: Collection[str], tracked: Collection[str]) -> list[str]:
        desired = {"quarantine": {_normalize(p) for p in quarantined},
                   "tracked": {_normalize(p) for p in tracked}}
        current = await asyncio.to_thread(self._current, reader=True)
        if current is None:
            return [f"table {self.table} is missing"]
        if current[0] != self._structure():
            return [f"table {self.table} has other sets, chains or rules"]
        return [change for kind, prefixes in desired.items()
                for change in _describe(kind, prefixes - current[1][kind], current[1][kind] - prefixes)]

    def prefetch(self) -> None:
        self._prefetched = asyncio.ensure_future(asyncio.to_thread(self._current, reader=True))

    async def reconcile(self, quarantined: Collection[str], tracked: Collection[str]) -> list[str]:
        desired = {"quarantine": {_normalize(p) for p in quarantined},
                   "tracked": {_normalize(p) for p in tracked}}
        prefetched, self._prefetched = self._prefetched, None
        current = await prefetched if prefetched is not None else self._current()
        if current is None or current[0] != self._structure():
            # (Re)build the whole table and its elements in one transaction: no moment without it.
            table = {"table": {"family": FAMILY, "name": self.table}}
            commands: list[dict[str, Any]] = [{"add": table}, {"delete": table}, {"add": table}]
            commands += [{"add": item} for item in self._structure()]
            for kind, prefixes in desired.items():
                commands += self._elements("add", kind, prefixes)
            self._run(commands)
            self._held = desired
            return [f"table {self.table} " + ("was missing" if current is None else "had other sets, chains or rules")
                    + f": rebuilt with {len(desired['quarantine'])} quarantined and {len(desired['tracked'])} "
                    "tracked prefixes"]
        commands = []
        changes = []
        for kind, prefixes in desired.items():
            held = current[1][kind]
            missing, extra = prefixes - held, held - prefixes
            commands += self._elements("add", kind, missing)
            commands += self._elements("delete", kind, extra)
            changes += _describe(kind, missing, extra)
        if commands:
            self._run(commands)
        self._held = desired
        return changes

    async def reassert(self, quarantined: Collection[str], tracked: Collection[str], *, elements: bool = True
                       ) -> None:
        """Put back, in one transaction and without reading the kernel first, everything the table must hold:
        the table, its sets and chains (added if missing), the chains' rules (flushed and added again) and every
        element (added: those still there stay). Elements someone added are not removed here (reconcile
        does that). Fails if someone redefined an object with another shape; reconcile rebuilds then."""
        desired = {"quarantine": {_normalize(p) for p in quarantined},
                   "tracked": {_normalize(p) for p in tracked}}
        table = {"table": {"family": FAMILY, "name": self.table}}
        commands: list[dict[str, Any]] = [{"add": table}]
        # Not the handshake sets: added again they differ from the kernel's (dynamic) and fail. If someone
        # removed them, the rules below fail too and the caller rebuilds the table (reconcile).
        commands += [{"add": item} for item in self._sets() if not item["set"]["name"].startswith("handshake_")]
        chains = self._chains()
        commands += [{"add": item} for item in chains]
        commands += [{"flush": {"chain": {"family": FAMILY, "table": self.table, "name": c["chain"]["name"]}}}
                     for c in chains]
        commands += [{"add": item} for item in self._rules()]
        if elements:
            for kind, prefixes in desired.items():
                commands += self._elements("add", kind, prefixes)
        self._run(commands)
        if elements:
            self._held = desired

    async def apply(self, change: SetChange, *, first: Callable[[], None] | None = None) -> None:
        plan = {
            "quarantine": ({_normalize(p) for p in change.quarantine}, {_normalize(p) for p in change.release}),
            "tracked": ({_normalize(p) for p in change.track}, {_normalize(p) for p in change.untrack}),
        }
        commands = []
        for kind, (add, remove) in plan.items():
            remove &= self._held[kind]
            commands += self._elements("add", kind, add) + self._elements("delete", kind, remove)
        tightens = bool(plan["quarantine"][0] or plan["tracked"][1])
        if first is not None and tightens:
            raise ValueError("a tightening is enforced before the commit, never after it")
        if tightens:
            self._run(commands)
        elif commands or first is not None:
            def write() -> None:
                if first is not None:
                    first()  # if the commit fails, nothing is released
                if commands:
                    self._run(commands)
            await asyncio.get_running_loop().run_in_executor(self._writer, write)
        for kind, (add, remove) in plan.items():
            held = self._held[kind]  # in place: a copy of 10,000 prefixes per change is not free
            held |= add
            held -= remove
