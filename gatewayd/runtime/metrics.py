"""Prometheus metrics: a small registry writing the text exposition format (served by
gatewayd.adapters.metrics).

Counters and histograms are updated where things happen; gauges are read at scrape time from callbacks, so a
scrape always sees the current state. No secrets are ever labels or values.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    body = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in items)
    return "{" + body + "}"


class Counter:
    def __init__(self, name: str, help_: str) -> None:
        self.name, self.help = name, help_
        self.values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(labels)} {value}"


class Histogram:
    def __init__(self, name: str, help_: str, buckets: Iterable[float]) -> None:
        self.name, self.help = name, help_
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        running = 0
        for bound, count in zip([*self.bounds, math.inf], self.counts, strict=True):
            running += count
            le = "+Inf" if bound == math.inf else repr(bound)
            yield f'{self.name}_bucket{{le="{le}"}} {running}'
        yield f"{self.name}_sum {self.sum}"
        yield f"{self.name}_count {running}"


class Gauge:
    def __init__(self, name: str, help_: str, read: Callable[[], dict[Labels, float] | float]) -> None:
        self.name, self.help, self.read = name, help_, read

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        value = self.read()
        items = value.items() if isinstance(value, dict) else [((), value)]
        for labels, v in sorted(items):
            yield f"{self.name}{_labels(labels)} {float(v)}"


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Counter | Histogram | Gauge] = []

    def counter(self, name: str, help_: str) -> Counter:
        c = Counter(name, help_)
        self.metrics.append(c)
        return c

    def histogram(self, name: str, help_: str, buckets: Iterable[float]) -> Histogram:
        h = Histogram(name, help_, buckets)
        self.metrics.append(h)
        return h

    def gauge(self, name: str, help_: str, read: Callable[[], dict[Labels, float] | float]) -> Gauge:
        g = Gauge(name, help_, read)
        self.metrics.append(g)
        return g

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"
