"""A WireGuard gateway lab in network namespaces on this machine (used by `make demo`, the end-to-end tests
and the benchmarks): a gateway namespace running wireguard-go and gatewayd, an upstream server namespace, and
peer namespaces each with their own wireguard-go. Everything it creates it removes again, also on errors."""
