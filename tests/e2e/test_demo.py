"""`make demo` runs the whole story, and leaves nothing behind — also when interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.kernel


def lab_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("gwd")}


def demo() -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gatewayd.lab.demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_demo_completes_and_cleans_up() -> None:
    before = lab_namespaces()
    proc = demo()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "0 sent after its answer (must be 0)" in out
    assert "she types her TOTP code: authorized=True" in out and "gatewayd-client: accepted" in out
    assert "proves again with gatewayd-client: authorized=True" in out
    assert "gatewayctl events --follow: disconnect.executed" in out
    assert lab_namespaces() == before


def test_interrupted_demo_cleans_up() -> None:
    before = lab_namespaces()
    proc = demo()
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if "SIEM -> Disconnect" in line:
            break
        assert time.monotonic() < deadline
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in out and "cleaned up" in out
    assert lab_namespaces() == before
