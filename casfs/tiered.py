"""TieredStore: the read path for chunks.

A read asks the decoded-memory cache first (``casfs.tiers.memory.MemoryCache``: verified
bytes, no decoding). On a miss it walks the frame tiers top-down (``casfs.tiers.base.Tier``:
ssd, cache servers, blob). The first tier that has the chunk answers; its frame is decoded and
verified against the digest the caller asked for. A bad frame is counted, reported to its tier
(``Tier.rejected``: a cache evicts it, a cache-server client skips the node) and the walk goes
on to the next tier. On the way back the chunk is put into the memory cache at once and its
frame into the faster writable tiers (ssd) by a background writer, so the reader never waits
for a cache fill. Concurrent reads of one chunk share one fetch (single flight).

Retries live in one layer, the remote object stores (``casfs.objects``: HTTP retries 5xx/429
with backoff and ``Retry-After``, cut bodies and stale keep-alive connections; S3 through
botocore's standard mode plus cut bodies), because only they can tell a transient failure from
a lasting one. The walk makes ONE pass: a failing tier is skipped, not retried, and when no
tier answers the read raises ``ChunkUnavailable`` naming what each tier said. (It used to
retry the whole walk twice on top of each backend's own loop: up to 15 attempts at one chunk
behind a dead HTTP store, each with its backoff, before a FUSE reader got its EIO.)

Packs: when a packed chunk has to come from the blob tier, a span of its pack is fetched in
one ranged read; the other frames in it are staged in a bounded buffer (and written to the ssd
tier in the background), so the many small files that travel in one pack cost one round trip.
Which span: for a chunk a startup profile wants (``want``), the run of wanted frames around it
(gaps up to ``span_gap``); for any other, the frames within ``span_window`` around it. (It used
to be the whole span of the image's frames in that pack: a Debian root's `cat /etc/os-release`
read 2.4 MB through FUSE and fetched 17 MB.)

Sub-chunk reads: ``read(ref, offset, length)`` returns a verified slice of a chunk. When the
chunk is not in memory, the read is small against the chunk (at most a quarter of it) and the
chunk's frame is blocked (``casfs.chunk`` version 2), only the blocks that cover the slice are
fetched: the frame's meta (header, block ends, outboard: ~2.3 KiB for 4 MiB) once per chunk,
verified against the chunk's name and kept in a bounded dict (a read in the chunk's first two
blocks, as file headers are, gets its blocks in the same ranged read: one round trip), then
the blocks as one ranged read per run of adjacent blocks, each block verified alone against its CV
(``casfs.blocktree``). Verified blocks are kept in a memory cache of their own
(``block_cache_bytes``) and written to the ssd tier as parts (``SsdTier.put_part``) by the
background writer, so a warm start reads locally what a cold one fetched. A block that fails
verification is counted, dropped from the tier that served it (a part is dropped, a whole ssd
frame evicted, a cache node reported) and fetched from the next tier: never served. Whole
frames (version 1), a store without the CV library, and reads of a large share of a chunk take
the whole-chunk path.

Zero-copy reads: ``get_into`` fills a caller's buffer (pinned host memory for a GPU copy, a
tensor's storage) with a chunk's verified bytes. Tiers backed by local files (``ssd``, a
local-directory blob store, packs included) expose ``supports_read_into`` and
``read_into(ref, buf, hash_threads=)``: a raw payload goes from the file into the buffer with
``os.preadv`` and is hashed there, so nothing is copied under the GIL. Other tiers (S3, HTTP,
cache servers) answer with a frame that is decoded into the buffer. ``get_into`` keeps the
guarantees of ``get`` (verification, eviction of bad copies, single flight with ``get``
callers, per-tier stats, background fills of the ssd tier) but by default does not put what it
read into the memory cache: a one-pass stream of weights would only churn it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Sequence

from . import blocktree
from . import chunk as chunkmod
from .errors import ChunkUnavailable, CorruptChunk
from .index import ChunkRef
from .tiers.base import Tier, TierStats, WorkerPool
from .tiers.memory import MemoryCache

log = logging.getLogger("casfs.store")

PackMembers = Callable[[bytes], list[ChunkRef]]
_WHOLE = object()  # meta-cache marker: this chunk's frame is not blocked (read it whole)
META_ENTRIES = 8192  # frame metas kept (~2.3 KiB each for 4 MiB chunks of 64 KiB blocks)


class _BlockKey:
    """A memory-cache key for one block (the cache keys entries by ``.digest``)."""

    __slots__ = ("digest",)

    def __init__(self, digest: bytes, i: int) -> None:
        self.digest = digest + i.to_bytes(4, "little")


class _Staged:
    """Bounded LRU of frames that arrived with a pack but were not asked for yet."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._d: OrderedDict[bytes, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.stats = TierStats("pack-staging")

    def pop(self, digest: bytes) -> bytes | None:
        with self._lock:
            f = self._d.pop(digest, None)
            if f is not None:
                self._used -= len(f)
        return f

    def add(self, digest: bytes, frame: bytes) -> None:
        if len(frame) > self.capacity:
            return
        with self._lock:
            if digest in self._d:
                return
            self._d[digest] = frame
            self._used += len(frame)
            while self._used > self.capacity:
                _, f = self._d.popitem(last=False)
                self._used -= len(f)


