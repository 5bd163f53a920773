"""The fleet ledger in etcd (v3 API over gRPC with mTLS).

The client is aetcd's generated etcd v3 stubs (`aetcd.rpc`, PyPI `aetcd`: the maintained asyncio etcd client,
on the grpcio we already run) over our own `grpc.aio.secure_channel`: aetcd's own Client only opens insecure
channels, and the ledger needs mTLS with the gateway's identity, compares on mod_revision, leases and a watch
that resumes from a revision - all plain etcd v3 messages.

Every key lives under the fleet's prefix. Values are JSON. A key that must not live forever is attached to one
of two rotating leases: a lease is granted with the lifetime's TTL and replaced after a tenth of it, so a key
lives between 0.9 and 1.0 times its lifetime without a keep-alive per key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc

from gatewayd.auth.ledger import WATCHED, Entries, Lifetime
from gatewayd.ports import LedgerCompacted, LedgerUnavailable, LedgerValue

log = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class EtcdSettings:
    endpoints: tuple[str, ...]
    """host:port of each etcd member (IP addresses)."""
    prefix: str
    """Key prefix of this fleet, ending in '/'."""
    ca_file: Path
    """CA bundle for the etcd servers' certificates."""
    cert_file: Path
    """The gateway's client certificate."""
    key_file: Path
    """Its key."""
    server_name: str = ""
    """Name to check the servers' certificates against; empty: the first endpoint's host."""
    timeout: float = 2.0
    """Seconds a ledger operation may take, retries included."""
    window_ttl: int = 1800
    """Lifetime.WINDOW in seconds."""
    retain_ttl: int = 30 * 86400
    """Lifetime.RETAIN in seconds."""


