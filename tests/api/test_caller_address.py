"""The challenge API knows its caller by the source address in gRPC's peer string: every form gRPC writes, and
anything else refused (None: the caller is then nobody's)."""

from __future__ import annotations

import pytest

from gatewayd.api.services import address_of_peer


@pytest.mark.parametrize(("peer", "address"), [
    ("ipv4:10.0.0.1:51000", "10.0.0.1"),
    ("ipv6:%5B2001:db8::1%5D:51000", "2001:db8::1"),  # what gRPC 1.85 writes
    ("ipv6:[2001:db8::1]:51000", "2001:db8::1"),  # what older versions wrote
    ("ipv6:%5B::1%5D:1", "::1"),
    ("ipv6:%5B2001:DB8:0::0001%5D:1", "2001:db8::1"),  # canonical form, as the peer's prefix is stored
    ("ipv6:%5B::ffff:10.0.0.1%5D:1", "10.0.0.1"),  # a v4-mapped caller on a dual-stack socket
    ("ipv6:%5Bfe80::1%25wg0%5D:1", "fe80::1"),  # the zone is not part of the address
    ("ipv6:[fe80::1%wg0]:1", "fe80::1"),
])
def test_addresses_in_every_form_grpc_writes(peer: str, address: str) -> None:
    assert address_of_peer(peer) == address


@pytest.mark.parametrize("peer", [
    "", "unix:/run/gatewayd/control.sock", "unix-abstract:x", "ipv4:", "ipv4:999.1.1.1:5", "ipv4:10.0.0.1%00:5",
    "ipv4:10.0.0.1/32:5", "ipv6:%5Bnot-an-address%5D:1", "ipv6:%5B%FF%FE%5D:1", "ipv6:%5B%5D:1", "ipv6:",
    "ipv4:::1:5", "ipv6:%5B10.0.0.1%5D:1", "IPV4:10.0.0.1:5", "vsock:3:5",
])
def test_anything_else_is_nobody(peer: str) -> None:
    assert address_of_peer(peer) is None
