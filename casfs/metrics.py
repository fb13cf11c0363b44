"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

The one writer of that format in this project: the cache server's ``/metrics`` and serve's
replicas render through it. Low-level pieces (``format_value``, ``format_labels``,
``escape_label_value``) for code that keeps its own counters, and typed metrics:
:class:`Counter` (only goes up), :class:`Gauge` (set to a value) and :class:`Histogram`
(cumulative buckets, ``_sum`` and ``_count``), each with optional labels, rendered together by
a :class:`MetricRegistry`. The typed metrics take no locks: updates are plain float arithmetic,
meant for one thread (an asyncio loop); guard them yourself across threads.

Every counter and histogram is exported from zero, not only after its first event: those
without labels from the start, labelled ones for the label sets their owner ``seed``s (the
ones known up front: tiers, endpoints). A gauge is exported once it is set: its absence means
"not measured yet", which 0 would misstate (a boot that took 0 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["CONTENT_TYPE", "DEFAULT_BUCKETS", "Counter", "Gauge", "Histogram", "MetricRegistry",
           "escape_label_value", "format_labels", "format_value"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LabelValues = tuple[str, ...]

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def escape_label_value(value: str) -> str:
    """A label value as the text format quotes it (backslash, newline and double quote escaped)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(v: float) -> str:
    """A sample value: integral values below 2**63 exactly as integers (counters of bytes stay
    exact), infinities as ``+Inf``/``-Inf``, NaN as ``NaN``, anything else as Python's repr."""
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if v.is_integer() and abs(v) < 2 ** 63 else repr(v)


def format_labels(pairs: Iterable[tuple[str, str]]) -> str:
    """``{k="v",...}`` for label pairs in the order given ("" when there are none)."""
    inner = ",".join(f'{k}="{escape_label_value(str(v))}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


@dataclass
class _Metric:
    name: str
    help: str
    labels: tuple[str, ...] = ()
    kind: str = "untyped"

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labels):
            raise ValueError(f"metric {self.name} takes labels {self.labels}, got {tuple(labels)}")
        return tuple(str(labels[k]) for k in self.labels)

    def _label_text(self, key: LabelValues, extra: tuple[tuple[str, str], ...] = ()) -> str:
        return format_labels(list(zip(self.labels, key)) + list(extra))

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def seed(self, *label_sets: dict[str, str]) -> "_Metric":
        """Export these label sets at zero before their first event (a counter that appears
        only after its first increment breaks ``rate()`` and alerts on ``absent()``). Counters
        and histograms without labels are seeded when they are made. Returns the metric."""
        for labels in label_sets:
            self._zero(self._key(labels))
        return self

    def _zero(self, key: LabelValues) -> None:
        raise NotImplementedError


@dataclass
class _Scalar(_Metric):
    """One float per label set (what counters and gauges share)."""

    values: dict[LabelValues, float] = field(default_factory=dict)

    def get(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{self._label_text(k)} {format_value(v)}" for k, v in sorted(self.values.items())]

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        k = self._key(labels)
        self.values[k] = self.values.get(k, 0.0) + amount

    def _zero(self, key: LabelValues) -> None:
        self.values.setdefault(key, 0.0)


@dataclass
class Counter(_Scalar):
    """A monotonically increasing count. ``inc(amount, **labels)``; amount must be >= 0."""

    kind: str = "counter"

    def __post_init__(self) -> None:
        if not self.labels:
            self._zero(())  # exported as 0 from the start

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (inc by {amount})")
        self._add(amount, labels)


@dataclass
class Gauge(_Scalar):
    """A value that is set, or moved up and down."""

    kind: str = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = float(value)

    def add(self, amount: float, **labels: str) -> None:
        self._add(amount, labels)


@dataclass
class Histogram(_Metric):
    """Observations counted into cumulative buckets (upper bounds in ``buckets``, plus +Inf)."""

    kind: str = "histogram"
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    counts: dict[LabelValues, list[int]] = field(default_factory=dict)
    sums: dict[LabelValues, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.labels:
            self._zero(())  # exported with zero counts from the start

    def _zero(self, key: LabelValues) -> None:
        self.counts.setdefault(key, [0] * (len(self.buckets) + 1))
        self.sums.setdefault(key, 0.0)

    def observe(self, value: float, **labels: str) -> None:
        k = self._key(labels)
        counts = self.counts.setdefault(k, [0] * (len(self.buckets) + 1))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[k] = self.sums.get(k, 0.0) + value

    def count(self, **labels: str) -> int:
        c = self.counts.get(self._key(labels))
        return c[-1] if c else 0

    def lines(self) -> list[str]:
        out = []
        for k in sorted(self.counts):
            counts = self.counts[k]
            for bound, c in zip(list(self.buckets) + [math.inf], counts):
                out.append(f"{self.name}_bucket{self._label_text(k, (('le', format_value(bound)),))} {c}")
            out.append(f"{self.name}_sum{self._label_text(k)} {format_value(self.sums[k])}")
            out.append(f"{self.name}_count{self._label_text(k)} {counts[-1]}")
        return out


class MetricRegistry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics[metric.name] = metric
        return metric

    def __iter__(self) -> Iterable[_Metric]:
        return iter(self._metrics.values())

    def render(self) -> str:
        """The exposition text: HELP/TYPE then samples for each metric; ends with a newline."""
        out: list[str] = []
        for m in self._metrics.values():
            out.extend(m.header())
            out.extend(m.lines())  # type: ignore[attr-defined]
        return "\n".join(out) + "\n"
