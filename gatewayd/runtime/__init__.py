"""The runtime: the driver that owns the core, the jobs it runs (control, proofs), the tracker that owns what
WireGuard says, and the checkpointer. It reaches the kernel and the disk only through gatewayd.ports."""
