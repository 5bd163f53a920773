"""The unit file: valid, Type=notify, and rated at an exposure of 2.0 or lower by systemd-analyze."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_KERNEL

UNIT = Path(__file__).parent.parent / "systemd" / "gatewayd.service"


@pytest.fixture
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if REQUIRE_KERNEL:
            pytest.fail("systemd-analyze is missing but GATEWAYD_REQUIRE_KERNEL=1")
        pytest.skip("systemd-analyze is missing")
    return tool


def test_security_exposure_at_most_2(analyze: str) -> None:
    out = subprocess.run([analyze, "security", "--offline=true", str(UNIT)], capture_output=True, text=True,
                         check=False)
    match = re.search(r"Overall exposure level for gatewayd.service: ([0-9.]+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.0


def test_unit_essentials() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecReload=", "CapabilityBoundingSet=CAP_NET_ADMIN",
                 "StateDirectory=gatewayd", "LoadCredential=secrets-key:", "User=gatewayd", "NoNewPrivileges=yes",
                 "LogRateLimitIntervalSec=0"):
        assert line in text
