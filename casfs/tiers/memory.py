"""memory tier: a bounded LRU of decoded chunks, by bytes."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from ..index import ChunkRef
from .base import TierStats


class MemoryTier:
    """Holds decoded (verified) chunk bytes up to ``capacity`` bytes, least recently used out first."""

    decoded = True
    writable = True

    def __init__(self, capacity: int = 512 << 20, name: str = "memory") -> None:
        if capacity < 0:
            raise ValueError("memory tier capacity must be >= 0 bytes")
        self.name = name
        self.capacity = capacity
        self._d: OrderedDict[bytes, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._stats = TierStats(name)

    def get(self, ref: ChunkRef) -> bytes | None:
        t0 = time.perf_counter()
        with self._lock:
            data = self._d.get(ref.digest)
            if data is not None:
                self._d.move_to_end(ref.digest)
        self._stats.record_get(data is not None, len(data) if data else 0, time.perf_counter() - t0)
        return data

    def put(self, ref: ChunkRef, data: bytes) -> None:
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
