"""The ports: what the runtime needs from the kernel and the disk, as protocols. Adapters implement them;
the runtime sees only these."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol

from gatewayd.auth.backup import KdfParams
from gatewayd.auth.ledger import Entries, Lifetime
from gatewayd.auth.limits import AttemptState
from gatewayd.auth.totp import TotpFactor
from gatewayd.core.model import Factor, Member, PeerRecord, Role, TeamPolicy
from gatewayd.core.tracking import PeerSnapshot, Snapshot
from gatewayd.errors import StorageFailed
from gatewayd.scheduling import Pause, no_pause


@dataclass(frozen=True, kw_only=True)
class SetChange:
    """One atomic change of the enforcement sets."""

    quarantine: Sequence[str] = ()
    """Prefixes that enter quarantine."""
    release: Sequence[str] = ()
    """Prefixes that leave quarantine."""
    track: Sequence[str] = ()
    """Prefixes of decided peers: tunnel traffic from them passes the tracked-source check."""
    untrack: Sequence[str] = ()
    """Prefixes no decided peer holds: tunnel traffic from them is refused."""

    def __bool__(self) -> bool:
        return bool(self.quarantine or self.release or self.track or self.untrack)


class Enforcer(Protocol):
    """The kernel's enforcement: quarantine sets and tracked-source sets."""

    async def reconcile(self, quarantined: Collection[str], tracked: Collection[str]) -> list[str]:
        """Compare the kernel with these sets and make it hold exactly them (creating what is missing), in one
        transaction; returns what differed, in words (empty: the kernel already held them)."""
        ...

    def prefetch(self) -> None:
        """Begin reading the kernel's current state for the next reconcile, in the background (at start-up, while
        the store loads: a listing of 200,000 elements takes most of a second). Only once the nftables monitor
        listens: a change made after this read is then reported and repaired by the guard."""
        ...

    async def verify(self, quarantined: Collection[str], tracked: Collection[str]) -> list[str]:
        """What differs between the kernel and these sets, in words; changes nothing, and does not hold up the
        writes (a listing of 20,000 elements takes a quarter of a second)."""
        ...

    async def reassert(self, quarantined: Collection[str], tracked: Collection[str], *, elements: bool = True
                       ) -> None:
        """Put back everything enforcement must hold, in one transaction, without reading the kernel first (fast
        after someone else removed part of it); extras someone added stay until the next reconcile. Without
        `elements`, only the structure (table, sets, chains, rules)."""
        ...

    async def apply(self, change: SetChange, *, first: Callable[[], None] | None = None) -> None:
        """Apply one change in one atomic transaction. `first` (a loosening only): a blocking call that must
        succeed before the change is made - the store's COMMIT (Store.commit_blocking) - run just before it on
        the thread that writes, so that a batch's commit and its releases cost one hop off the event loop; if it
        raises, nothing is applied and its exception propagates."""
        ...

    def quarantined(self) -> AbstractSet[str]:
        """The quarantined prefixes, as last written (a read-only view)."""
        ...

    def tracked(self) -> AbstractSet[str]:
        """The tracked prefixes, as last written (a read-only view)."""
        ...

    async def set_handshake(self, rules: HandshakeRules | None) -> None:
        """Install (or, with None, remove) the chain that rate-limits WireGuard handshake initiations and hands
        them to the queue; it is part of the table from then on (verified and repaired with it)."""
        ...


@dataclass(frozen=True, kw_only=True)
class HandshakeRules:
    """How the enforcement table treats WireGuard handshake initiations (UDP, 148 bytes of payload, to the
    interface's listen port) before they reach WireGuard."""

    listen_port: int
    """The WireGuard interface's UDP port."""
    queue_mark: int
    """Mark bit set on every initiation that goes on to the queue (the queue rule matches it)."""
    recent_mark: int
    """Mark bit set on an initiation from an endpoint that sent data packets in the last `recent_seconds`."""
    rate: int
    """Initiations per second per source address that go on to the queue; the rest are dropped."""
    burst: int
    """Burst allowed above `rate`."""
    recent_seconds: int
    """How long a data packet from an endpoint counts as recent."""


