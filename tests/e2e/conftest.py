"""The namespace lab for end-to-end tests: one per module, a fresh gatewayd per test."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewayd.lab.gateway import LabGateway
from gatewayd.lab.netlab import SERVER_IP, Lab, LabPeer, run
from tests.conftest import kernel_missing


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if kernel_missing():
        pytest.skip("the lab needs the kernel")  # turned into a failure by the kernel marker in CI
    lab = Lab(peers_wanted=2)
    with lab.running():
        # Another firewall on the gateway that tracks connections: gatewayd must leave it alone, and its
        # conntrack entries are what a Disconnect flushes.
        run("nft", "-f", "-", ns=lab.gw_ns, input_=(
            "table inet labfw {\n chain forward_other {\n type filter hook forward priority 0; policy accept;\n"
            " ct state established,related counter accept\n }\n}\n"))
        for peer in lab.peers:
            lab.wait_handshake(peer)
        yield lab


@pytest.fixture
def gateway(lab: Lab) -> Iterator[LabGateway]:
    for f in lab.workdir.glob("state.db*"):
        f.unlink()
    gw = LabGateway(lab)
    gw.start()
    try:
        yield gw
    finally:
        code = gw.stop()
        assert code == 0, f"gatewayd exited with {code}: {gw.log_tail()}"


class Agent:
    """Runs gatewayd.lab.agent in namespaces."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def __call__(self, ns: str, *args: str, timeout: float = 60) -> dict[str, Any]:
        result = self.lab.python(ns, "gatewayd.lab.agent", *args, timeout=timeout)
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        return data

    def background(self, ns: str, *args: str, log: str) -> subprocess.Popen[bytes]:
        return self.lab.spawn(ns, sys.executable, "-m", "gatewayd.lab.agent", *args, log=log)

    def probe(self, peer: LabPeer, to: str) -> str:
        result: str = self(peer.ns, "probe", "--to", to)["result"]
        return result


@pytest.fixture
def agent(lab: Lab) -> Agent:
    return Agent(lab)


class Sink:
    """The upstream server: records every datagram and TCP line that reaches it."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab, self.out = lab, lab.workdir / f"{name}.json"
        self.log = f"{name}.log"
        self.proc = lab.spawn(lab.srv_ns, sys.executable, "-m", "gatewayd.lab.agent", "sink", "--out",
                              str(self.out), log=self.log)
        deadline = time.monotonic() + 10
        while "ready" not in (lab.workdir / self.log).read_text():
            assert time.monotonic() < deadline and self.proc.poll() is None, "sink did not start"
            time.sleep(0.05)

    def collect(self) -> dict[str, list[dict[str, Any]]]:
        Lab.stop(self.proc, signal.SIGTERM)
        data: dict[str, list[dict[str, Any]]] = json.loads(Path(self.out).read_text())
        return data


@pytest.fixture
def sink(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Sink]:
    s = Sink(lab, f"sink-{request.node.name}")
    yield s
    Lab.stop(s.proc)


UDP, TCP = f"{SERVER_IP}:5000", f"{SERVER_IP}:5001"
