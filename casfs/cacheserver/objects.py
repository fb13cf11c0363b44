"""The cache behind a cache server: immutable store objects held in memory and on local ssd,
filled from the blob store on a miss, and verified before they are cached or served.

Objects are the blob store's immutable kinds, named by blake3 digests:

- ``chunks/<hex>`` and ``indexes/<hex>``: one chunk frame whose decoded bytes hash to <hex>
  (verified with ``casfs.chunk.verify(frame, expect=digest)``, in bounded memory);
- ``packs/<hex>``: many frames back to back; the pack's own bytes hash to <hex>.

So every object is checked against its name before it enters a tier (a bad blob answer is
an error, never cached), and again when it is promoted from ssd to memory (a rotten file is
deleted and refetched). Memory hits are served without re-hashing: memory holds only
verified bytes. Concurrent misses for one object share one blob fetch (single flight).

Peer mode: when the cache directory is also the ssd tier of a casfs Store on the same host
(``open_store(..., cache_dir=DIR)`` keeps chunk frames in ``DIR/chunks/``), loose chunks that
host already holds are served from there without a blob fetch or a second copy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from .. import chunk as chunkmod
from ..digest import digest_bytes
from ..errors import CorruptChunk
from ..index import ChunkRef
from ..layout import CHUNKS, IMMUTABLE_KINDS, PACKS, cache_chunks_dir, fanout_name, split_key
from ..objects.base import ObjectStore
from ..tiers.memory import MemoryCache
from ..tiers.ssd import SsdTier
from .metrics import Metrics

log = logging.getLogger("casfs.cacheserver")

KINDS = IMMUTABLE_KINDS
SERVER_SUBDIR = "azcache-server"


def verify_object(key: str, data: bytes | memoryview) -> None:
    """Check that ``data`` is the object named ``key`` (``kind/<64 hex>``).

    Raises:
        CorruptChunk: when the bytes do not hash to the name (or a frame is malformed).
        ValueError: for a key that is not an immutable object name.
    """
    try:
        kind, name = split_key(key)
    except ValueError:
        kind, name = "", ""
    if kind not in KINDS or len(name) != 64:
        raise ValueError(f"{key!r} is not an immutable object (chunks/, packs/ or indexes/ + 64 hex)")
    digest = bytes.fromhex(name)
    if kind == PACKS:
        if digest_bytes(data) != digest:
            raise CorruptChunk(f"pack {name[:16]}… failed digest verification ({len(data)} bytes)")
    else:
        chunkmod.verify(data, expect=digest)  # (bounded memory, whatever the frame declares)


def _slot(key: str) -> ChunkRef:
    """The tier key of an object: the digest of its name, so that a chunk and a pack that
    happen to share a digest never share a cache slot."""
    return ChunkRef(digest_bytes(key.encode()), 0, 0)


class ObjectCache:
    """Memory + ssd cache of one blob store's immutable objects. Thread-safe.

    Args:
        objects: the blob store to fill from.
        memory_bytes: memory tier capacity (0 disables it).
        cache_dir: local directory for the ssd tier (None: memory only). Objects go to
            ``cache_dir/azcache-server``; a casfs Store ssd tier in ``cache_dir/chunks`` is read
            too (peer mode, loose chunks only).
        cache_bytes: ssd tier capacity.
        metrics: where hits, misses, fills and verification failures are counted.
        writeback_bytes: most bytes queued for ssd writes; past that writes are skipped.
        fsync: fsync ssd files before renaming them into place.
    """

    def __init__(self, objects: ObjectStore, *, memory_bytes: int = 1 << 30,
                 cache_dir: str | None = None, cache_bytes: int = 50 << 30,
                 metrics: Metrics | None = None, writeback_bytes: int = 256 << 20,
                 fsync: bool = True) -> None:
        self.objects = objects
        self.metrics = metrics or Metrics()
        self.memory = MemoryCache(memory_bytes, name="server-memory") if memory_bytes > 0 else None
        self.ssd = SsdTier(os.path.join(cache_dir, SERVER_SUBDIR), cache_bytes, fsync=fsync,
                           name="server-ssd") if cache_dir else None
        self.host_chunks = cache_chunks_dir(cache_dir) if cache_dir else None
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._wb = ThreadPoolExecutor(max_workers=1, thread_name_prefix="casfs-server-ssd")
        self._wb_pending = 0
        self._wb_limit = writeback_bytes

    def close(self) -> None:
        """Finish queued ssd writes."""
        self._wb.shutdown(wait=True)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until the ssd writes queued so far are done."""
        self._wb.submit(lambda: None).result(timeout=timeout)

    def tier_bytes(self) -> dict[str, int]:
        out = {}
        if self.memory is not None:
            out["memory"] = self.memory.used
        if self.ssd is not None:
            out["ssd"] = self.ssd.used
        return out

    # -- reads -------------------------------------------------------------------------------

    def get(self, key: str) -> tuple[bytes, str]:
        """The verified bytes of object ``key`` and where they came from
        (``memory``, ``ssd``, ``host`` or ``blob``).

        Raises:
            KeyError: the blob store has no such object.
            CorruptChunk: the blob store returned bytes that fail verification (not cached).
            StoreError: the blob store failed.
            ValueError: ``key`` is not an immutable object name.
        """
        ref = _slot(key)
        if self.memory is not None:
            data = self.memory.get(ref)
            if data is not None:
                self.metrics.inc("casfs_cache_hits_total", tier="memory")
                return data, "memory"
        with self._lock:
            fut = self._inflight.get(key)
            owner = fut is None
            if owner:
                fut = self._inflight[key] = Future()
        if not owner:
            self.metrics.inc("casfs_cache_fill_waiters_total")
            return fut.result()
        try:
            result = self._load(key, ref)
        except BaseException as e:
            fut.set_exception(e)
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def get_cached(self, key: str) -> tuple[bytes, str] | None:
        """Like ``get`` but None when no local tier holds ``key`` (for ``Cache-Control:
        only-if-cached``); only an ssd copy that fails verification is refetched."""
        ref = _slot(key)
        if self.memory is not None:
            data = self.memory.get(ref)
            if data is not None:
                self.metrics.inc("casfs_cache_hits_total", tier="memory")
                return data, "memory"
        if (self.ssd is not None and self.ssd.contains(ref)) or self._host_has(key):
            try:
                return self.get(key)  # a local tier has it: the normal path, single flight
            except KeyError:
                return None
        return None

    def _host_path(self, key: str) -> str | None:
        """Where the host's ssd cache would hold loose chunk ``key`` (None: not applicable)."""
        if not self.host_chunks:
            return None
        kind, name = split_key(key)
        return os.path.join(self.host_chunks, fanout_name(name)) if kind == CHUNKS else None

    def _host_has(self, key: str) -> bool:
        path = self._host_path(key)
        return path is not None and os.path.exists(path)

    def size(self, key: str) -> int | None:
        """The size of object ``key`` without filling anything (None when the blob lacks it).

        Raises:
            StoreError: the blob store failed.
        """
        ref = _slot(key)
        if self.memory is not None:
            data = self.memory.get(ref)
            if data is not None:
                return len(data)
        for path in self._local_paths(key, ref):
            try:
                return os.stat(path).st_size
            except OSError:
                continue
        try:
            return self.objects.size(key)
        except KeyError:
            return None

    # -- internals ---------------------------------------------------------------------------

    def _local_paths(self, key: str, ref: ChunkRef) -> list[str]:
        paths = []
        if self.ssd is not None and self.ssd.contains(ref):
            paths.append(self.ssd.path_of(ref.digest))
        host = self._host_path(key)
        if host is not None:
            paths.append(host)
        return paths

    def _load(self, key: str, ref: ChunkRef) -> tuple[bytes, str]:
        if self.ssd is not None:
            data = self.ssd.get(ref)
            if data is not None:
                if self._check(key, data, "ssd"):
                    self._remember(ref, data)
                    self.metrics.inc("casfs_cache_hits_total", tier="ssd")
                    return data, "ssd"
                self.ssd.delete(ref)
        host = self._host_path(key)
        if host is not None:
            try:
                with open(host, "rb") as f:
                    data = f.read()
            except OSError:
                data = None
            if data is not None and self._check(key, data, "host"):
                self._remember(ref, data)
                self.metrics.inc("casfs_cache_hits_total", tier="host")
                return data, "host"
        self.metrics.inc("casfs_cache_misses_total")
        t0 = time.perf_counter()
        try:
            data = self.objects.get(key)
        except Exception:
            self.metrics.inc("casfs_cache_fill_errors_total")
            raise
        self.metrics.inc("casfs_cache_blob_bytes_total", len(data))
        try:
            verify_object(key, data)
        except CorruptChunk:
            self.metrics.inc("casfs_cache_verify_failures_total", source="blob")
            self.metrics.inc("casfs_cache_fill_errors_total")
            raise
        self.metrics.observe("casfs_cache_fill_seconds", time.perf_counter() - t0)
        self._remember(ref, data)
        self._queue_ssd(ref, data)
        return data, "blob"

    def _check(self, key: str, data: bytes, source: str) -> bool:
        try:
            verify_object(key, data)
            return True
        except CorruptChunk as e:
            self.metrics.inc("casfs_cache_verify_failures_total", source=source)
            log.error("cached %s in %s is corrupt, dropping it: %s", key, source, e)
            return False

    def _remember(self, ref: ChunkRef, data: bytes) -> None:
        if self.memory is not None:
            self.memory.put(ref, data)

    def _queue_ssd(self, ref: ChunkRef, data: bytes) -> None:
        if self.ssd is None:
            return
        with self._lock:
            if self._wb_pending + len(data) > self._wb_limit:
                return  # readers first: skip this write
            self._wb_pending += len(data)

        def write() -> None:
            try:
                self.ssd.put(ref, data)  # type: ignore[union-attr] - checked above
            finally:
                with self._lock:
                    self._wb_pending -= len(data)

        try:
            self._wb.submit(write)
        except RuntimeError:  # closed
            with self._lock:
                self._wb_pending -= len(data)
