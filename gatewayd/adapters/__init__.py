"""Adapters: one per outside thing (nftables, WireGuard, conntrack, rtnetlink, SQLite, MQTT, metrics, systemd).
Each implements a port or serves the daemon; none imports another."""
