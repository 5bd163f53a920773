"""A throwaway network namespace for adapter tests: created per test, deleted after."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator

from gatewayd.lab.netlab import entered as inside

__all__ = ["inside", "namespace", "nft"]


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    name = f"gwdt{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def nft(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], capture_output=True, text=True,
                          check=True).stdout
