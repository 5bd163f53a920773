"""rtnetlink watcher against the kernel, in a namespace of the test's own."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import pytest

from gatewayd.adapters.rtnetlink import LinkWatcher, interface_addresses
from tests.netns import inside, namespace

pytestmark = pytest.mark.kernel


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "ip", *args], check=True)


async def wait_for(seen: list[tuple[str, dict[str, Any]]], name: str) -> dict[str, Any]:
    for _ in range(100):
        for kind, fields in seen:
            if kind == name:
                return fields
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} not seen in {seen}")


async def test_link_and_address_changes_of_one_interface() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    with namespace() as ns:
        with inside(ns):
            watcher = LinkWatcher("wgtest0", lambda kind, fields: seen.append((kind, fields)))
            await watcher.start()
        try:
            ip(ns, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
            ip(ns, "link", "add", "wgtest0", "type", "veth", "peer", "name", "wgtest1")
            ip(ns, "link", "set", "wgtest0", "up")
            await wait_for(seen, "link.up")
            ip(ns, "addr", "add", "10.99.0.1/16", "dev", "wgtest0")
            assert (await wait_for(seen, "address.added"))["address"] == "10.99.0.1/16"
            ip(ns, "addr", "del", "10.99.0.1/16", "dev", "wgtest0")
            await wait_for(seen, "address.removed")
            ip(ns, "link", "set", "wgtest0", "down")
            await wait_for(seen, "link.down")
            ip(ns, "link", "del", "wgtest0")
            await wait_for(seen, "link.removed")
            assert all(f.get("interface") == "wgtest0" for _, f in seen)
        finally:
            await watcher.close()


def test_interface_addresses_lists_one_interface_v4_and_v6() -> None:
    with namespace() as ns:
        ip(ns, "link", "add", "wgx", "type", "veth", "peer", "name", "other")
        ip(ns, "addr", "add", "10.55.0.1/16", "dev", "wgx")
        ip(ns, "addr", "add", "fd55::1/64", "dev", "wgx", "nodad")
        ip(ns, "addr", "add", "10.66.0.1/16", "dev", "other")
        with inside(ns):
            assert sorted(interface_addresses("wgx")) == ["10.55.0.1/16", "fd55::1/64"]
            assert interface_addresses("missing0") == []
