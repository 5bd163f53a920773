"""A real mosquitto broker on loopback for tests: started, stopped (state saved), paused, restarted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    """mosquitto drops to its own user when started as root, so its directory (persistence database, log) lives
    in a fresh directory under the system temp dir, which that user can reach; pytest's tmp_path (mode 0700) it
    cannot, and a broker that cannot save its state would lose the test subscriber's session on restart."""

    def __init__(self, *, netns: str | None = None, port: int | None = None) -> None:
        """`netns`: run inside that network namespace (then `port` is the broker's port there)."""
        self.dir = Path(tempfile.mkdtemp(prefix="gatewayd-test-mosquitto-"))
        self.netns = netns
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir.chmod(0o755)
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam("mosquitto")
            shutil.chown(self.dir, user.pw_uid, user.pw_gid)
        (self.dir / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.dir}/\nlog_dest file {self.dir}/mosquitto.log\n")

    def start(self) -> None:
        argv = ["mosquitto", "-c", str(self.dir / "mosquitto.conf")]
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv] if self.netns else argv,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = self.dir / "mosquitto.log"
        seen = log.read_text(errors="replace").count(" running") if log.exists() else 0
        deadline = time.monotonic() + 10
        while True:
            if self.netns:
                if log.exists() and log.read_text(errors="replace").count(" running") > seen:
                    return
            else:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop by PID; mosquitto saves its persistent state (sessions, queued messages) on SIGTERM."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
            if not (self.dir / "mosquitto.db").exists():
                raise RuntimeError(f"mosquitto saved no state in {self.dir}; a restart would lose sessions")
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


class Subscriber:
    """A persistent-session QoS 1 subscriber that reconnects by itself and keeps every message it gets."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.broker, self.topic = broker, topic
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.broker.port, identifier="test-subscriber",
                                          clean_session=False) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for m in client.messages:
                        self.messages.append((str(m.topic), bytes(m.payload), bool(m.retain)))
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.1)

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.wait_for(self.subscribed.wait(), 10)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def wait_for(self, predicate: Any, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not predicate(self.messages):
            assert time.monotonic() < deadline, f"timed out with {len(self.messages)} messages"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def broker() -> AsyncIterator[Broker]:
    b = Broker()
    try:
        b.start()
        yield b
    finally:
        if b.proc is not None and b.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(b.proc.pid, signal.SIGCONT)
        try:
            b.stop()
        finally:
            shutil.rmtree(b.dir, ignore_errors=True)
