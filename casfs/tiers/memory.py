"""The decoded-memory cache: a bounded LRU of verified chunk bytes, in front of the frame tiers.

It is not a tier: it holds decoded bytes that were verified on their way in, so a hit needs
no decoding and no hashing, and the store consults it before the tier walk and fills it after
one (``TieredStore(tiers, memory=...)``). ``peek`` is the fast path of callers that must not
block (the FUSE read loop): a hit is counted, a miss is not (the store's ``get`` that follows
counts it).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from ..index import ChunkRef
from .base import TierStats


class MemoryCache:
    """Holds decoded (verified) chunk bytes up to ``capacity`` bytes, least recently used out
    first. Thread-safe.

    Raises:
        ValueError: for a negative capacity.
    """

    def __init__(self, capacity: int = 512 << 20, name: str = "memory") -> None:
        if capacity < 0:
            raise ValueError("memory cache capacity must be >= 0 bytes")
        self.name = name
        self.capacity = capacity
        self._d: OrderedDict[bytes, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._stats = TierStats(name)

    def get(self, ref: ChunkRef) -> bytes | None:
        """The verified bytes of ``ref``, or None (a hit or a miss is counted)."""
        t0 = time.perf_counter()
        data = self._lookup(ref)
        self._stats.record_get(data is not None, len(data) if data else 0, time.perf_counter() - t0)
        return data

    def peek(self, ref: ChunkRef) -> bytes | None:
        """The verified bytes of ``ref`` if held, else None; only a hit is counted."""
        t0 = time.perf_counter()
        data = self._lookup(ref)
        if data is not None:
            self._stats.record_get(True, len(data), time.perf_counter() - t0)
        return data

    def _lookup(self, ref: ChunkRef) -> bytes | None:
        with self._lock:
            data = self._d.get(ref.digest)
            if data is not None:
                self._d.move_to_end(ref.digest)
        return data

    def put(self, ref: ChunkRef, data: bytes) -> None:
        """Hold ``data`` (the verified bytes of ``ref``); larger than the capacity: skipped."""
        n = len(data)
        if n > self.capacity:
            return
        with self._lock:
            old = self._d.pop(ref.digest, None)
            if old is not None:
                self._used -= len(old)
            self._d[ref.digest] = data
            self._used += n
            while self._used > self.capacity:
                _, ev = self._d.popitem(last=False)
                self._used -= len(ev)
        self._stats.record_put(n)

    def contains(self, ref: ChunkRef) -> bool:
        with self._lock:
            return ref.digest in self._d

    def delete(self, ref: ChunkRef) -> None:
        with self._lock:
            old = self._d.pop(ref.digest, None)
            if old is not None:
                self._used -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def stats(self) -> TierStats:
        return self._stats