_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _range_end(prefix: bytes) -> bytes:
    """The end of etcd's range for every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _target(endpoints: tuple[str, ...]) -> str:
    hosts = []
    scheme = "ipv4"
    for e in endpoints:
        host, _, port = e.rpartition(":")
        host = "127.0.0.1" if host == "localhost" else host
        if ":" in host.strip("[]"):
            scheme = "ipv6"
            host = f"[{host.strip('[]')}]"
        hosts.append(f"{host}:{port}")
    return f"{scheme}:" + ",".join(hosts)


class EtcdLedger:
    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self._prefix = settings.prefix.encode()
        self._channel: grpc.aio.Channel | None = None
        self._leases: dict[Lifetime, tuple[int, float]] = {}
        self._lease_lock = asyncio.Lock()

    # ---- connection ---------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        credentials = grpc.ssl_channel_credentials(
            root_certificates=s.ca_file.read_bytes(), private_key=s.key_file.read_bytes(),
            certificate_chain=s.cert_file.read_bytes())
        first_host = s.endpoints[0].rpartition(":")[0].strip("[]")
        options = [("grpc.lb_policy_name", "round_robin"),
                   ("grpc.ssl_target_name_override", s.server_name or first_host),
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000),
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                   ("grpc.keepalive_permit_without_calls", 1)]
        self._channel = grpc.aio.secure_channel(_target(s.endpoints), credentials, options=options)
        self._kv = rpc.KVStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _call(self, method: Any, request: Any) -> Any:
        """One unary call, retried until the ledger's timeout when etcd cannot answer now (a member down, an
        election under way): each try gets a third of the time. Retrying a request that may have been applied
        is safe here: every write is either idempotent or a transaction whose compares fail the second time."""
        deadline = time.monotonic() + self.settings.timeout
        delay = 0.05
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LedgerUnavailable(f"etcd did not answer within {self.settings.timeout:g} s")
            try:
                return await method(request, timeout=min(left, self.settings.timeout / 3),
                                    metadata=(("hasleader", "true"),))
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code in _TRANSIENT and time.monotonic() + delay < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                raise LedgerUnavailable(f"etcd: {code.name}: {details}") from None

    # ---- reads and writes ---------------------------------------------------------------------------

    def _relative(self, key: bytes) -> str:
        return key[len(self._prefix):].decode()

    def _entries(self, kvs: Any) -> dict[str, tuple[LedgerValue, int]]:
        out = {}
        for kv in kvs:
            try:
                key = self._relative(kv.key)
            except UnicodeDecodeError:
                continue  # not a key gatewayd writes (they are ASCII)
            try:
                value = json.loads(kv.value)
            except (ValueError, UnicodeDecodeError):
                value = None
            if not isinstance(value, dict):
                # Kept with its revision, read as empty: a transaction must still compare against it, or every
                # proof of that member would fail its compare forever.
                log.error("fleet: a malformed ledger entry %r is read as empty", key[:200])
                value = {}
            out[key] = (value, kv.mod_revision)
        return out

    async def snapshot(self, under: str = "") -> tuple[dict[str, tuple[LedgerValue, int]], int]:
        """Every entry under `under` (relative to the prefix), and the revision they were read at."""
        key = self._prefix + under.encode()
        reply = await self._call(self._kv.Range, rpc.RangeRequest(key=key, range_end=_range_end(key)))
        return self._entries(reply.kvs), reply.header.revision

    async def _lease_for(self, lifetime: Lifetime) -> int:
        if lifetime is Lifetime.KEEP:
            return 0
        ttl = self.settings.window_ttl if lifetime is Lifetime.WINDOW else self.settings.retain_ttl
        async with self._lease_lock:
            current = self._leases.get(lifetime)
            if current is not None and time.monotonic() < current[1]:
                return current[0]
            reply = await self._call(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl))
            self._leases[lifetime] = (reply.ID, time.monotonic() + ttl / 10)
            return int(reply.ID)

    async def _ops(self, writes: Mapping[str, tuple[LedgerValue | None, Lifetime]]) -> list[Any]:
        ops = []
        for key, (value, lifetime) in writes.items():
            full = self._prefix + key.encode()
            if value is None:
                ops.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=full)))
            else:
                ops.append(rpc.RequestOp(request_put=rpc.PutRequest(
                    key=full, value=json.dumps(value, separators=(",", ":")).encode(),
                    lease=await self._lease_for(lifetime))))
        return ops

    async def transact(self, compares: Mapping[str, int], writes: Mapping[str, tuple[LedgerValue | None, Lifetime]],
                       refresh: Sequence[str]) -> tuple[bool, int, Entries]:
        """If every key still has its mod_revision (0: absent), apply the writes: (True, revision, {}).
        Otherwise nothing is written: (False, revision, every entry under the `refresh` prefixes now)."""
        cmp = [rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=self._prefix + k.encode(),
                           mod_revision=rev) for k, rev in compares.items()]
        unders = [self._prefix + r.encode() for r in refresh]
        failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=u, range_end=_range_end(u))) for u in unders]
        reply = await self._call(self._kv.Txn, rpc.TxnRequest(compare=cmp, success=await self._ops(writes),
                                                              failure=failure))
        if reply.succeeded:
            return True, reply.header.revision, {}
        fresh: dict[str, tuple[LedgerValue, int]] = {}
        for response in reply.responses:
            fresh.update(self._entries(response.response_range.kvs))
        return False, reply.header.revision, fresh

    async def put(self, key: str, value: LedgerValue, lifetime: Lifetime) -> int:
        """Write one entry unconditionally; returns its revision."""
        ops = await self._ops({key: (value, lifetime)})
        reply = await self._call(self._kv.Txn, rpc.TxnRequest(success=ops))
        return int(reply.header.revision)

    async def watch(self, after: int) -> AsyncIterator[tuple[int, list[tuple[str, LedgerValue | None, int]]]]:
        """Changes of the watched keys (under `w/`: demands, attempts, resets) from revision after+1 on:
        (revision, [(key, value or None if deleted, mod_revision)]). Raises LedgerCompacted, or LedgerUnavailable
        when the stream breaks (the member lost its leader, or the connection)."""
        assert self._channel is not None
        call = self._watch.Watch(metadata=(("hasleader", "true"),))
        try:
            watched = self._prefix + WATCHED.encode()
            await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=watched, range_end=_range_end(watched), start_revision=after + 1, progress_notify=True)))
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise LedgerUnavailable("etcd closed the watch")
                if reply.compact_revision:
                    raise LedgerCompacted(f"revisions up to {reply.compact_revision} were compacted")
                if reply.canceled:
                    raise LedgerUnavailable(f"etcd canceled the watch: {reply.cancel_reason}")
                changes: list[tuple[str, LedgerValue | None, int]] = []
                for event in reply.events:
                    try:
                        key = self._relative(event.kv.key)
                    except UnicodeDecodeError:
                        continue  # not a key gatewayd writes
                    if event.type == rpc.Event.DELETE:
                        changes.append((key, None, event.kv.mod_revision))
                        continue
                    try:
                        value = json.loads(event.kv.value)
                    except (ValueError, UnicodeDecodeError):
                        value = None
                    if not isinstance(value, dict):
                        log.error("fleet: a malformed ledger entry %r is read as empty", key[:200])
                        value = {}
                    changes.append((key, value, event.kv.mod_revision))
                yield reply.header.revision, changes
        except grpc.aio.AioRpcError as exc:
            raise LedgerUnavailable(f"etcd watch: {exc.code().name}: {exc.details() or ''}") from None
        finally:
            call.cancel()
