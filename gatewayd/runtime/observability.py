"""What gatewayd measures about itself, exposed as Prometheus metrics and through GetStatus."""

from __future__ import annotations

from dataclasses import dataclass

from gatewayd.runtime.metrics import Counter, Histogram, Registry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
VERDICT_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0)
"""Finer below 30 ms: a held handshake's verdict is a few milliseconds."""


@dataclass
class Metrics:
    registry: Registry
    """All metrics, for the HTTP endpoint."""
    challenge_results: Counter
    """Proof submissions by factor and outcome."""
    challenge_calls_limited: Counter
    """Challenge calls refused because their caller (a peer, or an address) was over its rate."""
    disconnect_seconds: Histogram
    """Disconnect latency, call to answer."""
    poll_seconds: Histogram
    """Duration of one read of the WireGuard interface (read, parse, diff)."""
    poll_errors: Counter
    """Failed reads of the interface."""
    handshake_verdict_seconds: Histogram
    """From a held initiation's arrival in the daemon to its verdict (decided, enforced, committed)."""
    handshake_initiations: Counter
    """Queued packets by outcome: decided, passed (not an initiation to a known peer), dropped (not enforced)."""

    @classmethod
    def create(cls) -> Metrics:
        r = Registry()
        return cls(
            registry=r,
            challenge_results=r.counter("gatewayd_challenge_results_total",
                                        "Proof submissions by factor and outcome", ("factor", "outcome")),
            challenge_calls_limited=r.counter("gatewayd_challenge_calls_limited_total",
                                              "Challenge calls refused: their caller was over its rate"),
            disconnect_seconds=r.histogram("gatewayd_disconnect_seconds",
                                           "Disconnect latency from call to answer (enforced and committed)",
                                           LATENCY_BUCKETS),
            poll_seconds=r.histogram("gatewayd_poll_seconds", "Duration of one tracking poll", LATENCY_BUCKETS),
            poll_errors=r.counter("gatewayd_poll_errors_total", "Failed reads of the WireGuard interface"),
            handshake_verdict_seconds=r.histogram(
                "gatewayd_handshake_verdict_seconds",
                "Handshake initiation held until its session was decided and enforced", VERDICT_BUCKETS),
            handshake_initiations=r.counter("gatewayd_handshake_initiations_total",
                                            "Queued handshake packets by outcome", ("outcome",)),
        )
