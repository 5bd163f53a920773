"""The runtime: the driver that owns the core, the operations it runs, and the daemon around it."""
