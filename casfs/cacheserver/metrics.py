"""Counters and latency histograms of a cache server, rendered as Prometheus text (0.0.4)."""

from __future__ import annotations

import threading
from collections import defaultdict

from ..metrics import format_labels as _labels, format_value as _num  # the one Prometheus text writer

# Prometheus histogram upper bounds, in seconds: 100 us .. 10 s.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_HELP = {
    "casfs_cache_requests_total": ("counter", "HTTP requests answered, by status code"),
    "casfs_cache_hits_total": ("counter", "object reads served from a cache tier of this server"),
    "casfs_cache_misses_total": ("counter", "object reads that had to be filled from the blob store"),
    "casfs_cache_fill_errors_total": ("counter", "blob fills that failed (unreachable, missing or corrupt)"),
    "casfs_cache_verify_failures_total": ("counter", "objects rejected by digest verification, by source"),
    "casfs_cache_bytes_sent_total": ("counter", "body bytes sent to clients"),
    "casfs_cache_blob_bytes_total": ("counter", "bytes fetched from the blob store"),
    "casfs_cache_fill_waiters_total": ("counter", "requests that waited on a fill already in flight (single flight)"),
    "casfs_cache_tier_bytes": ("gauge", "bytes held by each cache tier"),
    "casfs_cache_connections": ("gauge", "open client connections"),
    "casfs_cache_request_seconds": ("histogram", "time to answer an object request (head written)"),
    "casfs_cache_fill_seconds": ("histogram", "time to fetch and verify one object from the blob store"),
}


class Histogram:
    """A cumulative-bucket histogram (seconds)."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        i = 0
        for i, b in enumerate(self.buckets):  # noqa: B007 - 16 comparisons beat bisect's call here
            if seconds <= b:
                break
        else:
            i = len(self.buckets)
        self.counts[i] += 1
        self.sum += seconds
        self.count += 1


class Metrics:
    """Thread-safe counters keyed by (metric name, label pairs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self._hist: dict[tuple[str, tuple], Histogram] = {}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            h = self._hist.get(key)
            if h is None:
                h = self._hist[key] = Histogram()
            h.observe(seconds)

    def value(self, name: str, **labels: str) -> float:
        """The current value of a counter (0 when never incremented)."""
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self, gauges: dict[tuple[str, tuple], float] | None = None) -> str:
        """Prometheus text exposition of every metric (plus ``gauges`` computed by the caller)."""
        with self._lock:
            series = dict(self._counters)
            hists = {k: (list(h.counts), h.sum, h.count, h.buckets) for k, h in self._hist.items()}
        series.update(gauges or {})
        names = sorted({k[0] for k in series} | {k[0] for k in hists})
        out: list[str] = []
        for name in names:
            kind, text = _HELP.get(name, ("untyped", name))
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            for (n, labels), v in sorted(series.items()):
                if n == name:
                    out.append(f"{name}{_labels(labels)} {_num(v)}")
            for (n, labels), (counts, total, count, buckets) in sorted(hists.items()):
                if n != name:
                    continue
                acc = 0
                for b, c in zip(buckets, counts):
                    acc += c
                    out.append(f"{name}_bucket{_labels(labels + (('le', repr(b)),))} {acc}")
                out.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {count}")
                out.append(f"{name}_sum{_labels(labels)} {total:.6f}")
                out.append(f"{name}_count{_labels(labels)} {count}")
        return "\n".join(out) + "\n"
