"""Run the real gatewayd inside the lab's gateway namespace, with config/gatewayd.toml's defaults and only the
lab's paths and interface changed. Readiness is observed through a notify socket the lab owns."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import grpc

from gatewayd.lab.netlab import Lab
from gatewayd.v1 import control_pb2_grpc

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "gatewayd.toml"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def dump_toml(data: dict[str, Any]) -> str:
    out: list[str] = []

    def table(prefix: str, body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if prefix:
            out.append(f"[{prefix}]")
        out.extend(f"{_toml_value(k) if not k.isidentifier() else k} = {_toml_value(v)}" for k, v in scalars.items())
        out.append("")
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(out)


class LabGateway:
    """gatewayd as a process in the lab."""

    def __init__(self, lab: Lab, **overrides: dict[str, Any]) -> None:
        self.lab = lab
        with open(EXAMPLE, "rb") as f:
            config = tomllib.load(f)
        work = lab.workdir
        key = work / "secrets.key"
        if not key.exists():
            key.write_bytes(os.urandom(32))
            key.chmod(0o600)
        config["gateway"].update(id=f"lab-{lab.tag}", database=str(work / "state.db"), secrets_key_file=str(key))
        config["wireguard"]["interface"] = lab.gw_iface
        config["control"]["unix_socket"] = str(work / "control.sock")
        for section, values in overrides.items():
            config.setdefault(section, {}).update(values)
        self.config_path = work / "gatewayd.toml"
        self.config_path.write_text(dump_toml(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.notifications: list[str] = []
        self._channel: grpc.Channel | None = None

    def start(self, timeout: float = 30) -> float:
        """Start and wait for READY=1; returns seconds to ready."""
        notify_path = self.lab.workdir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify_path))
        sock.settimeout(0.2)
        started = time.monotonic()
        self.proc = self.lab.spawn(self.lab.gw_ns, sys.executable, "-m", "gatewayd", "run", "--config",
                                   str(self.config_path), log="gatewayd.log",
                                   env={"NOTIFY_SOCKET": str(notify_path)})
        try:
            while time.monotonic() - started < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gatewayd exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    message = sock.recv(4096).decode()
                except TimeoutError:
                    continue
                self.notifications.append(message)
                if "READY=1" in message.split("\n"):
                    return time.monotonic() - started
            raise RuntimeError(f"gatewayd not ready after {timeout} s: {self.log_tail()}")
        finally:
            sock.close()

    def log_tail(self, lines: int = 20) -> str:
        path = self.lab.workdir / "gatewayd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def control(self) -> control_pb2_grpc.ControlServiceStub:
        if self._channel is None:
            self._channel = grpc.secure_channel(f"unix:{self.lab.workdir / 'control.sock'}",
                                                grpc.local_channel_credentials(grpc.LocalConnectionType.UDS))
        return control_pb2_grpc.ControlServiceStub(self._channel)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is None:
            return None
        code = Lab.stop(self.proc, sig)
        self.proc = None
        return code
