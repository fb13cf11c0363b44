"""The tier base class and the statistics every tier keeps.

A chunk tier maps a ``ChunkRef`` to a *frame* (``casfs.chunk`` format) that the store verifies
against the digest before use; decoded bytes never come from a tier (the decoded-memory cache
sits in front of the tiers: ``casfs.tiers.memory.MemoryCache``). ``get`` returns None on a miss
and raises only on a failure that the store should count as an error (it then tries the next
tier).

Like httpx's transports: ``get`` is the one method a tier must write; every optional
capability is declared on the base class with a default that is correct for any tier, so the
store never probes for undeclared methods:

- ``writable`` (False): the store fills the tier with frames it read lower down, and deletes a
  copy that failed verification (``rejected``'s default).
- ``supports_read_into`` (False) / ``read_into``: a tier backed by local files reads a frame
  straight into a caller's buffer and verifies it there; the default fetches the frame with
  ``get`` and decodes it into the buffer.
- ``supports_spans`` (False) / ``get_span``: a contiguous byte range of a pack (many frames in
  one request); the store asks for spans only from tiers that declare them.
- ``supports_ranges`` (False) / ``get_range``: a byte range of one chunk's stored frame (its
  block table, or some of its blocks: ``casfs.chunk.FrameMeta``), for verified sub-chunk reads.
- ``supports_parts`` (False) / ``get_part`` / ``put_part`` / ``drop_part``: a cache that keeps
  pieces of a frame (its block table and single blocks) when the whole frame was never read
  (the ssd tier), so a warm start reads locally what a cold start fetched block by block.
- ``rejected(ref)``: the store found this tier's frame for ``ref`` corrupt. Default: delete it
  from a writable tier; a read-only tier may override it to learn which source lied.
- ``holds(ref, blocks)`` (False): a local cache says, without I/O, that it has those blocks.
- ``contains`` (default: a ``get``), ``put`` and ``delete`` (default: PermissionError, the tier
  is read-only), ``close`` (default: nothing), ``stats``.
- ``threads_started()`` (False): the tier has started worker threads of its own (a
  ``WorkerPool`` that was given work); a process that forks after that must not use it in
  the child, where those threads do not exist.

Retries are not a tier's job unless its source is remote: the tier walk makes one pass and
fails over to the next tier; a remote object store retries what its protocol says is
transient (``casfs.objects``).

The contract every tier keeps (and the memory cache where it applies) is written once as a
test suite, ``tests/test_tiers.py``, and run against each of them.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from .. import chunk as chunkmod
from ..index import ChunkRef

N_BUCKETS = 24  # latency buckets: [0,1us), [1,2us), [2,4us) ... up to ~4 s and beyond


class WorkerPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor that says whether it was ever given work (``used``): its threads
    start on the first ``submit``, so until then a process may still fork safely."""

    used = False

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        self.used = True
        return super().submit(fn, *args, **kwargs)


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


class Tier:
    """A tier of chunk frames (see the module doc). Implementations must be thread-safe.

    Args:
        name: the tier's name in statistics and error messages.
    """

    writable: bool = False
    supports_read_into: bool = False
    supports_spans: bool = False
    supports_ranges: bool = False
    supports_parts: bool = False

    def __init__(self, name: str) -> None:
        self.name = name
        self._stats = TierStats(name)

    def get(self, ref: ChunkRef) -> bytes | None:
        """The stored frame of ``ref``, or None when this tier does not hold it.

        Raises:
            Exception: any failure the store should count as an error of this tier.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement get()")

    def contains(self, ref: ChunkRef) -> bool:
        """Whether this tier holds ``ref`` (no verification). Default: a ``get``."""
        return self.get(ref) is not None

    def put(self, ref: ChunkRef, frame: bytes) -> None:
        """Store ``frame`` for ``ref`` (writable tiers). Default: PermissionError."""
        raise PermissionError(f"tier {self.name} is read-only")

    def delete(self, ref: ChunkRef) -> None:
        """Drop ``ref`` (writable tiers; a missing one is fine). Default: PermissionError."""
        raise PermissionError(f"tier {self.name} is read-only")

    def read_into(self, ref: ChunkRef, buf: memoryview, *, hash_threads: int = 0) -> int | None:
        """Write ``ref``'s verified bytes to the start of ``buf``; their length, or None on a
        miss. Default: ``get`` then ``casfs.chunk.decode_into``; tiers that declare
        ``supports_read_into`` read local files straight into ``buf`` instead.

        Raises:
            CorruptChunk: the stored frame is bad (``buf`` then holds unspecified bytes).
        """
        frame = self.get(ref)
        if frame is None:
            return None
        return chunkmod.decode_into(frame, buf, ref.digest, hash_threads=hash_threads)

    def get_span(self, pack: bytes, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of pack ``pack``, or None when it is missing; only
        for tiers that declare ``supports_spans``.

        Raises:
            NotImplementedError: the tier declares no span support.
        """
        raise NotImplementedError(f"tier {self.name} reads no pack spans (supports_spans is False)")

    def get_range(self, ref: ChunkRef, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of ``ref``'s stored frame (fewer at its end), or None
        when this tier does not hold it; only for tiers that declare ``supports_ranges``.

        Raises:
            NotImplementedError: the tier declares no range support.
        """
        raise NotImplementedError(f"tier {self.name} reads no frame ranges (supports_ranges is False)")

    def get_part(self, ref: ChunkRef, part: str) -> bytes | None:
        """A stored piece of ``ref``'s frame: ``"m"`` (header, block ends and outboard) or a
        block number; None when absent. Only for tiers that declare ``supports_parts``."""
        raise NotImplementedError(f"tier {self.name} keeps no frame parts (supports_parts is False)")

    def put_part(self, ref: ChunkRef, part: str, data: bytes) -> None:
        """Keep a piece of ``ref``'s frame (see ``get_part``)."""
        raise NotImplementedError(f"tier {self.name} keeps no frame parts (supports_parts is False)")

    def drop_part(self, ref: ChunkRef, part: str) -> None:
        """Forget a piece of ``ref``'s frame that failed verification."""
        raise NotImplementedError(f"tier {self.name} keeps no frame parts (supports_parts is False)")

    def holds(self, ref: ChunkRef, blocks: range) -> bool:
        """Whether this tier holds ``blocks`` of ``ref``'s frame on local storage, answered
        from memory without I/O (a read of them is then a local ``pread``). Default: False."""
        return False

    def rejected(self, ref: ChunkRef) -> None:
        """The store found this tier's frame for ``ref`` corrupt. Default: delete it when the
        tier is writable (a cache), nothing otherwise."""
        if self.writable:
            self.delete(ref)

    def close(self) -> None:
        """Release connections and threads. Default: nothing to release."""

    def threads_started(self) -> bool:
        """Whether this tier has started worker threads of its own. Default: it has none."""
        return False

    def stats(self) -> TierStats:
        return self._stats
