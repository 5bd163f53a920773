"""A full disk under the database, with writes arriving (a tmpfs of its own, filled by a file): the daemon
never exits; each write is refused with UNAVAILABLE naming the database and the full disk; reads go on; what
was committed (and enforced) before holds; the checkpointer does not stop anything; once space returns,
writes work again without a restart."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from gatewayd.v1 import control_pb2, types_pb2
from tests.harness import Harness, config_for, key, start, stop
from tests.pki import Authority

pytestmark = pytest.mark.kernel


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest_asyncio.fixture
async def gw(tmp_path: Path, small_disk: Path) -> AsyncIterator[Harness]:
    ca = Authority("disk CA")
    config = config_for(tmp_path, ca)
    config = replace(config, gateway=replace(config.gateway, database=small_disk / "state.db"))
    h = await start(tmp_path, ca, config)
    try:
        yield h
    finally:
        await stop(h)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def upsert(n: int) -> control_pb2.UpsertMemberRequest:
    return control_pb2.UpsertMemberRequest(member_id=f"member-{n}", team_id="t", role=types_pb2.MEMBER_ROLE_MEMBER,
                                           peer_public_keys=[key(1000 + n)])


async def test_a_full_disk_refuses_writes_and_recovers(gw: Harness, small_disk: Path) -> None:
    gw.source.add(key(1), "10.5.0.1/32", handshake=gw.clock() - 1)
    await gw.enroll("alice", (key(1),))
    await gw.poll()
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key="before"))
    assert gw.enforcer.held == {"10.5.0.1/32"}
    filler = fill(small_disk)
    refusals = []
    for n in range(300):  # until the WAL needs a page the disk does not have
        try:
            await gw.local().UpsertMember(upsert(n))
        except grpc.aio.AioRpcError as exc:
            refusals.append((n, exc.code(), exc.details() or ""))
            if len(refusals) >= 3:
                break
    assert refusals, "the disk never filled"
    for _, code, details in refusals:
        assert code is grpc.StatusCode.UNAVAILABLE, details
        assert str(small_disk / "state.db") in details and "full" in details
    refused = [n for n, _, _ in refusals]
    assert all(f"member-{n}" not in gw.daemon.core.members for n in refused)  # nothing of them kept
    # Still up: reads work, the kernel holds what was committed, the checkpointer has not stopped anything.
    await asyncio.sleep(1.5)
    assert not any(t.done() for t in gw.daemon._tasks)
    status = await gw.local().GetStatus(control_pb2.GetStatusRequest())
    assert status.quarantined == 1 and gw.enforcer.held == {"10.5.0.1/32"}
    sessions = await gw.local().ListSessions(control_pb2.ListSessionsRequest())
    assert [s.member_id for s in sessions.sessions] == ["alice"]
    assert gw.daemon.driver.storage_failed is not None
    # Space returns: writes work again, by themselves.
    os.unlink(filler)
    await gw.local().UpsertMember(upsert(refused[0]))
    assert f"member-{refused[0]}" in gw.daemon.core.members and gw.daemon.driver.storage_failed is None
    assert await gw.daemon.store.state.member_exists(f"member-{refused[0]}")
