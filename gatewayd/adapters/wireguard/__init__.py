"""WireGuard peer sources: the kernel over generic netlink, or a userspace implementation's UAPI socket."""

from __future__ import annotations

import logging

from gatewayd.config import WireGuardSection
from gatewayd.ports import PeerSource

log = logging.getLogger(__name__)


def kernel_available() -> bool:
    """Whether the kernel's "wireguard" generic netlink family exists."""
    from gatewayd.adapters.wireguard.kernel import family_exists

    return family_exists()


def open_source(cfg: WireGuardSection) -> PeerSource:
    backend = cfg.backend
    if backend == "auto":
        backend = "kernel" if kernel_available() else "uapi"
        log.info("wireguard backend for %s: %s", cfg.interface, backend)
    if backend == "kernel":
        from gatewayd.adapters.wireguard.kernel import KernelWireGuard

        return KernelWireGuard(cfg.interface)
    from gatewayd.adapters.wireguard.uapi import UapiWireGuard

    return UapiWireGuard(cfg.uapi_socket_dir / f"{cfg.interface}.sock")
