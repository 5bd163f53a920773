"""gatewayd: access-enforcement daemon for VPN gateways (MFA step-up enforced at the data plane)."""

__version__ = "0.1.0"
