"""The metrics a replica exports at /metrics: boot phases, requests, latency, time to first
token, tokens, client disconnects.

Written with casfs's Prometheus text writer (``casfs.Counter``/``Gauge``/``Histogram``/
``MetricRegistry``), which the cache server uses too. Everything is in-process and
single-threaded (the asyncio loop).
"""

from __future__ import annotations

from casfs import METRICS_CONTENT_TYPE as CONTENT_TYPE
from casfs import Counter, Gauge, Histogram, MetricRegistry

__all__ = ["CONTENT_TYPE", "ServeMetrics"]


GENERATING = ("/v1/completions", "/v1/chat/completions")
ENDPOINTS = GENERATING + ("/v1/models", "/health")


class ServeMetrics:
    """The metrics a replica exports. Attribute per metric; ``render()`` for /metrics."""

    def __init__(self) -> None:
        r = self.registry = MetricRegistry()
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
        # exported at 0 from the start (unlabelled counters are by themselves)
        self.requests.seed(*({"endpoint": e, "status": "200"} for e in ENDPOINTS))
        self.latency.seed(*({"endpoint": e} for e in ENDPOINTS))
        self.ttft.seed(*({"endpoint": e} for e in GENERATING))
        self.disconnects.seed(*({"endpoint": e} for e in GENERATING))

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
