"""gatewayctl against a running daemon's local socket, and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import json
import sys

from gatewayd.v1 import challenge_pb2, control_pb2
from tests.harness import Harness, gw, key

__all__ = ["gw"]


async def ctl(gw: Harness, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd.ctl", "--socket", str(gw.tmp / "control.sock"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def metrics_page(gw: Harness) -> str:
    """The body of GET /metrics."""
    assert gw.daemon.metrics_server is not None
    port = gw.daemon.metrics_server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    data = (await reader.read()).decode()
    writer.close()
    assert data.startswith("HTTP/1.1 200 OK")
    return data.split("\r\n\r\n", 1)[1]


async def scrape(gw: Harness) -> dict[str, float]:
    values = {}
    for line in (await metrics_page(gw)).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_gatewayctl_tells_the_story(gw: Harness) -> None:
    gw.source.add(key(1), "10.9.0.2/32", handshake=gw.clock() - 3)
    gw.source.add(key(2), "10.9.0.3/32", handshake=gw.clock() - 3)
    await gw.enroll("alice", (key(1),))
    await gw.policy(1)
    await gw.poll()
    follow = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd.ctl", "--socket", str(gw.tmp / "control.sock"), "events", "--follow",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        code, out, _ = await ctl(gw, "sessions")
        assert code == 0
        lines = out.splitlines()
        assert lines[0].split() == ["MEMBER", "PEER", "TUNNEL", "IPS", "ENDPOINT", "STATE", "LAST", "HANDSHAKE", "OWES"]
        alice = next(line for line in lines if line.startswith("alice"))
        assert "10.9.0.2/32" in alice and "authorized" in alice and "s ago" in alice
        assert "locked" in next(line for line in lines if line.startswith("-"))
        await asyncio.sleep(0.5)  # let `events --follow` subscribe
        code, out, _ = await ctl(gw, "disconnect", "alice", "--reason", "SIEM alert")
        assert code == 0 and "1 sessions cut, 1 peers quarantined" in out
        code, out, _ = await ctl(gw, "--json", "sessions", "--state", "quarantined")
        assert [s["member_id"] for s in json.loads(out)] == ["alice"]
        assert json.loads(out)[0]["owes"] == ["PROOF_KIND_OTP"]
        line = await asyncio.wait_for(follow.stdout.readline(), 10)  # type: ignore[union-attr]
        while b"disconnect.executed" not in line:
            line = await asyncio.wait_for(follow.stdout.readline(), 10)  # type: ignore[union-attr]
        assert b"member/alice" in line and b"SIEM alert" in line
    finally:
        follow.terminate()
        await follow.wait()
    code, out, _ = await ctl(gw, "status")
    assert code == 0 and "1 authorized" not in out and "1 quarantined, 1 locked" in out
    code, out, _ = await ctl(gw, "--json", "policy", "team-1")
    assert code == 0 and json.loads(out)["version"] == "1"
    await gw.policy(2)  # the newest event is now one the filter hides: without --follow it must still end
    code, out, _ = await ctl(gw, "events", "--type", "disconnect.")
    assert code == 0 and out.count("disconnect.executed") == 1 and "policy.applied" not in out


async def test_gatewayctl_errors_are_clear(gw: Harness) -> None:
    code, _, err = await ctl(gw, "session", key(42))
    assert code == 1 and err.startswith("gatewayctl: NOT_FOUND: ")
    code, _, err = await ctl(gw, "policy", "nobody")
    assert code == 1 and "no policy for team 'nobody'" in err
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd.ctl", "--socket", "/nonexistent/control.sock", "status",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err_b = await proc.communicate()
    assert proc.returncode == 2 and b"cannot reach gatewayd" in err_b


async def test_metrics(gw: Harness) -> None:
    gw.source.add(key(1), "127.0.0.1/32", handshake=gw.clock())
    await gw.enroll("alice", (key(1),))
    await gw.poll()
    await gw.local().Disconnect(control_pb2.DisconnectRequest(
        member_id="alice", idempotency_key="m"))
    await gw.challenge().SubmitTotp(challenge_pb2.SubmitTotpRequest(code="000000" if gw.code() != "000000"
                                                                    else "111111"))
    assert (await gw.challenge().SubmitTotp(challenge_pb2.SubmitTotpRequest(code=gw.code()))).accepted
    m = await scrape(gw)
    assert m['gatewayd_sessions{state="authorized"}'] == 1.0
    assert m["gatewayd_quarantined_prefixes"] == 0.0
    assert m["gatewayd_disconnect_seconds_count"] == 1.0 and m["gatewayd_disconnect_seconds_sum"] > 0
    assert m['gatewayd_challenge_results_total{factor="totp",outcome="accepted"}'] == 1.0
    assert m['gatewayd_challenge_results_total{factor="totp",outcome="refused"}'] == 1.0
    assert m["gatewayd_poll_seconds_count"] >= 2 and m["gatewayd_enforcement_healthy"] == 1.0
    assert m["gatewayd_broker_connected"] == 0.0 and m["gatewayd_outbox_unpublished"] == 0.0
    assert m["gatewayd_poll_interval_seconds"] == 1.0 and m["gatewayd_poll_read_seconds"] == 0.0  # auto, free reads
    await gw.daemon.checkpointer.once()
    m = await scrape(gw)
    assert m["gatewayd_sqlite_wal_frames"] > 0  # the proof flow above wrote to the WAL
