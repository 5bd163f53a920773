"""The conntrack adapter against the kernel: flows from before the start (seeded by a dump) and after it
(learned from events) are deleted by address; others stay."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from gatewayd.adapters.conntrack import Conntrack
from tests.netns import inside, namespace

pytestmark = pytest.mark.kernel


def flows(ns: str, source: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-L", "-s", source], capture_output=True,
                         text=True, check=False).stdout
    return len(out.splitlines())


def in_namespace(ns: str, fn: object) -> None:
    """Run fn on a thread that entered the namespace (sockets belong to their creator's namespace)."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with inside(ns):
                fn()  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    if errors:
        raise errors[0]


_next_port = iter(range(20000, 30000))


def send(source: str, count: int) -> None:
    """`count` datagrams, each from its own source port: `count` distinct flows (an ephemeral port could be
    handed out twice, and two datagrams would then be one flow)."""
    six = ":" in source
    for _ in range(count):
        with socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((source, next(_next_port)))
            s.sendto(b"x", ("::1" if six else "127.0.0.1", 7))


def prepare(ns: str) -> None:
    """Conntrack is on in a namespace once a rule uses it; local sources to send from (two of each family)."""
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], check=True, text=True, input=(
        "table inet t {\n chain c {\n type filter hook output priority 0;\n ct state new counter\n }\n}\n"))
    for address in ("10.99.0.3", "10.99.0.4"):
        subprocess.run(["ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    for address in ("fd99::3", "fd99::4"):
        subprocess.run(["ip", "netns", "exec", ns, "ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"],
                       check=True)


@contextlib.asynccontextmanager
async def started(seed: Callable[[], object]) -> AsyncIterator[tuple[str, Conntrack]]:
    """A prepared namespace whose flows from `seed` exist before the adapter starts (it finds them by a dump)."""
    with namespace() as ns:
        prepare(ns)
        in_namespace(ns, seed)
        with inside(ns):
            ct = Conntrack()
            await ct.start()
        try:
            yield ns, ct
        finally:
            await ct.close()


def send_both() -> None:
    send("10.99.0.3", 7)
    send("10.99.0.4", 9)


async def test_flush_deletes_seeded_and_learned_flows_by_address() -> None:
    async with started(lambda: send("10.99.0.3", 5)) as (ns, ct):
        in_namespace(ns, send_both)
        assert flows(ns, "10.99.0.3") == 12 and flows(ns, "10.99.0.4") == 9
        with inside(ns):
            assert await ct.flush(["10.99.0.3/32"]) == 12
        assert flows(ns, "10.99.0.3") == 0 and flows(ns, "10.99.0.4") == 9
        with inside(ns):
            assert await ct.flush(["10.99.0.0/24"]) == 9
        assert flows(ns, "10.99.0.4") == 0
        # A lost event stream falls back to one walk of the table.
        in_namespace(ns, lambda: send("10.99.0.4", 3))
        ct._by_address.clear()
        ct._stale = True
        with inside(ns):
            assert await ct.flush(["10.99.0.4/32"]) == 3


async def test_ipv6_flows_are_deleted_by_address_and_by_prefix() -> None:
    """The same for a peer's IPv6 tunnel addresses: flows seeded before the start and learned after it, deleted
    by /128 and by a subnet prefix; IPv4 flows of the same host number untouched."""
    def learned() -> None:
        send("fd99::3", 3)
        send("fd99::4", 5)
        send("10.99.0.3", 2)

    async with started(lambda: send("fd99::3", 4)) as (ns, ct):
        in_namespace(ns, learned)
        assert flows(ns, "fd99::3") == 7 and flows(ns, "fd99::4") == 5
        with inside(ns):
            assert await ct.flush(["fd99::3/128"]) == 7
        assert flows(ns, "fd99::3") == 0 and flows(ns, "fd99::4") == 5 and flows(ns, "10.99.0.3") == 2
        with inside(ns):
            assert await ct.flush(["FD99:0::/64"]) == 5  # any spelling of the prefix
        assert flows(ns, "fd99::4") == 0 and flows(ns, "10.99.0.3") == 2
