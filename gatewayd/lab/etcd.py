"""A real etcd cluster for tests, benchmarks and the fleet demo (Debian `etcd-server`): N members on loopback
ports, clients over mTLS (the members check client certificates against the given CA), members talking to each
other over plain HTTP on loopback. Members can be killed and restarted one by one, by PID."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    proc: subprocess.Popen[bytes] | None = None


class EtcdCluster:
    def __init__(self, *, cert_file: Path, key_file: Path, ca_file: Path, size: int = 3,
                 netns: str | None = None, ports: list[tuple[int, int]] | None = None) -> None:
        """`netns`: run the members inside this network namespace (ports then need not be free on the host)."""
        self.dir = Path(tempfile.mkdtemp(prefix="gatewayd-etcd-"))
        self.cert_file, self.key_file, self.ca_file, self.netns = cert_file, key_file, ca_file, netns
        chosen = ports or [(_free_port(), _free_port()) for _ in range(size)]
        self.members = [EtcdMember(name=f"n{i + 1}", client_port=c, peer_port=p) for i, (c, p) in enumerate(chosen)]
        self.token = self.dir.name

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{m.client_port}" for m in self.members]

    def _argv(self, m: EtcdMember) -> list[str]:
        initial = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.members)
        argv = [
            "etcd", "--name", m.name, "--data-dir", str(self.dir / m.name),
            "--listen-client-urls", f"https://127.0.0.1:{m.client_port}",
            "--advertise-client-urls", f"https://127.0.0.1:{m.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
            "--initial-cluster", initial, "--initial-cluster-state", "new", "--initial-cluster-token", self.token,
            "--cert-file", str(self.cert_file), "--key-file", str(self.key_file),
            "--trusted-ca-file", str(self.ca_file), "--client-cert-auth",
            # Fast elections on loopback: a killed member's successor is chosen within a second.
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-outputs", str(self.dir / f"{m.name}.log"),
        ]
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start_member(self, m: EtcdMember) -> None:
        m.proc = subprocess.Popen(self._argv(m), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self, timeout: float = 30) -> None:
        for m in self.members:
            self.start_member(m)
        self.wait_healthy(timeout)

    def etcdctl(self, *args: str, endpoints: list[str] | None = None, timeout: float = 10
                ) -> subprocess.CompletedProcess[str]:
        argv = ["etcdctl", "--endpoints", ",".join(f"https://{e}" for e in endpoints or self.endpoints),
                "--cacert", str(self.ca_file), "--cert", str(self.cert_file), "--key", str(self.key_file),
                "--command-timeout", "3s", *args]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})

    def wait_healthy(self, timeout: float = 30, members: list[EtcdMember] | None = None) -> None:
        """Until a write through each running member (or the given ones) succeeds."""
        chosen = members or [m for m in self.members if m.proc is not None and m.proc.poll() is None]
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for m in chosen:
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited: {self.log_tail(m)}")
            done = self.etcdctl("put", "/_health", "ok", endpoints=[f"127.0.0.1:{m.client_port}" for m in chosen])
            if done.returncode == 0:
                return
            last = done.stderr.strip()
            time.sleep(0.2)
        raise RuntimeError(f"etcd not healthy after {timeout} s: {last}")

    def log_tail(self, m: EtcdMember, lines: int = 5) -> str:
        path = self.dir / f"{m.name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def kill(self, m: EtcdMember) -> None:
        """SIGKILL the member (a crash), by PID."""
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)
        m.proc = None

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.terminate()
        for m in self.members:
            if m.proc is not None:
                try:
                    m.proc.wait(10)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait(5)
                m.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[EtcdCluster]:
        try:
            self.start()
            yield self
        finally:
            self.stop()