@dataclass(frozen=True, kw_only=True)
class InterfaceIdentity:
    """The WireGuard interface's own key and port. The private key is never logged, stored or exported."""

    private_key: bytes = field(repr=False)
    """32 bytes."""
    listen_port: int
    """UDP port (0: none yet)."""


@dataclass(frozen=True, slots=True)
class QueuedPacket:
    """One packet the kernel holds until it gets a verdict."""

    id: int
    """The kernel's packet id (for the verdict)."""
    mark: int
    """The packet's mark (gatewayd's chain sets bits on it)."""
    payload: bytes
    """The IP packet, from its IP header."""
    outgoing: bool = False
    """Sent by the gateway itself (netfilter's local-out hook), not received."""


class PacketQueue(Protocol):
    """Packets the kernel holds until the daemon gives each a verdict (nfnetlink_queue)."""

    overflows: int
    """Times the kernel could not hand packets over (they were dropped)."""

    def start(self) -> None:
        """Bind the queue; packets are handed to the callback given at construction from then on."""
        ...

    def close(self) -> None:
        """Unbind (unanswered packets are dropped)."""
        ...

    def accept(self, packet_id: int) -> None: ...

    def drop(self, packet_id: int) -> None: ...


class QueueRule(Protocol):
    """The kernel rule that sends marked initiations to the queue (outside the enforcement table)."""

    def ensure(self) -> bool:
        """Install it unless it is there as wanted; True if anything changed."""
        ...

    def present(self) -> bool: ...

    def remove(self) -> None: ...


RULES = "(rules)"
"""In a drift report's scope: the change touched only chains and rules (nftables monitor)."""


class EnforcementMonitor(Protocol):
    """Tells at once when someone else changed the kernel's enforcement (nftables notifications)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...


class PeerSource(Protocol):
    """A WireGuard interface's peers."""

    read_seconds: float
    """How long the latest read kept the interface busy: for a userspace implementation, from the request to
    the end of its answer (its configuration lock is held meanwhile); for the kernel, the dump."""

    async def read(self, pause: Pause = no_pause) -> Snapshot:
        """The interface's peers now. `pause` is awaited before the interface is asked (a userspace
        implementation's configuration lock is held while it answers) and between slices of decoding."""
        ...

    async def identity(self) -> InterfaceIdentity | None:
        """The interface's private key and listen port (None: no interface, or no key set yet)."""
        ...

    async def reset_sessions(self, peers: Sequence[PeerSnapshot]) -> None:
        """Drop the peers' session keys, keeping their configuration (endpoint, psk, allowed IPs, keepalive)."""
        ...


class FlowTable(Protocol):
    """Connection tracking."""

    async def start(self) -> None:
        """Begin following the flow table (before the first flush)."""
        ...

    async def close(self) -> None:
        """Stop following it."""
        ...

    async def flush(self, prefixes: Sequence[str]) -> int:
        """Delete entries from or to these prefixes; returns how many."""
        ...


# ---- the fleet ledger ------------------------------------------------------------------------------


class LedgerUnavailable(Exception):
    """The fleet ledger did not answer (in time), or answered that it cannot serve (no leader, no quorum)."""


class LedgerCompacted(Exception):
    """A watch asked for revisions the ledger compacted away: read everything afresh."""


LedgerValue = dict[str, Any]


