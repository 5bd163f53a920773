"""The throwaway PKI lives in gatewayd.lab.pki (the fleet lab and its benchmark need it too)."""

from gatewayd.lab.pki import Authority, write_server_files

__all__ = ["Authority", "write_server_files"]
