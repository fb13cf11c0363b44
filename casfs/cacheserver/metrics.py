"""The cache server's counters, gauges and latency histograms, rendered as Prometheus text
through ``casfs.metrics`` (the one writer of that format in casfs: HELP/TYPE lines, label
escaping, value formatting and cumulative buckets live there, not here).

Every metric is declared below with its kind, help and label names; ``Metrics`` adds a lock
around the typed metrics (they take none) so that the server's threads can update them.
"""

from __future__ import annotations

import threading

from ..metrics import Counter, Gauge, Histogram, MetricRegistry

# Prometheus histogram upper bounds, in seconds: 100 us .. 10 s.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# name, kind, help, label names
DECLARED: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("casfs_cache_requests_total", "counter", "HTTP requests answered, by status code", ("code",)),
    ("casfs_cache_hits_total", "counter", "object reads served from a cache tier of this server", ("tier",)),
    ("casfs_cache_misses_total", "counter", "object reads that had to be filled from the blob store", ()),
    ("casfs_cache_fill_errors_total", "counter", "blob fills that failed (unreachable, missing or corrupt)", ()),
    ("casfs_cache_verify_failures_total", "counter", "objects rejected by digest verification, by source",
     ("source",)),
    ("casfs_cache_bytes_sent_total", "counter", "body bytes sent to clients", ()),
    ("casfs_cache_blob_bytes_total", "counter", "bytes fetched from the blob store", ()),
    ("casfs_cache_fill_waiters_total", "counter",
     "requests that waited on a fill already in flight (single flight)", ()),
    ("casfs_cache_tier_bytes", "gauge", "bytes held by each cache tier", ("tier",)),
    ("casfs_cache_connections", "gauge", "open client connections", ()),
    ("casfs_cache_connections_dropped_total", "counter",
     "connections closed or refused to keep slots free: refused (server full of busy connections, "
     "or over the per-client cap), evicted (idle or slow, for a new client), header_timeout",
     ("reason",)),
    ("casfs_cache_request_seconds", "histogram", "time to answer an object request (head written)", ()),
    ("casfs_cache_fill_seconds", "histogram", "time to fetch and verify one object from the blob store", ()),
)
_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
# labelled counters' label sets known up front (unlabelled counters start at 0 by themselves)
SEEDED: dict[str, tuple[dict[str, str], ...]] = {
    "casfs_cache_requests_total": ({"code": "200"},),
    "casfs_cache_hits_total": ({"tier": "memory"}, {"tier": "ssd"}, {"tier": "host"}),
    "casfs_cache_verify_failures_total": ({"source": "blob"}, {"source": "ssd"}, {"source": "host"}),
}


class Metrics:
    """The server's declared metrics (``DECLARED``), thread-safe.

    Raises:
        KeyError: from every method, for a metric that is not declared.
        ValueError: for labels other than the metric's declared ones.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registry = MetricRegistry()
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        for name, kind, text, labels in DECLARED:
            extra = {"buckets": LATENCY_BUCKETS} if kind == "histogram" else {}
            self._metrics[name] = self._registry.add(_KINDS[kind](name, text, labels, **extra))  # type: ignore[assignment]
        for name, label_sets in SEEDED.items():  # exported at 0 before their first event
            self._metrics[name].seed(*label_sets)

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        """Add ``value`` to counter ``name``."""
        with self._lock:
            self._metrics[name].inc(value, **labels)  # type: ignore[union-attr]

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """Count one observation of histogram ``name``."""
        with self._lock:
            self._metrics[name].observe(seconds, **labels)  # type: ignore[union-attr]

    def value(self, name: str, **labels: str) -> float:
        """The current value of a counter or gauge (0 when never set)."""
        with self._lock:
            return self._metrics[name].get(**labels)  # type: ignore[union-attr]

    def render(self, gauges: dict[tuple[str, tuple], float] | None = None) -> str:
        """Prometheus text exposition of every metric, after setting ``gauges``
        (``{(name, label pairs): value}``, computed by the caller at scrape time)."""
        with self._lock:
            for (name, labels), v in (gauges or {}).items():
                self._metrics[name].set(v, **dict(labels))  # type: ignore[union-attr]
            return self._registry.render()
