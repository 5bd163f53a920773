"""The daemon as a service: the sd_notify protocol (through a socket the test owns), the watchdog, reload."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from gatewayd.auth.limits import AttemptPolicy
from gatewayd.runtime.driver import Batch
from tests.fakes import CallJob
from tests.harness import config_for, start, stop, write_config
from tests.pki import Authority


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    ns = NotifySocket(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield ns
    ns.sock.close()


def firsts(messages: list[str]) -> list[str]:
    return [m.split("\n")[0] for m in messages]


async def test_notify_sequence_and_watchdog_only_while_the_driver_progresses(
        tmp_path: Path, notify_socket: NotifySocket) -> None:
    h = await start(tmp_path, Authority("ca"))
    try:
        assert firsts(notify_socket.read())[:1] == ["READY=1"]
        assert h.enforcer.reconciles == 1  # READY came after the reconcile
        await asyncio.sleep(0.8)
        pings = firsts(notify_socket.read()).count("WATCHDOG=1")
        assert pings >= 3
        # A stuck driver gets no pings.
        release = asyncio.Event()

        async def stuck(b: Batch) -> None:
            await release.wait()

        blocked = asyncio.ensure_future(h.daemon.driver.submit(CallJob(stuck)))
        await asyncio.sleep(0.1)
        before = firsts(notify_socket.read()).count("WATCHDOG=1")
        await asyncio.sleep(0.6)
        assert firsts(notify_socket.read()).count("WATCHDOG=1") == before
        release.set()
        await blocked
        await asyncio.sleep(0.4)
        assert firsts(notify_socket.read()).count("WATCHDOG=1") > before
    finally:
        await stop(h)
    assert firsts(notify_socket.read())[-1] == "STOPPING=1"


async def test_reload_swaps_a_valid_file_and_keeps_the_old_one_on_error(
        tmp_path: Path, notify_socket: NotifySocket) -> None:
    ca = Authority("ca")
    config = config_for(tmp_path, ca)
    path = write_config(config, tmp_path / "gatewayd.toml")
    h = await start(tmp_path, ca, config=config, config_path=path)
    try:
        old_port = h.daemon.challenge_ports
        write_config(replace(config, auth=AttemptPolicy(max_failures=5),
                             challenge=replace(config.challenge, listen=["127.0.0.1:0"])), path)
        assert await h.daemon.reload()
        assert h.daemon.driver.settings.attempts.max_failures == 5
        assert h.daemon.challenge_ports != old_port and len(h.daemon.challenge_ports) == 1
        assert firsts(notify_socket.read())[-2:] == ["RELOADING=1", "READY=1"]
        # A bad value: nothing changes, and the refusal says which key.
        path.write_text(path.read_text().replace("max_failures = 5", "max_failures = 0"))
        assert not await h.daemon.reload()
        assert h.daemon.driver.settings.attempts.max_failures == 5
        rows = await h.daemon.store.outbox.events_after(0)
        assert "auth.max_failures" in [r for r in rows if r.type == "config.reload_refused"][-1].data_json
        # A key that needs a restart is refused too.
        write_config(replace(config, gateway=replace(config.gateway, id="other")), path)
        assert not await h.daemon.reload()
        assert h.daemon.config.gateway.id == "gw-test"
        assert "RELOADING=1" not in firsts(notify_socket.messages)[-1:]
        write_config(replace(config, handshake=replace(config.handshake, daemon_down="bypass")), path)
        assert not await h.daemon.reload()
        assert h.daemon.config.handshake.daemon_down == "closed"
    finally:
        await stop(h)
