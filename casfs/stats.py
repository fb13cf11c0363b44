"""Store statistics: what each tier of a store has served, for reports and metrics."""

from __future__ import annotations

from .store import Store
from .tiers.base import TierStats

__all__ = ["TierStats", "tier_stats"]


def tier_stats(store: Store) -> list[TierStats]:
    """Per-tier counters of ``store``'s chunk reads since it was opened, fastest tier first.

    Each ``TierStats`` has the tier's ``name``, ``hits``, ``misses``, ``errors`` (counts),
    ``bytes_read`` / ``bytes_written`` (bytes), ``puts`` and ``latency_us`` (a histogram of
    get latencies, bucket ``b`` counting gets under ``2**b`` microseconds). The last entry is
    the pack staging area. The objects are live counters: copy what you need to keep.
    """
    return store.chunks.stats()
