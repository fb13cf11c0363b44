"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Three kinds, each with optional labels: :class:`Counter` (only goes up), :class:`Gauge` (set to a
value) and :class:`Histogram` (cumulative buckets, ``_sum`` and ``_count``). A
:class:`Registry` renders them all with ``render()``. Everything is in-process and
single-threaded (the asyncio loop); updates are plain float arithmetic.

:func:`serve_metrics` builds the registry the server exports: boot phases, requests, latency,
time to first token, tokens, client disconnects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

LabelValues = tuple[str, ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


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
        pairs = list(zip(self.labels, key)) + list(extra)
        if not pairs:
            return ""
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


@dataclass
class _Scalar(_Metric):
    """One float per label set (what counters and gauges share)."""

    values: dict[LabelValues, float] = field(default_factory=dict)

    def get(self, **labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{self._label_text(k)} {_fmt(v)}" for k, v in sorted(self.values.items())]

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        k = self._key(labels)
        self.values[k] = self.values.get(k, 0.0) + amount


@dataclass
class Counter(_Scalar):
    """A monotonically increasing count. ``inc(amount, **labels)``; amount must be >= 0."""

    kind: str = "counter"

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
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: dict[LabelValues, list[int]] = field(default_factory=dict)
    sums: dict[LabelValues, float] = field(default_factory=dict)

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
                out.append(f"{self.name}_bucket{self._label_text(k, (('le', _fmt(bound)),))} {c}")
            out.append(f"{self.name}_sum{self._label_text(k)} {_fmt(self.sums[k])}")
            out.append(f"{self.name}_count{self._label_text(k)} {counts[-1]}")
        return out


class Registry:
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


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    """The metrics a replica exports. Attribute per metric; ``render()`` for /metrics."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.boot_phase = r.add(Gauge("casfs_serve_boot_phase_seconds",
                                      "Duration of each boot phase of this replica, in seconds",
                                      ("phase",)))
        self.boot_total = r.add(Gauge("casfs_serve_boot_seconds",
                                      "Replica boot time from process start to the first token, in seconds"))
        self.boot_info = r.add(Gauge("casfs_serve_boot_info",
                                     "How this replica booted (value 1): mode is cold or restore",
                                     ("mode", "snapshot")))
        self.requests = r.add(Counter("casfs_serve_requests_total",
                                      "HTTP requests answered, by endpoint and status code",
                                      ("endpoint", "status")))
        self.latency = r.add(Histogram("casfs_serve_request_seconds",
                                       "Request latency (full response or stream end), in seconds",
                                       ("endpoint",)))
        self.ttft = r.add(Histogram("casfs_serve_time_to_first_token_seconds",
                                    "Time from request arrival to its first generated token, in seconds",
                                    ("endpoint",)))
        self.prompt_tokens = r.add(Counter("casfs_serve_prompt_tokens_total", "Prompt tokens processed"))
        self.generation_tokens = r.add(Counter("casfs_serve_generation_tokens_total", "Tokens generated"))
        self.running = r.add(Gauge("casfs_serve_requests_running", "Generation requests in progress"))
        self.disconnects = r.add(Counter("casfs_serve_client_disconnects_total",
                                         "Requests whose client went away before the response ended "
                                         "(their generation was aborted)", ("endpoint",)))
        self.running.set(0)
        self.prompt_tokens.inc(0)
        self.generation_tokens.inc(0)

    def record_boot(self, phases: dict[str, float], total: float | None, mode: str, snapshot: str = "") -> None:
        """Export a boot report's phase durations (seconds) and total."""
        for name, seconds in phases.items():
            self.boot_phase.set(seconds, phase=name)
        if total is not None:
            self.boot_total.set(total)
        self.boot_info.values.clear()
        self.boot_info.set(1, mode=mode, snapshot=snapshot)

    def render(self) -> str:
        return self.registry.render()