class FleetLedger(Protocol):
    """The fleet's shared ledger (etcd): JSON values under the fleet's prefix, keys relative to it."""

    async def start(self) -> None:
        """Open the connection (it connects lazily: etcd need not answer yet)."""
        ...

    async def close(self) -> None: ...

    async def snapshot(self, under: str = "") -> tuple[dict[str, tuple[LedgerValue, int]], int]:
        """Every entry under `under` with its mod_revision, and the revision read at."""
        ...

    async def transact(self, compares: Mapping[str, int],
                       writes: Mapping[str, tuple[LedgerValue | None, Lifetime]],
                       refresh: Sequence[str]) -> tuple[bool, int, Entries]:
        """If every key still has its mod_revision (0: absent), apply the writes: (True, revision, {});
        otherwise write nothing: (False, revision, every entry under the `refresh` prefixes)."""
        ...

    async def put(self, key: str, value: LedgerValue, lifetime: Lifetime) -> int:
        """Write one entry unconditionally; returns its revision."""
        ...

    def watch(self, after: int) -> AsyncIterator[tuple[int, list[tuple[str, LedgerValue | None, int]]]]:
        """Changes of the watched keys (under `w/`) from revision after+1 on: (revision, [(key, value or None if
        deleted, mod_revision)]). Raises LedgerCompacted or LedgerUnavailable."""
        ...


# ---- storage -------------------------------------------------------------------------------------


def new_event_id() -> str:
    """A fresh event id: a time-ordered UUID (version 7, RFC 9562), the Unix time in milliseconds then 74 random
    bits. Ids made later sort later, so a store's unique index on them grows at its end and is pruned at its
    start, where its pages are cached: with random (version 4) ids each insert and each prune lands on a random
    page of an index over up to event_retention rows (SQLite, 100,000 events: twice the cost of inserting and
    pruning a batch's events)."""
    millis = (time.time_ns() // 1_000_000) & 0xFFFF_FFFF_FFFF  # a clock set outside 1970-10889 still gives an id
    raw = bytearray(millis.to_bytes(6, "big") + os.urandom(10))
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # variant: RFC 9562 (and 4122)
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, kw_only=True)
class StoredEvent:
    """One event in the outbox."""

    cursor: int
    """Monotonic position."""
    id: str
    """UUID (new_event_id)."""
    type: str
    """Dotted type."""
    time: float
    """Wall-clock time."""
    subject: str
    """Subject."""
    data_json: str
    """JSON details."""


@dataclass(frozen=True, kw_only=True)
class MemberAuth:
    """The member's verification state, read inside the driver's transaction."""

    attempts: AttemptState
    """Failure counter."""
    reset_pending: bool
    """An MFA reset awaits confirmation of the new factor."""
    totp: TotpFactor | None
    """The active TOTP factor."""
    pending_totp: TotpFactor | None
    """The TOTP factor enrolled after a reset, not yet confirmed."""


@dataclass(frozen=True, kw_only=True)
class DeviceCredential:
    """An enrolled PIN/biometric-unlocked device key (WebAuthn credential)."""

    credential_id: bytes
    """Credential id."""
    cose_public_key: bytes
    """COSE_Key."""
    sign_count: int
    """Last sign count seen."""
    user_handle: bytes
    """User handle."""


