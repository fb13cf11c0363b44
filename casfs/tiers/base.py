"""The tier protocol and the statistics every tier keeps.

A chunk tier maps a ``ChunkRef`` to bytes. Every tier except ``memory`` returns *frames*
(``casfs.chunk`` format) that the store verifies before use; ``memory`` returns decoded,
already-verified bytes. ``get`` returns None on a miss and raises only on a failure that the
store should count as an error (it then tries the next tier).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..index import ChunkRef

N_BUCKETS = 24  # latency buckets: [0,1us), [1,2us), [2,4us) ... up to ~4 s and beyond


@dataclass
class TierStats:
    """Counters for one tier. Latencies are bucketed by powers of two of microseconds."""

    name: str
    hits: int = 0
    misses: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    puts: int = 0
    latency_us: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_get(self, hit: bool, nbytes: int, seconds: float) -> None:
        us = int(seconds * 1e6)
        b = min(us.bit_length(), N_BUCKETS - 1)
        with self._lock:
            if hit:
                self.hits += 1
                self.bytes_read += nbytes
            else:
                self.misses += 1
            self.latency_us[b] += 1

    def record_put(self, nbytes: int) -> None:
        with self._lock:
            self.puts += 1
            self.bytes_written += nbytes

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1

    def percentile_us(self, q: float) -> float:
        """Upper bound (microseconds) of the bucket holding the q-quantile of get latency."""
        total = sum(self.latency_us)
        if not total:
            return 0.0
        want = q * total
        acc = 0
        for b, n in enumerate(self.latency_us):
            acc += n
            if acc >= want:
                return float(1 << b)
        return float(1 << (N_BUCKETS - 1))

    def as_dict(self) -> dict:
        return {
            "tier": self.name, "hits": self.hits, "misses": self.misses, "errors": self.errors,
            "bytes_read": self.bytes_read, "bytes_written": self.bytes_written, "puts": self.puts,
            "p50_us": self.percentile_us(0.5), "p99_us": self.percentile_us(0.99),
            "latency_us_log2": list(self.latency_us),
        }


@runtime_checkable
class Tier(Protocol):
    """What the store needs of a tier. Implementations must be thread-safe."""

    name: str
    decoded: bool  # True when get() returns verified decoded bytes (memory), False for frames
    writable: bool  # False for tiers the store must never fill or evict (the blob store)

    def get(self, ref: ChunkRef) -> bytes | None: ...
    def put(self, ref: ChunkRef, data: bytes) -> None: ...
    def contains(self, ref: ChunkRef) -> bool: ...
    def delete(self, ref: ChunkRef) -> None: ...
    def stats(self) -> TierStats: ...
