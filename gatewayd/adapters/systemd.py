"""sd_notify over $NOTIFY_SOCKET (no libsystemd): READY, RELOADING, STOPPING, WATCHDOG, STATUS."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def watchdog_interval() -> float | None:
    """Half of WatchdogSec (systemd's advice), when the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


def notify(message: str) -> bool:
    """Send one notification; False when not started by systemd or the manager is gone (never raises:
    a lost notification must not stop the daemon from enforcing or shutting down)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify %r failed: %s", message.split("\n")[0], exc)
        return False
    return True