class StateStore(Protocol):
    """Teams, members, factors, peers and idempotent answers. Writes join the driver's open transaction."""

    async def load(self) -> tuple[list[TeamPolicy], list[Member], Iterator[PeerRecord]]: ...
    async def team_version(self, team_id: str) -> int | None: ...
    async def save_team(self, t: TeamPolicy) -> None: ...
    async def member_exists(self, member_id: str) -> bool: ...
    async def owners(self, keys: Iterable[str]) -> dict[str, str]:
        """Peer key -> member id, for the keys that belong to a member."""
        ...
    async def save_member(self, member_id: str, team_id: str, role: Role, peers: Iterable[str]) -> None: ...
    async def delete_member(self, member_id: str) -> None: ...
    async def factors(self, member_id: str) -> frozenset[Factor]: ...
    async def member_auth(self, member_id: str) -> MemberAuth | None: ...
    async def save_attempts(self, member_id: str, state: AttemptState) -> None: ...
    async def set_reset_pending(self, member_id: str, pending: bool) -> None: ...
    async def save_totp(self, member_id: str, slot: str, f: TotpFactor) -> None: ...
    async def drop_pending_totp(self, member_id: str) -> None: ...
    async def set_totp_step(self, member_id: str, slot: str, step: int) -> None: ...
    async def promote_pending_totp(self, member_id: str, step: int) -> None:
        """The new factor was used: it replaces the old one, which is invalid from now on."""
        ...
    async def replace_backup_set(self, member_id: str, params: KdfParams, hashes: Sequence[bytes]) -> None: ...
    async def mark_backup_set_before_reset(self, member_id: str) -> None:
        """An MFA reset was requested: the current backup set goes when the new factor is confirmed."""
        ...
    async def drop_backup_set_before_reset(self, member_id: str) -> int:
        """The reset completed: drop a set marked before it; returns how many unused codes went with it."""
        ...
    async def backup_params(self, member_id: str) -> KdfParams | None: ...
    async def unused_backup_codes(self, member_id: str) -> list[tuple[int, bytes]]: ...
    async def consume_backup_code(self, member_id: str, index: int, now: float) -> bool:
        """Mark the code used; False if it already was."""
        ...
    async def replace_device_credentials(self, member_id: str, creds: Sequence[DeviceCredential]) -> None: ...
    async def device_credential(self, member_id: str, credential_id: bytes) -> DeviceCredential | None: ...
    async def set_sign_count(self, member_id: str, credential_id: bytes, count: int) -> None: ...
    async def issue_nonce(self, nonce: bytes, public_key: str, member_id: str, now: float, ttl: float) -> None: ...
    async def take_nonce(self, nonce: bytes, now: float) -> tuple[str, str, float] | None:
        """Consume an unused nonce: (peer key, member id, expiry), or None if unknown or already used."""
        ...
    async def save_peers(self, records: Iterable[PeerRecord]) -> None: ...
    async def forget_peers(self, keys: Iterable[str]) -> None: ...
    async def idempotent_response(self, key: str) -> dict[str, Any] | None: ...
    async def save_idempotent_response(self, key: str, response: dict[str, Any], now: float) -> None: ...


class Outbox(Protocol):
    """Events, appended in the driver's transaction, read in order by streams and the publisher."""

    next_cursor: int
    """The cursor the next appended event gets."""

    async def append(self, events: Sequence[StoredEvent]) -> None:
        """Insert events numbered from next_cursor on, and move next_cursor past them."""
        ...

    async def prune(self, keep: int, *, keep_unpublished: bool, max_unpublished: int) -> None: ...
    async def mark_published(self, cursors: Sequence[int]) -> None: ...
    async def unpublished(self, limit: int) -> list[StoredEvent]: ...
    async def stats(self) -> tuple[int, float | None]:
        """(unpublished events, time of the oldest unpublished one)."""
        ...
    async def events_after(self, cursor: int, limit: int = 1000) -> list[StoredEvent]: ...
    async def first_cursor(self) -> int | None:
        """The oldest event still kept (retention), or None if there is none."""
        ...


class Store(Protocol):
    """The state and the outbox in one database: a batch writes both in one transaction."""

    @property
    def state(self) -> StateStore: ...

    @property
    def outbox(self) -> Outbox: ...

    async def begin(self) -> None: ...
    async def commit(self) -> None:
        """COMMIT the batch's transaction (waiting for the disk off the event loop)."""
        ...
    def commit_blocking(self) -> None:
        """The same COMMIT on the calling thread: for a thread other than the event loop's (Enforcer.apply's
        `first`)."""
        ...
    async def rollback(self) -> None: ...
    async def savepoint(self) -> None:
        """Start a request's savepoint inside the batch's transaction."""
        ...
    async def release_savepoint(self) -> None: ...
    async def rollback_savepoint(self) -> None:
        """Undo everything the request wrote."""
        ...
    async def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL frames to the database file: (frames in the WAL, frames copied)."""
        ...
    async def load(self) -> tuple[list[TeamPolicy], list[Member], Iterator[PeerRecord]]:
        """Everything committed, to rebuild the core."""
        ...
    def storage_error(self, exc: BaseException) -> StorageFailed | None:
        """`exc` as a StorageFailed naming the database and the cause, if it is a failure to read or write it."""
        ...
