"""In-memory implementations of the kernel ports (and a job from a function), for tests of the runtime and
the APIs only.
The real adapters are tested against the kernel in tests/adapters and tests/e2e."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from gatewayd.core.tracking import PeerSnapshot
from gatewayd.ports import HandshakeRules, InterfaceIdentity, SetChange
from gatewayd.runtime.driver import Batch
from gatewayd.scheduling import Pause, no_pause

T = TypeVar("T")


@dataclass(frozen=True)
class CallJob(Generic[T]):
    """A driver job made of a test's coroutine function."""

    fn: Callable[[Batch], Awaitable[T]]

    async def run(self, b: Batch) -> T:
        return await self.fn(b)


class MemoryEnforcer:
    def __init__(self) -> None:
        self.held: set[str] = set()
        self.tracked_: set[str] = set()
        self.transactions: list[SetChange] = []
        self.reconciles = 0
        self.prefetched = False
        self.fail_next = False
        self.handshake: HandshakeRules | None = None

    async def reconcile(self, quarantined: Collection[str], tracked: Collection[str]) -> list[str]:
        self.reconciles += 1
        changes = [f"{kind} differed" for kind, held, want in (("quarantine", self.held, set(quarantined)),
                                                                ("tracked", self.tracked_, set(tracked)))
                   if held != want]
        self.held, self.tracked_ = set(quarantined), set(tracked)
        return changes

    def prefetch(self) -> None:
        self.prefetched = True

    async def verify(self, quarantined: Collection[str], tracked: Collection[str]) -> list[str]:
        return [f"{kind} differed" for kind, held, want in (("quarantine", self.held, set(quarantined)),
                                                             ("tracked", self.tracked_, set(tracked)))
                if held != want]

    async def reassert(self, quarantined: Collection[str], tracked: Collection[str], *, elements: bool = True
                       ) -> None:
        if elements:
            self.held |= set(quarantined)
            self.tracked_ |= set(tracked)

    async def set_handshake(self, rules: HandshakeRules | None) -> None:
        self.handshake = rules

    async def apply(self, change: SetChange, *, first: Callable[[], None] | None = None) -> None:
        if first is not None:
            if change.quarantine or change.untrack:
                raise ValueError("a tightening is enforced before the commit, never after it")
            await asyncio.to_thread(first)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected nftables failure")
        self.transactions.append(change)
        self.held = (self.held | set(change.quarantine)) - set(change.release)
        self.tracked_ = (self.tracked_ | set(change.track)) - set(change.untrack)

    def quarantined(self) -> frozenset[str]:
        return frozenset(self.held)

    def tracked(self) -> frozenset[str]:
        return frozenset(self.tracked_)


class MemorySource:
    def __init__(self) -> None:
        self.peers: dict[str, PeerSnapshot] = {}
        self.resets: list[str] = []
        self.reads = 0
        self.read_seconds = 0.0
        self.unreachable: OSError | None = None
        """Set to make resets fail as when wireguard-go is down."""

    def add(self, key: str, *ips: str, handshake: float | None = None) -> None:
        self.peers[key] = PeerSnapshot(public_key=key, endpoint="192.0.2.1:51820", allowed_ips=tuple(ips),
                                       last_handshake=handshake, keepalive=25)

    async def read(self, pause: Pause = no_pause) -> dict[str, PeerSnapshot]:
        await pause()
        self.reads += 1
        return dict(self.peers)

    async def identity(self) -> InterfaceIdentity | None:
        return None

    async def reset_sessions(self, peers: Sequence[PeerSnapshot]) -> None:
        if self.unreachable is not None:
            raise self.unreachable
        self.resets.extend(p.public_key for p in peers)


class MemoryFlows:
    def __init__(self) -> None:
        self.flushed: list[str] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def flush(self, prefixes: Sequence[str]) -> int:
        self.flushed.extend(prefixes)
        return len(prefixes)
