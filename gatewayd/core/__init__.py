"""The pure core: state, transitions and policy decisions. Standard library only; no I/O, no clock."""
