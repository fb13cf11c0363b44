"""The pinned tier: verified chunks held in page-locked host memory, ready for the GPU.

A GPU copies from page-locked ("pinned") host memory by DMA at PCIe speed (55 GB/s measured on
the H100 machine, against 3 GB/s from pageable memory). A replica that keeps a model's chunks
here loads its weights with host-to-device copies alone: no file read, no hashing. The warm
pool (issue 12) fills it once per host; the weights loader (``snapshot.weights``) copies from
it and, on a miss, reads the chunk from the lower tiers straight into a buffer of this tier so
the next load finds it.

Contract:

- **Bounded**: at most ``capacity`` bytes of buffers, counted in size classes (powers of two
  from 64 KiB: CUDA's host allocator rounds the same way), free buffers included; least
  recently used chunks go first. A chunk that is leased, or whose last GPU copy has not
  finished, is never evicted or reused.
- **Verified on fill**: bytes enter only through ``fill`` with a reader that verifies
  (``TieredStore.get_into``: every tier checks the blake3 digest; ``put`` decodes and checks a
  frame). So reads from here are not hashed again, like the memory cache's.
- **Shared by digest**: one copy per chunk whatever the images and files that hold it;
  concurrent fills of one chunk run once, the other callers wait and share it.
- ``acquire`` / ``fill`` return a ``PinnedChunk`` lease: its ``tensor`` (a 1-D uint8 torch
  tensor over the pinned bytes) is the source of ``copy_(..., non_blocking=True)``;
  ``release(after=event)`` keeps the buffer until the CUDA event has completed.

- **Lent chunks** (``adopt``): bytes that already lie in memory someone else verified and
  owns, a sealed shared segment (``casfs.SharedChunks``) that every parked replica of a model
  maps, so a host holds one copy of the weights however many processes use them (issue 12).
  The tier copies from them like from its own buffers but never evicts, reuses or frees them.

In the store (``casfs.open_store(pinned_bytes=N)``, freed with the store; or ``Store(pinned=
tier)``, shared by every store it is given to, freed by ``free()``) it is the first tier of
the walk and is
not *writable*: the store does not fill it in the background with every chunk any reader
touches (each fill would copy and hash a frame on the store's one writeback thread); loaders
and the warm pool fill it on purpose.

Memory: ``cuda_pinned`` (the default) allocates through torch's pinned host allocator, so torch
and a CUDA device are needed at the first allocation only (``import casfs`` never imports
torch). ``plain_memory`` allocates ordinary pageable memory: it exists for hosts without CUDA
and for tests of the bookkeeping, and gives no DMA speed.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from .. import chunk as chunkmod
from ..errors import CasfsError
from ..index import ChunkRef
from .base import Tier

__all__ = ["HostBuffer", "PinnedChunk", "PinnedTier", "cuda_pinned", "plain_memory", "size_class"]

MIN_CLASS = 64 << 10


def size_class(n: int) -> int:
    """The bytes a buffer for an ``n``-byte chunk takes: the next power of two, >= 64 KiB."""
    return max(MIN_CLASS, 1 << max(0, n - 1).bit_length())


class HostBuffer:
    """One host allocation: ``size`` bytes at address ``ptr``, as a memoryview and (for pinned
    memory) a 1-D uint8 torch tensor."""

    __slots__ = ("size", "ptr", "view", "tensor", "_keep")

    def __init__(self, size: int, ptr: int, view: memoryview, tensor: Any = None, keep: Any = None) -> None:
        self.size = size
        self.ptr = ptr
        self.view = view
        self.tensor = tensor
        self._keep = keep  # the object that owns the memory


def plain_memory(nbytes: int) -> HostBuffer:
    """Pageable memory (a bytearray): for tests of the tier's bookkeeping and CUDA-less hosts.
    Not pinned: a GPU copies from it at pageable speed, and ``PinnedChunk.tensor`` is a CPU
    tensor only when torch is installed."""
    buf = bytearray(nbytes)
    ptr = ctypes.addressof(ctypes.c_char.from_buffer(buf)) if nbytes else 0
    tensor = None
    try:
        import torch

        tensor = torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    except ImportError:
        pass
    return HostBuffer(nbytes, ptr, memoryview(buf), tensor, buf)


def cuda_pinned(nbytes: int) -> HostBuffer:
    """Page-locked host memory from torch's CUDA host allocator.

    Raises:
        CasfsError: torch is missing or sees no CUDA device.
    """
    try:
        import torch
    except ImportError as e:
        raise CasfsError(f"the pinned tier needs torch with CUDA ({e}); use plain_memory without a GPU") from None
    if not torch.cuda.is_available():
        raise CasfsError(f"the pinned tier needs a CUDA device (torch {torch.__version__} sees none)")
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    ptr = t.data_ptr()
    view = memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B") if nbytes else memoryview(b"")
    return HostBuffer(nbytes, ptr, view, t, t)


class _Entry:
    __slots__ = ("buf", "length", "leases", "fences", "ready", "error", "drop", "lent")

    def __init__(self, buf: HostBuffer, length: int, lent: bool = False) -> None:
        self.buf = buf
        self.length = length
        self.lent = lent  # memory lent by someone else (adopt): never reused, freed or counted
        self.leases = 0
        self.fences: list[Any] = []  # CUDA events of copies that read this buffer
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.drop = False  # delete()d while leased: freed at the last release


class PinnedChunk:
    """A lease on one chunk in a ``PinnedTier``: its bytes stay where they are until
    ``release``. Use as a context manager, or call ``release(after=event)`` once."""

    __slots__ = ("digest", "length", "_tier", "_entry", "_released")

    def __init__(self, tier: "PinnedTier", digest: bytes, entry: _Entry) -> None:
        self.digest = digest
        self.length = entry.length
        self._tier = tier
        self._entry = entry
        self._released = False

    @property
    def view(self) -> memoryview:
        """The chunk's verified bytes (read-only by contract)."""
        return self._entry.buf.view[:self.length]

    @property
    def ptr(self) -> int:
        """Address of the chunk's first byte."""
        return self._entry.buf.ptr

    @property
    def tensor(self) -> Any:
        """A 1-D uint8 torch tensor over the chunk's bytes (pinned with ``cuda_pinned``)."""
        t = self._entry.buf.tensor
        if t is None:
            raise CasfsError("this pinned tier's memory has no torch tensor (torch is not installed)")
        return t[:self.length]

    def release(self, after: Any = None) -> None:
        """End the lease. ``after``: an object with ``query()`` (a ``torch.cuda.Event`` recorded
        after the copies that read this chunk): the buffer is kept until it reports done."""
        if self._released:
            return
        self._released = True
        self._tier._release(self.digest, self._entry, after)

    def __enter__(self) -> "PinnedChunk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PinnedTier(Tier):
    """Verified chunk bytes in pinned host memory, at most ``capacity`` bytes (see the module doc).

    Args:
        capacity: bytes of host memory the tier may hold (buffers counted by ``size_class``).
        allocator: ``cuda_pinned`` (default) or ``plain_memory`` (tests, CUDA-less hosts).

    Raises:
        ValueError: for a capacity below one 64 KiB buffer.
    """

    writable = False  # filled on purpose (fill/put), never in the store's background
    supports_read_into = True

    def __init__(self, capacity: int, *, allocator: Callable[[int], HostBuffer] | None = None,
                 name: str = "pinned") -> None:
        if capacity < MIN_CLASS:
            raise ValueError(f"pinned tier capacity must be at least {MIN_CLASS} bytes, got {capacity}")
        super().__init__(name)
        self.capacity = capacity
        self._alloc = allocator or cuda_pinned
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._free: dict[int, list[HostBuffer]] = {}
        self._used = 0  # bytes of every buffer held (entries, free lists, limbo)
        self._limbo: list[_Entry] = []  # dropped while a GPU copy still read them
        self.evictions = 0
        self.full = 0  # fills refused because every buffer was leased or in flight
        self.close_with_store = False

    # -- the lease API ----------------------------------------------------------------------

    def acquire(self, ref: ChunkRef, *, wait: bool = True) -> PinnedChunk | None:
        """A lease on ``ref``'s bytes if the tier holds them; None otherwise. Counts a hit or
        a miss. ``wait``: wait for a fill in progress (False: that is a miss; the tier's own
        reads use it, so a fill whose reader walks the store cannot wait on itself)."""
        t0 = time.perf_counter()
        with self._lock:
            e = self._entries.get(ref.digest)
            if e is not None and not wait and not e.ready.is_set():
                e = None
            if e is not None:
                e.leases += 1
                self._entries.move_to_end(ref.digest)
        if e is None:
            self._stats.record_get(False, 0, time.perf_counter() - t0)
            return None
        e.ready.wait()
        if e.error is not None:
            self._release(ref.digest, e, None)
            self._stats.record_get(False, 0, time.perf_counter() - t0)
            return None
        self._stats.record_get(True, e.length, time.perf_counter() - t0)
        return PinnedChunk(self, ref.digest, e)

    def fill(self, ref: ChunkRef, read: Callable[[memoryview], int]) -> PinnedChunk | None:
        """A lease on ``ref``'s bytes, reading them in with ``read`` when the tier lacks them.

        ``read(view)`` must write the chunk's *verified* bytes to the start of ``view`` and
        return their count (``TieredStore.get_into`` / ``Image.read_into`` do). Concurrent
        fills of one chunk call ``read`` once. Returns None, reading nothing, when no buffer
        can be had (every one leased or in flight): the caller then reads elsewhere.

        Raises:
            whatever ``read`` raised (the entry is dropped); CasfsError when ``read`` returned
            a length other than ``ref.raw_len`` or the allocator failed.
        """
        got = self.acquire(ref)
        if got is not None:
            return got
        with self._lock:
            e = self._entries.get(ref.digest)
            if e is not None:  # another fill started meanwhile: share it
                e.leases += 1
                owner = False
            else:
                buf = self._take(size_class(ref.raw_len))
                if buf is None:
                    self.full += 1
                    return None
                e = _Entry(buf, ref.raw_len)
                e.leases = 1
                self._entries[ref.digest] = e
                owner = True
        if not owner:
            e.ready.wait()
            if e.error is not None:
                self._release(ref.digest, e, None)
                raise CasfsError(f"pinned fill of chunk {ref.digest.hex()[:16]}… failed: {e.error}")
            return PinnedChunk(self, ref.digest, e)
        try:
            n = read(e.buf.view[:ref.raw_len]) if ref.raw_len else 0
            if n != ref.raw_len:
                raise CasfsError(f"chunk {ref.digest.hex()[:16]}… read {n} bytes, its index entry says {ref.raw_len}")
        except BaseException as err:
            e.error = err
            with self._lock:
                if self._entries.get(ref.digest) is e:
                    del self._entries[ref.digest]
                e.drop = True
            e.ready.set()
            self._release(ref.digest, e, None)
            raise
        e.ready.set()
        self._stats.record_put(ref.raw_len)
        return PinnedChunk(self, ref.digest, e)

    def adopt(self, ref: ChunkRef, buf: HostBuffer) -> bool:
        """Hold ``ref``'s bytes where they already lie: ``buf`` (its first ``ref.raw_len``
        bytes), memory the tier does not own: a sealed shared segment that a verifying reader
        filled (``casfs.SharedChunks.lend_to``), so one host copy serves every process that
        maps it. The bytes are not verified again (the lender did). A lent chunk is not counted
        against ``capacity``, never evicted and its memory never reused or freed by the tier;
        ``delete`` and ``free`` only forget it (the lender must outlive the leases and copies).

        Returns False (nothing changed) when the tier already holds the chunk.

        Raises:
            ValueError: ``buf`` is shorter than the chunk.
        """
        if buf.size < ref.raw_len:
            raise ValueError(f"chunk {ref.digest.hex()[:16]}… is {ref.raw_len} bytes, the lent buffer {buf.size}")
        with self._lock:
            if ref.digest in self._entries:
                return False
            e = _Entry(buf, ref.raw_len, lent=True)
            e.ready.set()
            self._entries[ref.digest] = e
        return True

    # -- the Tier interface -----------------------------------------------------------------

    def get(self, ref: ChunkRef) -> bytes | None:
        """A raw frame of the held bytes (one copy), or None."""
        with self.acquire(ref, wait=False) or _Nothing() as c:
            if c is None:
                return None
            return chunkmod.encode(c.view, ref.digest, compress=False)[1]

    def read_into(self, ref: ChunkRef, buf: memoryview, *, hash_threads: int = 0) -> int | None:
        """Copy the held bytes into ``buf`` (verified on fill: not hashed again); None on a miss."""
        with self.acquire(ref, wait=False) or _Nothing() as c:
            if c is None:
                return None
            return chunkmod.copy_into(chunkmod.writable_view(buf), c.view)

    def contains(self, ref: ChunkRef) -> bool:
        with self._lock:
            e = self._entries.get(ref.digest)
            return e is not None and e.ready.is_set() and e.error is None

    def put(self, ref: ChunkRef, frame: bytes) -> None:
        """Hold the chunk of ``frame`` (decoded and verified into a pinned buffer); skipped when
        the tier is full. Raises CorruptChunk for a bad frame."""
        c = self.fill(ref, lambda view: chunkmod.decode_into(frame, view, ref.digest))
        if c is not None:
            c.release()

    def delete(self, ref: ChunkRef) -> None:
        """Drop ``ref`` (at its last release when leased)."""
        with self._lock:
            e = self._entries.get(ref.digest)
            if e is None:
                return
            del self._entries[ref.digest]
            e.drop = True
            if e.leases == 0:
                self._retire(e)

    def close(self) -> None:
        """Called by the store's close: frees the tier only when the store made it
        (``close_with_store``, set by ``open_store(pinned_bytes=)``). A tier handed to
        ``Store(pinned=)`` is the caller's, shared by the stores it was given to (a warm pool):
        it keeps its chunks until ``free()``."""
        if self.close_with_store:
            self.free()

    def free(self) -> None:
        """Drop every chunk not leased and hand the free buffers back."""
        with self._lock:
            for d in [d for d, e in self._entries.items() if e.leases == 0]:
                e = self._entries.pop(d)
                if not e.lent:
                    self._used -= e.buf.size
            self._reclaim()
            for bufs in self._free.values():
                self._used -= sum(b.size for b in bufs)
            self._free.clear()
        _empty_host_cache()

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes of host memory the tier holds (buffers by size class, free ones included)."""
        return self._used

    @property
    def held(self) -> int:
        """Chunk bytes held (ready entries)."""
        with self._lock:
            return sum(e.length for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _release(self, digest: bytes, e: _Entry, after: Any) -> None:
        with self._lock:
            e.leases -= 1
            if after is not None:
                e.fences.append(after)
            if e.drop and e.leases == 0:
                self._retire(e)

    @staticmethod
    def _fenced(e: _Entry) -> bool:
        """True when no GPU copy still reads the buffer (completed fences are forgotten)."""
        e.fences = [f for f in e.fences if not f.query()]
        return not e.fences

    def _recycle(self, e: _Entry) -> None:
        if not e.lent:  # lent memory goes back to its lender, never to the free lists
            self._free.setdefault(e.buf.size, []).append(e.buf)

    def _retire(self, e: _Entry) -> None:
        """A dropped entry's buffer: free now, or once the copies reading it are done."""
        if self._fenced(e):
            self._recycle(e)
        else:
            self._limbo.append(e)

    def _reclaim(self) -> None:
        """Move limbo buffers whose copies have finished to the free lists."""
        if self._limbo:
            still = []
            for e in self._limbo:
                (self._recycle(e) if self._fenced(e) else still.append(e))
            self._limbo = still

    def _take(self, cls: int) -> HostBuffer | None:
        """A buffer of size class ``cls`` (under the lock): a free one, a new one within the
        capacity, or one freed by evicting least recently used chunks; None when none can be
        had."""
        if cls > self.capacity:
            return None
        self._reclaim()
        free = self._free.get(cls)
        if free:
            return free.pop()
        while self._used + cls > self.capacity:
            if not self._drop_free(cls) and not self._evict_one(cls):
                return None
            free = self._free.get(cls)
            if free:
                return free.pop()
        buf = self._alloc(cls)
        self._used += buf.size
        return buf

    def _drop_free(self, keep: int) -> bool:
        """Free one unused buffer of another size class; False when there is none."""
        for size, bufs in self._free.items():
            if size != keep and bufs:
                bufs.pop()
                self._used -= size
                return True
        return False

    def _evict_one(self, want: int) -> bool:
        """Evict the least recently used chunk that no one leases and no copy reads (its
        buffer goes to the free list); False when every chunk is in use."""
        for d, e in self._entries.items():
            if e.leases == 0 and e.ready.is_set() and not e.lent and self._fenced(e):
                del self._entries[d]
                self._recycle(e)
                self.evictions += 1
                return True
        return False


class _Nothing:
    """``with tier.acquire(ref) or _Nothing() as c``: c is None on a miss."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _empty_host_cache() -> None:
    """Hand torch's cached pinned blocks back to the driver, where this torch can."""
    try:
        import sys

        torch = sys.modules.get("torch")
        if torch is None:
            return
        for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):
            fn = getattr(torch._C, name, None)
            if fn is not None:
                fn()
                return
    except Exception:  # noqa: BLE001 - best effort at close
        pass