class _Flight(Future):
    """One in-flight fetch; ``waiters`` counts the readers that joined it (under the lock)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiters = 0


class TieredStore:
    """Reads verified chunks through a memory cache and a list of frame tiers, fastest first.

    Args:
        tiers: frame tiers, ordered fastest to slowest; the last is normally the blob tier.
        memory: the decoded-memory cache in front of them (None: none).
        block_cache_bytes: memory for verified blocks of sub-chunk reads.
        block_reads: serve small reads of blocked frames block by block (``read``).
        span_window: bytes of a pack around a missed chunk fetched with it (its neighbours
            come along staged) when no profile says what is wanted.
        span_gap: largest gap between wanted frames (``want``) read through in one span.
        io_threads: workers for concurrent fetches (``get_many``, ``prefetch``).
        writeback_bytes: most bytes queued for background cache fills; past that fills are
            skipped rather than slowing readers.
        staging_bytes: budget for frames that arrived with a pack ahead of their reads.
    """

    def __init__(self, tiers: Sequence[Tier], *, memory: MemoryCache | None = None,
                 io_threads: int = 16, writeback_bytes: int = 256 << 20,
                 staging_bytes: int = 64 << 20, block_cache_bytes: int = 64 << 20,
                 block_reads: bool = True, span_window: int = 512 << 10, span_gap: int = 32 << 10) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self.memory = memory
        self._inflight: dict[bytes, _Flight] = {}
        self._span_inflight: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._io = WorkerPool(max_workers=io_threads, thread_name_prefix="casfs-io")
        self._wb = WorkerPool(max_workers=1, thread_name_prefix="casfs-writeback")
        self._wb_pending = 0
        self._wb_limit = writeback_bytes
        self._staged = _Staged(staging_bytes)
        self.verify_failures = 0
        self.block_reads = block_reads and blocktree.available()
        self.blocks = MemoryCache(block_cache_bytes, name="blocks") if block_cache_bytes > 0 else None
        self._metas: OrderedDict[bytes, object] = OrderedDict()
        self.span_window = span_window
        self.span_gap = span_gap
        self._wanted: set[bytes] = set()
        self.counters = {"block_reads": 0, "blocks_fetched": 0, "block_bytes_fetched": 0,
                         "block_hits": 0, "metas_fetched": 0, "whole_reads": 0}

    # -- public -----------------------------------------------------------------------------

    def get(self, ref: ChunkRef, pack_members: PackMembers | None = None) -> bytes:
        """Return the verified, decoded bytes of ``ref``.

        ``pack_members`` (usually ``Index.pack_members``) lets a packed chunk bring its pack's
        neighbours along.

        Raises:
            ChunkUnavailable: when no tier holds a verified copy.
        """
        if self.memory is not None:
            data = self.memory.get(ref)
            if data is not None:
                return data
        fut, owner = self._join(ref.digest)
        if not owner:
            return fut.result()
        try:
            data = self._fetch(ref, lambda errors: self._walk(ref, pack_members, errors))
        except BaseException as e:
            self._land(ref.digest, fut, error=e)
            raise
        self._land(ref.digest, fut, result=data)
        return data

    def read(self, ref: ChunkRef, offset: int, length: int, pack_members: PackMembers | None = None) -> bytes:
        """The verified bytes ``[offset, offset + length)`` of chunk ``ref`` (clipped to it).

        Small reads of a chunk that is not in memory fetch and verify only the blocks that
        cover them (see the module doc); others read the whole chunk (``get``).

        Raises:
            ChunkUnavailable: when no tier holds a verified copy of what is needed.
            ValueError: a negative offset or length.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(ref.raw_len, offset + length)
        if offset >= end:
            return b""
        data = self.peek(ref)
        if data is None and self.wants_blocks(ref, end - offset):
            # a read near the chunk's start (file headers: the commonest small read) asks for
            # its blocks with the block table in one ranged read: one round trip, not two
            first_block = offset // chunkmod.DEFAULT_BLOCK
            extra = (end - 1) // chunkmod.DEFAULT_BLOCK + 1 if first_block < 2 else 0
            meta = self._meta(ref, extra * chunkmod.DEFAULT_BLOCK)
            if meta is not None:
                return self._read_blocks(ref, meta, offset, end)
        if data is None:
            self.counters["whole_reads"] += 1
            data = self.get(ref, pack_members)
        return data[offset:end] if (offset or end != len(data)) else data

    def peek_range(self, ref: ChunkRef, offset: int, length: int) -> bytes | None:
        """The verified bytes ``[offset, offset + length)`` of ``ref`` if memory holds them
        (the chunk, or every block they need), else None: never fetches, never blocks on I/O
        (the FUSE loop's fast path for small reads)."""
        data = self.peek(ref)
        end = min(ref.raw_len, offset + length)
        if data is not None:
            return data[offset:end]
        m = self._metas.get(ref.digest)
        if m is None or m is _WHOLE or self.blocks is None or offset >= end:
            return None
        block = m.block  # type: ignore[attr-defined]
        first, last = offset // block, (end - 1) // block
        parts = []
        for i in range(first, last + 1):
            d = self.blocks.peek(_BlockKey(ref.digest, i))  # type: ignore[arg-type]
            if d is None:
                return None
            parts.append(d)
        self.counters["block_hits"] += len(parts)
        lo = offset - first * block
        if len(parts) == 1:
            return parts[0][lo:lo + (end - offset)]
        return b"".join(parts)[lo:lo + (end - offset)]

    def held_locally(self, ref: ChunkRef, offset: int, length: int) -> bool:
        """Whether ``read(ref, offset, length)`` would be one or two blocks from a local tier
        (ssd) of a chunk whose block table is known: a few-100-us ``pread`` and hash that a
        caller may do inline rather than hand to a thread (the FUSE loop: under load a thread
        hand-off cost more than the read). Answered from memory, no I/O."""
        m = self._metas.get(ref.digest)
        if m is None or m is _WHOLE or length <= 0:
            return False
        block = m.block  # type: ignore[attr-defined]
        end = min(ref.raw_len, offset + length)
        first, last = offset // block, (end - 1) // block
        if last - first > 1:
            return False
        for tier in self.tiers:
            if tier.writable and tier.supports_ranges:
                return tier.holds(ref, range(first, last + 1))
        return False

    def wants_blocks(self, ref: ChunkRef, length: int) -> bool:
        """Whether ``read`` would serve ``length`` bytes of ``ref`` block by block (a small
        read of a chunk longer than the smallest block, with block reads on; the chunk's frame
        may still turn out whole)."""
        return (self.block_reads and ref.raw_len > (1 << chunkmod.MIN_FRAME_BLOCK_LOG2)
                and 4 * length <= ref.raw_len and self._metas.get(ref.digest) is not _WHOLE)

    def get_into(self, ref: ChunkRef, buf: object, pack_members: PackMembers | None = None, *,
                 fill_memory: bool = False, hash_threads: int = 0) -> int:
        """Write the verified bytes of ``ref`` to the start of ``buf``; returns their length.

        The zero-copy read: from a tier backed by local files a raw chunk is read straight into
        ``buf`` and its blake3 checked there; a zstd chunk is decompressed into ``buf``; a
        memory-cache hit and a frame from a remote tier are copied in. A copy that fails
        verification is handled as in ``get`` (counted, evicted, the next tier tried), so a
        return always means ``buf[:n]`` holds the right bytes. Concurrent ``get``/``get_into``
        calls for one chunk share one fetch. Slower writable tiers (ssd) are filled in the
        background as ``get`` fills them.

        Args:
            buf: a writable, contiguous buffer of at least ``ref.raw_len`` bytes (a
                ``bytearray``, or a memoryview over pinned memory or a tensor's storage).
            pack_members: as ``get``.
            fill_memory: also put the chunk into the memory cache (one extra copy). Off by
                default: a one-pass stream (weights) should not evict what the mount uses.
            hash_threads: blake3 threads per verification (0: the default of
                ``casfs.digest``; use 1 when many threads call ``get_into`` at once).

        Raises:
            ChunkUnavailable: when no tier holds a verified copy (``buf`` then holds
                unspecified bytes).
            ValueError: ``buf`` is read-only, not contiguous, or smaller than ``ref.raw_len``.
        """
        out = chunkmod.writable_view(buf)
        if len(out) < ref.raw_len:
            raise ValueError(f"buffer of {len(out)} bytes is smaller than chunk "
                             f"{ref.digest.hex()[:16]}… ({ref.raw_len} bytes)")
        out = out[:ref.raw_len]  # every decoder below refuses a frame that declares more
        if self.memory is not None:
            data = self.memory.get(ref)
            if data is not None and len(data) <= len(out):
                return chunkmod.copy_into(out, data)
        fut, owner = self._join(ref.digest)
        if not owner:
            return chunkmod.copy_into(out, fut.result())
        try:
            n = self._fetch(ref, lambda errors: self._walk_into(ref, pack_members, out, errors,
                                                                fill_memory, hash_threads))
        except BaseException as e:
            self._land(ref.digest, fut, error=e)
            raise
        self._land(ref.digest, fut, view=out[:n])
        return n

    def get_many(self, refs: Iterable[ChunkRef], pack_members: PackMembers | None = None) -> list[bytes]:
        """Fetch several chunks concurrently; results in input order."""
        refs = list(refs)
        if len(refs) <= 1:
            return [self.get(r, pack_members) for r in refs]
        futs = [self._io.submit(self.get, r, pack_members) for r in refs]
        return [f.result() for f in futs]

    def prefetch(self, refs: Iterable[ChunkRef], pack_members: PackMembers | None = None) -> list[Future]:
        """Start background fetches (errors are logged, never raised). Returns the futures."""
        out = []
        for r in refs:
            if self.in_memory(r):
                continue
            out.append(self._io.submit(self._quiet_get, r, pack_members))
        return out

    def peek(self, ref: ChunkRef) -> bytes | None:
        """The verified bytes of ``ref`` if the memory cache holds them, else None: never
        fetches, never blocks on I/O (the FUSE read loop's fast path). A hit is counted in
        the memory cache's stats; a miss is not (the ``get`` that follows counts it)."""
        return self.memory.peek(ref) if self.memory is not None else None

    def in_memory(self, ref: ChunkRef) -> bool:
        """Whether the memory cache holds ``ref`` (False without a memory cache)."""
        return self.memory is not None and self.memory.contains(ref)

    def contains(self, ref: ChunkRef) -> bool:
        """True when the memory cache or some tier holds the chunk (no verification)."""
        return self.in_memory(ref) or any(t.contains(ref) for t in self.tiers)

    def stats(self) -> list[TierStats]:
        """Statistics, fastest first: the memory cache, each tier, pack staging, then the
        block cache of sub-chunk reads (when there is one)."""
        head = [self.memory.stats()] if self.memory is not None else []
        tail = [self.blocks.stats()] if self.blocks is not None else []
        return head + [t.stats() for t in self.tiers] + [self._staged.stats] + tail

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until background cache fills queued so far are written."""
        self._wb.submit(lambda: None).result(timeout=timeout)

    def threads_started(self) -> bool:
        """Whether this store (its fetch or write-back pool, or a tier) has started worker
        threads: a process that forks after that must not use the store in the child, where
        those threads do not exist (``casfs.fuse.daemon.forkable``)."""
        return self._io.used or self._wb.used or any(t.threads_started() for t in self.tiers)

    def close(self) -> None:
        """Stop the worker threads (queued cache fills are written first) and close the tiers."""
        self._io.shutdown(wait=True, cancel_futures=True)
        self._wb.shutdown(wait=True)
        for tier in self.tiers:
            try:
                tier.close()
            except Exception as e:  # noqa: BLE001 - closing must not mask the caller's error
                log.warning("closing tier %s failed: %s", tier.name, e)

    # -- internals --------------------------------------------------------------------------

    def _quiet_get(self, ref: ChunkRef, pack_members: PackMembers | None) -> None:
        try:
            self.get(ref, pack_members)
        except Exception as e:  # noqa: BLE001 - prefetch is best effort
            log.warning("prefetch of chunk %s failed: %s", ref.digest.hex()[:16], e)

    def _join(self, digest: bytes) -> tuple[_Flight, bool]:
        """The in-flight fetch of ``digest`` and whether the caller owns (must perform) it."""
        with self._lock:
            fut = self._inflight.get(digest)
            if fut is None:
                fut = self._inflight[digest] = _Flight()
                return fut, True
            fut.waiters += 1
            return fut, False

    def _land(self, digest: bytes, fut: _Flight, *, result: bytes | None = None,
              view: memoryview | None = None, error: BaseException | None = None) -> None:
        """Finish an owned fetch. A ``get_into`` owner (``view``) copies its bytes out only
        when some reader joined it: the caller's buffer is reused once we return."""
        with self._lock:
            self._inflight.pop(digest, None)
            waiters = fut.waiters
        if error is not None:
            fut.set_exception(error)
        elif view is not None:
            fut.set_result(bytes(view) if waiters else None)
        else:
            fut.set_result(result)

    def _fetch(self, ref: ChunkRef, walk: Callable[[list[str]], object]) -> Any:
        """One walk (no retries here: see the module doc); ChunkUnavailable when it finds no
        verified copy, with what every tier said."""
        errors: list[str] = []
        got = walk(errors)
        if got is not None:
            return got
        detail = "; ".join(errors) or "no tier has it"
        raise ChunkUnavailable(f"chunk {ref.digest.hex()} unavailable: {detail}")

    def _walk(self, ref: ChunkRef, pack_members: PackMembers | None, errors: list[str]) -> bytes | None:
        staged = self._staged.pop(ref.digest)
        if staged is not None:
            data = self._verify(staged, ref, None, errors)
            if data is not None:
                self._staged.stats.record_get(True, len(staged), 0.0)
                self._remember(ref, data)  # its frame is already queued for the ssd tier
                return data
        for i, tier in enumerate(self.tiers):
            try:
                if self._spans(tier, ref, pack_members):
                    frame = self._get_pack_span(tier, ref, pack_members, i)  # type: ignore[arg-type]
                else:
                    frame = tier.get(ref)
            except Exception as e:  # noqa: BLE001 - a failing tier is skipped, not fatal
                tier.stats().record_error()
                errors.append(f"{tier.name}: error {e}")
                log.warning("tier %s failed for chunk %s: %s", tier.name, ref.digest.hex()[:16], e)
                continue
            if frame is None:
                errors.append(f"{tier.name}: miss")
                continue
            data = self._verify(frame, ref, tier, errors)
            if data is None:
                continue
            self._remember(ref, data)
            self._queue_fill(ref, frame, i)
            return data
        return None

    @staticmethod
    def _spans(tier: Tier, ref: ChunkRef, pack_members: PackMembers | None) -> bool:
        """Whether to read ``ref``'s pack span from ``tier`` (its neighbours come along)."""
        return ref.pack is not None and pack_members is not None and tier.supports_spans

    def _verify(self, frame: bytes, ref: ChunkRef, tier: Tier | None, errors: list[str]) -> bytes | None:
        try:
            data = chunkmod.decode(frame, expect=ref.digest, length=ref.raw_len)
        except CorruptChunk as e:
            self._corrupt(ref, tier, e, errors)
            return None
        return data

    def _corrupt(self, ref: ChunkRef, tier: Tier | None, e: CorruptChunk, errors: list[str]) -> None:
        """Count a copy that failed verification and evict it (or tell its read-only tier)."""
        self.verify_failures += 1
        name = tier.name if tier is not None else "pack-staging"
        errors.append(f"{name}: error corrupt ({e})")
        log.error("corrupt chunk %s from tier %s: %s", ref.digest.hex()[:16], name, e)
        if tier is not None:
            tier.stats().record_error()
            try:
                tier.rejected(ref)  # a cache evicts it; a read-only tier learns its source lied
            except Exception as e:  # noqa: BLE001 - the read goes on to the next tier
                log.warning("tier %s could not drop corrupt chunk %s: %s", tier.name, ref.digest.hex()[:16], e)

    def _walk_into(self, ref: ChunkRef, pack_members: PackMembers | None, out: memoryview,
                   errors: list[str], fill_memory: bool, hash_threads: int) -> int | None:
        """``_walk`` for ``get_into``: the first verified copy lands in ``out``."""
        staged = self._staged.pop(ref.digest)
        if staged is not None:
            try:
                n = chunkmod.decode_into(staged, out, ref.digest, hash_threads=hash_threads)
            except CorruptChunk as e:
                self._corrupt(ref, None, e, errors)
            else:
                self._staged.stats.record_get(True, len(staged), 0.0)
                if fill_memory:
                    self._remember(ref, bytes(out[:n]))
                return n  # its frame is already queued for the ssd tier
        for i, tier in enumerate(self.tiers):
            frame = None
            try:
                if tier.supports_read_into:
                    n = tier.read_into(ref, out, hash_threads=hash_threads)
                    if n is None:
                        errors.append(f"{tier.name}: miss")
                        continue
                    if fill_memory:
                        self._remember(ref, bytes(out[:n]))
                    self._fill_frames_from(ref, out[:n], i)
                    return n
                if self._spans(tier, ref, pack_members):
                    frame = self._get_pack_span(tier, ref, pack_members, i)  # type: ignore[arg-type]
                else:
                    frame = tier.get(ref)
                if frame is None:
                    errors.append(f"{tier.name}: miss")
                    continue
                n = chunkmod.decode_into(frame, out, ref.digest, hash_threads=hash_threads)
            except CorruptChunk as e:
                self._corrupt(ref, tier, e, errors)
                continue
            except Exception as e:  # noqa: BLE001 - a failing tier is skipped, not fatal
                tier.stats().record_error()
                errors.append(f"{tier.name}: error {e}")
                log.warning("tier %s failed for chunk %s: %s", tier.name, ref.digest.hex()[:16], e)
                continue
            if fill_memory:
                self._remember(ref, bytes(out[:n]))
            self._queue_fill(ref, frame, i)
            return n
        return None

    def _remember(self, ref: ChunkRef, data: bytes) -> None:
        """Put verified bytes into the memory cache (if there is one)."""
        if self.memory is not None:
            self.memory.put(ref, data)

    def _fill_frames_from(self, ref: ChunkRef, view: memoryview, upto: int) -> None:
        """Queue a raw frame of ``view`` for the frame tiers above ``upto`` (copied now: the
        caller reuses its buffer), unless there are none or the writeback queue is full."""
        if not any(t.writable for t in self.tiers[:upto]):
            return
        with self._lock:
            if self._wb_pending + len(view) + chunkmod.HEADER_SIZE > self._wb_limit:
                return
        _, frame = chunkmod.encode(view, ref.digest, compress=False)
        self._queue_fill(ref, frame, upto)

    def want(self, refs: Iterable[ChunkRef]) -> None:
        """Declare chunks that will be read soon (a startup profile): a pack span fetched for
        one of them brings exactly the wanted frames near it (``span_gap``), not a window."""
        with self._lock:
            self._wanted.update(r.digest for r in refs)

    def _span_members(self, ref: ChunkRef, members: list[ChunkRef]) -> list[ChunkRef]:
        """The members of ``ref``'s pack to fetch with it, in pack order (``ref`` included).

        A chunk a profile wants brings the run of wanted members around it whose gaps are at
        most ``span_gap`` bytes (reading a small gap costs less than another round trip);
        any other chunk brings the members inside ``span_window`` bytes around it, three
        quarters of it ahead (builds pack files in directory order)."""
        k = next((i for i, m in enumerate(members) if m.digest == ref.digest and m.pack_off == ref.pack_off), None)
        if k is None:
            return [ref]
        wanted = self._wanted
        if ref.digest in wanted:
            run = [m for m in members if m.digest in wanted or m is members[k]]
            j = run.index(members[k])
            lo = hi = j
            while lo > 0 and run[lo].pack_off - (run[lo - 1].pack_off + run[lo - 1].stored_len) <= self.span_gap:
                lo -= 1
            while hi + 1 < len(run) and run[hi + 1].pack_off - (run[hi].pack_off + run[hi].stored_len) <= self.span_gap:
                hi += 1
            start, end = run[lo].pack_off, run[hi].pack_off + run[hi].stored_len
            return [m for m in members if start <= m.pack_off and m.pack_off + m.stored_len <= end]
        first = ref.pack_off - self.span_window // 4
        last = ref.pack_off + ref.stored_len + self.span_window * 3 // 4
        return [m for m in members if m.pack_off >= first and m.pack_off + m.stored_len <= last] or [ref]

    def _get_pack_span(self, tier: Tier, ref: ChunkRef, pack_members: PackMembers, level: int) -> bytes | None:
        members = self._span_members(ref, pack_members(ref.pack))  # type: ignore[arg-type]
        if len(members) <= 1:
            return tier.get(ref)
        start = members[0].pack_off
        end = max(m.pack_off + m.stored_len for m in members)
        if not (start <= ref.pack_off and ref.pack_off + ref.stored_len <= end) or end - start > (64 << 20):
            return tier.get(ref)
        key = (tier.name, ref.pack, start, end)
        with self._lock:
            fut = self._span_inflight.get(key)
            owner = fut is None
            if owner:
                fut = self._span_inflight[key] = Future()
        if not owner:
            # another reader is fetching this span: wait, then take our frame from staging
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - fall back to our own read
                pass
            return self._staged.pop(ref.digest) or tier.get(ref)
        try:
            # a span fetch that ended after our walk looked at staging has staged our frame:
            # take it rather than fetch (and stage) the whole span a second time
            early = self._staged.pop(ref.digest)
            if early is not None:
                fut.set_result(None)
                return early
            span = tier.get_span(ref.pack, start, end - start)  # type: ignore[arg-type]
            mine = None
            if span is not None:
                mv = memoryview(span)
                for m in members:
                    frame = bytes(mv[m.pack_off - start:m.pack_off - start + m.stored_len])
                    if m.digest == ref.digest:
                        mine = frame
                    elif len(frame) == m.stored_len:  # (a short span: a truncated pack)
                        self._staged.add(m.digest, frame)
                        self._queue_fill(m, frame, level, verify=True)
            fut.set_result(None)
            return mine
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._lock:
                self._span_inflight.pop(key, None)

    # -- sub-chunk reads ----------------------------------------------------------------------

    def _remember_meta(self, digest: bytes, meta: object) -> None:
        with self._lock:
            self._metas[digest] = meta
            self._metas.move_to_end(digest)
            while len(self._metas) > META_ENTRIES:
                self._metas.popitem(last=False)

    def _meta(self, ref: ChunkRef, extra: int = 0) -> chunkmod.FrameMeta | None:
        """The verified meta of ``ref``'s blocked frame; None when its frame is whole or no
        tier can read ranges (the caller then reads the chunk whole).

        Raises:
            ChunkUnavailable: tiers failed and none answered (a read makes one walk)."""
        m = self._metas.get(ref.digest)
        if m is not None:
            return None if m is _WHOLE else m  # type: ignore[return-value]
        key = b"m" + ref.digest
        fut, owner = self._join(key)
        if not owner:
            return fut.result()
        try:
            meta = self._walk_meta(ref, extra)
        except BaseException as e:
            self._land(key, fut, error=e)
            raise
        self._land(key, fut, result=meta)  # type: ignore[arg-type]
        return meta

    def _walk_meta(self, ref: ChunkRef, extra: int = 0) -> chunkmod.FrameMeta | None:
        """Find and verify the block table; with ``extra``, the ranged read asks for that many
        more bytes, and the blocks that arrive whole with the table are verified and kept."""
        probe = chunkmod.meta_probe_len(ref.raw_len) + extra
        errors: list[str] = []
        for i, tier in enumerate(self.tiers):
            from_part = False
            try:
                buf = tier.get_part(ref, "m") if tier.supports_parts else None
                from_part = buf is not None
                if buf is None and tier.supports_ranges:
                    buf = tier.get_range(ref, 0, probe)
                if buf is None:
                    continue
                try:
                    meta = chunkmod.parse_meta(buf, ref.digest)
                except chunkmod.MetaTooShort as e:
                    if from_part:
                        raise CorruptChunk(f"stored block table is {len(buf)} bytes, needs {e.needed}") from None
                    buf = tier.get_range(ref, 0, e.needed) or b""
                    meta = chunkmod.parse_meta(buf, ref.digest)
            except CorruptChunk as e:
                if from_part:
                    self._corrupt_part(ref, tier, "m", e, errors)
                else:
                    self._corrupt(ref, tier, e, errors)
                continue
            except Exception as e:  # noqa: BLE001 - a failing tier is skipped
                tier.stats().record_error()
                errors.append(f"{tier.name}: error {e}")
                log.warning("tier %s failed for the block table of %s: %s", tier.name, ref.digest.hex()[:16], e)
                continue
            if meta is None:
                self._remember_meta(ref.digest, _WHOLE)
                return None
            self.counters["metas_fetched"] += 1
            self._remember_meta(ref.digest, meta)
            if not from_part:
                self._queue_part_fill(ref, "m", bytes(buf[:meta.header.meta_len]), i)
                if extra and not tier.writable and self.blocks is not None:  # (remote: a round trip saved)
                    self._keep_leading_blocks(ref, meta, buf, tier, i)
            return meta
        if errors:  # every tier failed or missed: one walk per read, no second (whole) walk
            raise ChunkUnavailable(f"chunk {ref.digest.hex()} unavailable: {'; '.join(errors)}")
        return None

    def _keep_leading_blocks(self, ref: ChunkRef, meta: chunkmod.FrameMeta, buf: bytes, tier: Tier,
                             level: int) -> None:
        """Verify and keep the blocks that arrived whole with a block table (a bad one is
        dropped here and fetched again by the read that wants it)."""
        for i in range(meta.n_blocks):
            off, n = meta.block_range(i)
            if off + n > len(buf):
                break
            stored = buf[off:off + n]
            try:
                data = chunkmod.decode_block(meta, i, stored)
            except CorruptChunk as e:
                self._corrupt(ref, tier, e, [])
                return
            self.counters["blocks_fetched"] += 1
            self.counters["block_bytes_fetched"] += n
            self.blocks.put(_BlockKey(ref.digest, i), data)  # type: ignore[union-attr,arg-type]
            self._queue_part_fill(ref, str(i), stored, level)

    def _read_blocks(self, ref: ChunkRef, meta: chunkmod.FrameMeta, offset: int, end: int) -> bytes:
        block = meta.block
        first, last = offset // block, (end - 1) // block
        self.counters["block_reads"] += 1
        parts = self._blocks(ref, meta, first, last)
        lo = offset - first * block
        if first == last:
            b = parts[0]
            return b[lo:lo + (end - offset)] if (lo or end - offset != len(b)) else b
        views = [memoryview(p) for p in parts]
        views[0] = views[0][lo:]
        views[-1] = views[-1][:end - last * block]
        return b"".join(views)

    def _blocks(self, ref: ChunkRef, meta: chunkmod.FrameMeta, first: int, last: int) -> list[bytes]:
        """Verified blocks ``first..last`` of ``ref`` (block cache, then one shared fetch)."""
        out: dict[int, bytes] = {}
        need = []
        for i in range(first, last + 1):
            d = self.blocks.peek(_BlockKey(ref.digest, i)) if self.blocks is not None else None  # type: ignore[arg-type]
            if d is not None:
                out[i] = d
                self.counters["block_hits"] += 1
            else:
                need.append(i)
        if need:
            owned: list[tuple[int, _Flight]] = []
            waits: list[tuple[int, _Flight]] = []
            for i in need:
                fut, owner = self._join(b"b" + ref.digest + i.to_bytes(4, "little"))
                (owned if owner else waits).append((i, fut))
            if owned:
                try:
                    got = self._walk_blocks(ref, meta, [i for i, _ in owned])
                except BaseException as e:
                    for i, fut in owned:
                        self._land(b"b" + ref.digest + i.to_bytes(4, "little"), fut, error=e)
                    raise
                for i, fut in owned:
                    self._land(b"b" + ref.digest + i.to_bytes(4, "little"), fut, result=got[i])
                    out[i] = got[i]
            for i, fut in waits:
                out[i] = fut.result()
        return [out[i] for i in range(first, last + 1)]

    def _walk_blocks(self, ref: ChunkRef, meta: chunkmod.FrameMeta, idxs: list[int]) -> dict[int, bytes]:
        """Fetch and verify blocks ``idxs``: parts, then ranges, tier by tier."""
        missing = list(idxs)
        got: dict[int, bytes] = {}
        errors: list[str] = []
        for t, tier in enumerate(self.tiers):
            if not missing:
                break
            if tier.supports_parts:
                still = []
                for i in missing:
                    try:
                        stored = tier.get_part(ref, str(i))
                    except Exception as e:  # noqa: BLE001
                        tier.stats().record_error()
                        errors.append(f"{tier.name}: error {e}")
                        stored = None
                    if stored is None:
                        still.append(i)
                        continue
                    try:
                        got[i] = chunkmod.decode_block(meta, i, stored)
                    except CorruptChunk as e:
                        self._corrupt_part(ref, tier, str(i), e, errors)
                        still.append(i)
                missing = still
            if not missing or not tier.supports_ranges:
                continue
            bad = False
            for run in _runs(missing):
                off, ln = meta.blocks_range(run[0], run[-1])
                try:
                    buf = tier.get_range(ref, off, ln)
                except Exception as e:  # noqa: BLE001 - a failing tier is skipped
                    tier.stats().record_error()
                    errors.append(f"{tier.name}: error {e}")
                    log.warning("tier %s failed for blocks of %s: %s", tier.name, ref.digest.hex()[:16], e)
                    continue
                if buf is None:
                    errors.append(f"{tier.name}: miss")
                    continue
                for i in run:
                    o, n = meta.block_range(i)
                    stored = buf if len(run) == 1 else buf[o - off:o - off + n]  # bytes: hashed in place
                    try:
                        got[i] = chunkmod.decode_block(meta, i, stored)
                    except CorruptChunk as e:
                        if not bad:
                            bad = True
                            self._corrupt(ref, tier, e, errors)
                        continue
                    self.counters["blocks_fetched"] += 1
                    self.counters["block_bytes_fetched"] += n
                    if t:
                        self._queue_part_fill(ref, str(i), stored, t)
            missing = [i for i in missing if i not in got]
        if missing:
            detail = "; ".join(errors) or "no tier has it"
            raise ChunkUnavailable(f"chunk {ref.digest.hex()} blocks {missing[:8]} unavailable: {detail}")
        if self.blocks is not None:
            for i in idxs:
                self.blocks.put(_BlockKey(ref.digest, i), got[i])  # type: ignore[arg-type]
        return got

    def _corrupt_part(self, ref: ChunkRef, tier: Tier, part: str, e: CorruptChunk, errors: list[str]) -> None:
        """Count a stored part that failed verification and drop it."""
        self.verify_failures += 1
        tier.stats().record_error()
        errors.append(f"{tier.name}: error corrupt part {part} ({e})")
        log.error("corrupt part %s of chunk %s in tier %s: %s", part, ref.digest.hex()[:16], tier.name, e)
        try:
            tier.drop_part(ref, part)
        except Exception as e2:  # noqa: BLE001
            log.warning("tier %s could not drop part %s of %s: %s", tier.name, part, ref.digest.hex()[:16], e2)

    def _queue_part_fill(self, ref: ChunkRef, part: str, data: bytes, upto: int) -> None:
        """Keep a verified part (block table or block) in the faster part-keeping tiers."""
        targets = [t for t in self.tiers[:upto] if t.writable and t.supports_parts]
        if targets:
            self._queue_write(targets, len(data), lambda t: t.put_part(ref, part, data), ref)

    def _queue_fill(self, ref: ChunkRef, frame: bytes, upto: int, *, verify: bool = False) -> None:
        """Write ``frame`` (found at tier ``upto``) into the faster writable tiers, in the
        background. ``verify``: the frame has not been checked yet (a pack neighbour that came
        along with a span): the writer checks it (``chunk.verify``, the index's length) before
        any tier gets it, so a torn or damaged pack never fills the ssd tier."""
        targets = [t for t in self.tiers[:upto] if t.writable]
        if not targets:
            return

        def check() -> bool:
            try:
                chunkmod.check_length(chunkmod.parse_header(frame), ref.raw_len)
                chunkmod.verify(frame, expect=ref.digest)
            except CorruptChunk as e:
                with self._lock:
                    self.verify_failures += 1
                log.error("corrupt chunk %s in a pack from tier %s, not cached: %s",
                          ref.digest.hex()[:16], self.tiers[upto].name, e)
                return False
            return True

        self._queue_write(targets, len(frame), lambda t: t.put(ref, frame), ref, check if verify else None)

    def _queue_write(self, targets: list[Tier], nbytes: int, put: Callable[[Tier], None], ref: ChunkRef,
                     check: Callable[[], bool] | None = None) -> None:
        """Run ``put`` for each target tier on the background writer (after ``check``, when
        given, returns True); skipped when the queue holds ``writeback_bytes`` already."""
        with self._lock:
            if self._wb_pending + nbytes > self._wb_limit:
                return  # readers come first: skip this fill
            self._wb_pending += nbytes

        def write() -> None:
            try:
                if check is not None and not check():
                    return
                for t in targets:
                    try:
                        put(t)
                    except Exception as e:  # noqa: BLE001
                        t.stats().record_error()
                        log.warning("cache fill of %s into %s failed: %s", ref.digest.hex()[:16], t.name, e)
            finally:
                with self._lock:
                    self._wb_pending -= nbytes

        try:
            self._wb.submit(write)
        except RuntimeError:  # shut down
            with self._lock:
                self._wb_pending -= nbytes


def _runs(idxs: list[int]) -> list[list[int]]:
    """Sorted ints grouped into runs of consecutive values."""
    out: list[list[int]] = []
    for i in sorted(idxs):
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out
