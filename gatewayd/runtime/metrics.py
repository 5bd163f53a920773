"""Prometheus metrics through prometheus_client (served by gatewayd.adapters.metrics).

Counters and histograms are prometheus_client's, updated where things happen; gauges are read at scrape time
from callbacks (a collector of our own), so a scrape always sees the current state. The exposition is
prometheus_client's `generate_latest`, called on the event loop: the callbacks read state that only the loop
changes (prometheus_client's own HTTP server would call them from another thread). No secrets are ever labels
or values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import prometheus_client
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Labels = tuple[tuple[str, str], ...]

# No `_created` series next to each counter and histogram: the names and series stay what they were.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class Counter:
    """A counter with keyword labels (`inc(factor="totp", outcome="accepted")`)."""

    def __init__(self, metric: prometheus_client.Counter, labelnames: Sequence[str]) -> None:
        self._metric, self._labelled = metric, bool(labelnames)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        (self._metric.labels(**labels) if self._labelled else self._metric).inc(amount)


class Histogram:
    def __init__(self, metric: prometheus_client.Histogram) -> None:
        self._metric = metric

    def observe(self, value: float) -> None:
        self._metric.observe(value)


class _Gauges(Collector):
    """Gauges whose values are read from callbacks when scraped."""

    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, Callable[[], dict[Labels, float] | float]]] = []

    def collect(self) -> Iterator[Metric]:
        for name, help_, read in self.gauges:
            value = read()
            if isinstance(value, dict):
                names = [k for k, _ in next(iter(value), ())]
                family = GaugeMetricFamily(name, help_, labels=names)
                for labels, v in sorted(value.items()):
                    family.add_metric([v_ for _, v_ in labels], float(v))
            else:
                family = GaugeMetricFamily(name, help_, value=float(value))
            yield family


class Registry:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self._gauges = _Gauges()
        self.registry.register(self._gauges)

    def counter(self, name: str, help_: str, labelnames: Sequence[str] = ()) -> Counter:
        return Counter(prometheus_client.Counter(name, help_, labelnames=labelnames, registry=self.registry),
                       labelnames)

    def histogram(self, name: str, help_: str, buckets: Iterable[float]) -> Histogram:
        return Histogram(prometheus_client.Histogram(name, help_, buckets=tuple(buckets), registry=self.registry))

    def gauge(self, name: str, help_: str, read: Callable[[], dict[Labels, float] | float]) -> None:
        self._gauges.gauges.append((name, help_, read))

    def render(self) -> str:
        return prometheus_client.generate_latest(self.registry).decode()
