"""The challenge API served by worker processes ([challenge] workers, gatewayd.api.relay): real processes, real
gRPC on loopback. What the API answers is checked in test_challenge_api/test_device_api/test_fuzz for both ways
of serving it; here: the processes themselves, their privileges, their failures, and the wire between them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from gatewayd.api import relay
from gatewayd.api.relay import ChallengeWorkers
from gatewayd.config import ConfigError, validate
from gatewayd.v1 import challenge_pb2, control_pb2, types_pb2
from tests.harness import Harness, config_for, eventually, key, start, stop, write_config
from tests.pki import Authority

ME = key(1)
LOOPBACK = "127.0.0.1/32"


def status_of(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not running either.
    return status_of(pid).get("State", "").split()[0] not in ("Z", "X")


async def quarantined(gw: Harness) -> None:
    gw.source.add(ME, LOOPBACK, handshake=gw.clock() - 1)
    await gw.enroll("alice", (ME,))
    await gw.poll()
    await gw.local().Disconnect(control_pb2.DisconnectRequest(member_id="alice", idempotency_key=os.urandom(8).hex()))
    assert LOOPBACK in gw.enforcer.held


def workers_of(gw: Harness) -> ChallengeWorkers:
    assert isinstance(gw.daemon.challenge, ChallengeWorkers)
    return gw.daemon.challenge


async def test_workers_are_children_without_capabilities_or_new_privileges(tmp_path: Path) -> None:
    gw = await start(tmp_path, Authority("ca"), workers=2)
    try:
        pids = workers_of(gw).pids
        assert len(pids) == 2 and os.getpid() not in pids
        for pid in pids:
            status = status_of(pid)
            assert int(status["PPid"]) == os.getpid()
            assert status["NoNewPrivs"] == "1"
            for cap in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
                assert int(status[cap], 16) == 0, (cap, status[cap])
            assert b"gatewayd.api.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        await stop(gw)


async def test_a_killed_worker_is_replaced_and_calls_keep_being_served(tmp_path: Path) -> None:
    gw = await start(tmp_path, Authority("ca"), workers=2)
    try:
        await quarantined(gw)
        first, second = workers_of(gw).pids
        os.kill(first, signal.SIGKILL)
        # Once it is reaped (a connection that reaches a dying worker's socket is reset; clients reconnect).
        await eventually(lambda: first not in workers_of(gw).pids)
        # Meanwhile the other worker serves every new connection (SO_REUSEPORT skips a closed socket).
        for _ in range(8):
            challenge = await gw.challenge().GetChallenge(challenge_pb2.GetChallengeRequest())
            assert challenge.state == types_pb2.PEER_STATE_QUARANTINED
        await eventually(lambda: len(workers_of(gw).pids) == 2 and first not in workers_of(gw).pids)
        assert second in workers_of(gw).pids and not alive(first)
        assert (await gw.challenge().SubmitTotp(challenge_pb2.SubmitTotpRequest(code=gw.code()))).accepted
        assert LOOPBACK not in gw.enforcer.held
    finally:
        await stop(gw)


async def test_stop_leaves_no_worker_running(tmp_path: Path) -> None:
    gw = await start(tmp_path, Authority("ca"), workers=3)
    pids = workers_of(gw).pids
    assert len(pids) == 3
    await stop(gw)
    assert not any(alive(pid) for pid in pids)


async def test_a_worker_exits_when_the_daemon_end_of_its_socket_closes(tmp_path: Path) -> None:
    gw = await start(tmp_path, Authority("ca"), workers=1)
    try:
        workers = workers_of(gw)
        workers.stopping = True  # not replaced: this test watches the old one go
        (worker,) = [w for w in workers.workers if w is not None]
        worker.transport.close()
        code = await asyncio.wait_for(worker.process.wait(), 10)
        assert code == 0
    finally:
        await stop(gw)


async def test_an_address_in_use_fails_start_and_leaves_no_worker(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody else may bind this port
    holder.listen()
    port = holder.getsockname()[1]
    children_before = set(_children())
    config = config_for(tmp_path, Authority("ca"))
    config = replace(config, challenge=replace(config.challenge, listen=[f"127.0.0.1:{port}"], workers=2))
    try:
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            await start(tmp_path, Authority("ca"), config=config)
        await eventually(lambda: set(_children()) <= children_before)
    finally:
        holder.close()


def _children() -> list[int]:
    tasks = Path(f"/proc/{os.getpid()}/task")
    out: list[int] = []
    for task in tasks.iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


async def test_a_client_that_cancels_its_status_stream_leaves_no_watcher(tmp_path: Path) -> None:
    gw = await start(tmp_path, Authority("ca"), workers=2)
    try:
        await quarantined(gw)
        stream = gw.challenge().WatchStatus(challenge_pb2.WatchStatusRequest())
        first = await asyncio.wait_for(stream.read(), 5)
        assert first.state == types_pb2.PEER_STATE_QUARANTINED
        assert any(gw.daemon.driver.watchers.peers.values())
        stream.cancel()
        await eventually(lambda: not any(gw.daemon.driver.watchers.peers.values()))
    finally:
        await stop(gw)


async def test_a_request_over_the_size_limit_is_resource_exhausted_before_the_daemon(tmp_path: Path) -> None:
    config = config_for(tmp_path, Authority("ca"))
    config = replace(config, control=replace(config.control, max_message_bytes=4096))
    gw = await start(tmp_path, Authority("ca"), config=config, workers=2)
    try:
        await quarantined(gw)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gw.challenge().SubmitTotp(challenge_pb2.SubmitTotpRequest(code="1" * 5000))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # A malformed but small one reaches the daemon's own validation.
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await gw.challenge().SubmitTotp(challenge_pb2.SubmitTotpRequest(code="1" * 100))
        assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (await gw.challenge().GetChallenge(challenge_pb2.GetChallengeRequest())).attempts_left == 10
    finally:
        await stop(gw)


async def test_a_deadline_travels_with_the_call(tmp_path: Path) -> None:
    gw = await start(tmp_path, Authority("ca"), workers=1)
    try:
        seen: list[float | None] = []
        link = next(w for w in workers_of(gw).workers if w is not None).link
        index = next(i for i, m in enumerate(link.methods) if m.name == "GetChallenge")
        original = link.methods[index]

        async def spy(request: object, context: relay.RelayedContext) -> object:
            seen.append(context.time_remaining())
            return await original.handler(request, context)

        link.methods[index] = replace(original, handler=spy)
        with pytest.raises(grpc.aio.AioRpcError):  # nobody's tunnel address: refused, after the spy saw it
            await gw.challenge().GetChallenge(challenge_pb2.GetChallengeRequest(), timeout=7)
        # Seconds, not ms: load may delay the call, and gRPC rounds the grpc-timeout header up (7.008 s was seen).
        assert len(seen) == 1 and seen[0] is not None and 1 < seen[0] <= 7.5
    finally:
        await stop(gw)


async def test_reload_moves_between_in_process_and_worker_processes(tmp_path: Path) -> None:
    ca = Authority("ca")
    path = tmp_path / "gatewayd.toml"
    config = config_for(tmp_path, ca)
    write_config(config, path)
    gw = await start(tmp_path, ca, config=config, config_path=path)
    try:
        await quarantined(gw)
        assert isinstance(gw.daemon.challenge, grpc.aio.Server)
        write_config(replace(config, challenge=replace(config.challenge, workers=2)), path)
        await gw.daemon.reload()
        pids = workers_of(gw).pids
        assert len(pids) == 2
        assert (await gw.challenge().GetChallenge(challenge_pb2.GetChallengeRequest())).attempts_left == 10
        write_config(config, path)
        await gw.daemon.reload()
        assert isinstance(gw.daemon.challenge, grpc.aio.Server)
        await eventually(lambda: not any(alive(pid) for pid in pids))
        assert (await gw.challenge().SubmitTotp(challenge_pb2.SubmitTotpRequest(code=gw.code()))).accepted
    finally:
        await stop(gw)


@pytest.mark.parametrize("value", [-1, 17, 1 << 63])
def test_workers_out_of_range_is_refused(tmp_path: Path, value: int) -> None:
    config = config_for(tmp_path, Authority("ca"))
    with pytest.raises(ConfigError, match=r"challenge\.workers"):
        validate(replace(config, challenge=replace(config.challenge, workers=value)))


def test_frames_are_cut_whatever_the_reads() -> None:
    frames = [relay.frame(b"a"), relay.frame(b"bc" * 300), relay.frame(bytes(range(256)))]
    stream = b"".join(frames)
    for step in (1, 3, 7, len(stream)):
        reader = relay.FrameReader(1000)
        got: list[bytes] = []
        for i in range(0, len(stream), step):
            got += reader.feed(stream[i:i + step])
        assert got == [b"a", b"bc" * 300, bytes(range(256))]
        assert not reader.buffer


@pytest.mark.parametrize("size", [0, 1001, 0xFFFFFFFF])
def test_a_frame_of_zero_or_over_the_limit_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="frame of"):
        relay.FrameReader(1000).feed(struct.pack("!I", size) + b"x")


def test_a_call_frame_round_trips_its_fields() -> None:
    encoded = relay.encode_call(7, 2, "ipv4:10.0.0.2:5000", 1.5, b"\x00raw")
    (body,) = relay.FrameReader(1 << 16).feed(encoded)
    kind, call_id, method, millis, size = relay.CALL_HEAD.unpack_from(body)
    assert (kind, call_id, method, millis) == (relay.CALL, 7, 2, 1500)
    assert body[relay.CALL_HEAD.size:relay.CALL_HEAD.size + size] == b"ipv4:10.0.0.2:5000"
    assert body[relay.CALL_HEAD.size + size:] == b"\x00raw"
    no_deadline = relay.FrameReader(1 << 16).feed(relay.encode_call(1, 0, "x", None, b""))[0]
    assert relay.CALL_HEAD.unpack_from(no_deadline)[3] == relay.NO_DEADLINE
    # A deadline too far to count in milliseconds is not "no deadline".
    far = relay.FrameReader(1 << 16).feed(relay.encode_call(1, 0, "x", 1e12, b""))[0]
    assert relay.CALL_HEAD.unpack_from(far)[3] == relay.NO_DEADLINE - 1


async def test_a_malformed_frame_from_a_worker_closes_only_its_link() -> None:
    served: list[bytes] = []

    async def handler(request: bytes, context: relay.RelayedContext) -> bytes:
        served.append(request)
        return b"ok"

    methods = [relay.Method(name="M", handler=handler, parse=bytes, serialize=bytes, streaming=False)]
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, link = await loop.create_unix_connection(lambda: relay.WorkerLink(methods, 100, "test"), sock=ours)
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    writer.write(relay.encode_call(1, 0, "ipv4:127.0.0.1:1", None, b"req"))
    reply = await asyncio.wait_for(reader.readexactly(4 + relay.REPLY_HEAD.size + 2), 5)
    assert relay.REPLY_HEAD.unpack_from(reply, 4) == (relay.REPLY, 1, 0) and reply[-2:] == b"ok"
    writer.write(relay.encode_call(2, 9, "x", None, b""))  # no method 9
    await asyncio.wait_for(link.closed.wait(), 5)
    assert served == [b"req"]
    writer.close()
    transport.close()
