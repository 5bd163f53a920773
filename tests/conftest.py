"""Shared fixtures. Kernel-backed tests need root, nftables, network namespaces and wireguard-go: where those
are missing they skip, except when GATEWAYD_REQUIRE_KERNEL=1 (set by .ci/run), where a skip is a failure."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_KERNEL = os.environ.get("GATEWAYD_REQUIRE_KERNEL") == "1"


def kernel_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "nft", "wireguard-go", "wg", "conntrack", "mosquitto"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def require_tools(*tools: str, package: str) -> None:
    """Skip unless the tools are installed; under GATEWAYD_REQUIRE_KERNEL=1 (CI) their absence is a failure, so
    that a missing Debian package cannot hide tests."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"needs {', '.join(missing)} (Debian {package}) but GATEWAYD_REQUIRE_KERNEL=1")
    pytest.skip(f"needs {', '.join(missing)} (Debian {package})")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    missing = kernel_missing()
    if missing is None:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"kernel test cannot run here ({missing}) but GATEWAYD_REQUIRE_KERNEL=1")
    pytest.skip(missing)
