"""ssd tier: a bounded, crash-safe local directory of chunk frames with LRU eviction.

Why not diskcache: for multi-MiB values diskcache already stores one file per value and adds a
SQLite row per entry (a write transaction per put); a frame already names and verifies itself,
so a file named by digest plus an in-memory LRU rebuilt by one directory scan at start does the
same job with one rename per put and no database to corrupt. Crash safety: a frame is written
to a temporary name, then renamed into place, so a reader never sees a half-written name; a
file torn by a power loss (renamed before its data reached the disk) or bit-rotted later fails
digest verification in the store, which then deletes it here and refetches from the next tier.
That check is what makes the cache safe, so ``fsync`` before the rename is off by default: it
only makes a *cache* durable, and it halved the fill rate here (4 MiB frames: 24 ms each with
fsync, 12 ms without, on the 2-core VM), which let fills fall behind a cold start's reads and
get skipped. Pass ``fsync=True`` to have it anyway.

``read_into`` serves ``TieredStore.get_into``: the frame's payload goes from the file straight
into the caller's buffer (``casfs.chunk.read_frame_into``) and is verified there.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import OrderedDict

from .. import chunk as chunkmod
from ..fsutil import atomic_write
from ..index import ChunkRef
from ..layout import fanout_name
from .base import Tier


class SsdTier(Tier):
    """Chunk frames as files under ``root``, at most ``capacity`` bytes."""

    writable = True
    supports_read_into = True

    def __init__(self, root: str, capacity: int = 50 << 30, *, fsync: bool = False, name: str = "ssd") -> None:
        if capacity <= 0:
            raise ValueError("ssd tier capacity must be > 0 bytes")
        super().__init__(name)
        self.root = os.path.abspath(root)
        self.capacity = capacity
        self.fsync = fsync
        self._lock = threading.Lock()
        self._lru: OrderedDict[bytes, int] = OrderedDict()
        self._used = 0
        self._full_until = 0.0
        os.makedirs(os.path.join(self.root, "tmp"), exist_ok=True)
        self._scan()

    def path_of(self, digest: bytes) -> str:
        """The file that holds (or would hold) the frame of ``digest``."""
        return os.path.join(self.root, fanout_name(digest.hex()))

    def _scan(self) -> None:
        """Rebuild the LRU from the directory (oldest mtime first); drop leftover temp files."""
        found: list[tuple[float, bytes, int]] = []
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            if sub.name == "tmp":
                for f in os.scandir(sub.path):
                    try:
                        os.unlink(f.path)
                    except OSError:
                        pass
                continue
            for f in os.scandir(sub.path):
                try:
                    st = f.stat()
                    found.append((st.st_mtime, bytes.fromhex(f.name), st.st_size))
                except (OSError, ValueError):
                    continue
        found.sort()
        for _, d, n in found:
            self._lru[d] = n
            self._used += n

    def get(self, ref: ChunkRef) -> bytes | None:
        t0 = time.perf_counter()
        p = self.path_of(ref.digest)
        try:
            with open(p, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self._forget(ref.digest, missing=p)
            self._stats.record_get(False, 0, time.perf_counter() - t0)
            return None
        except OSError:
            self._stats.record_error()
            return None
        self._touch(ref.digest, p)
        self._stats.record_get(True, len(data), time.perf_counter() - t0)
        return data

    def _touch(self, digest: bytes, path: str) -> None:
        """A hit: most recently used now, in memory and (mtime) across restarts."""
        with self._lock:
            if digest in self._lru:
                self._lru.move_to_end(digest)
        try:
            os.utime(path)
        except OSError:
            pass

    def read_into(self, ref: ChunkRef, buf: memoryview, *, hash_threads: int = 0) -> int | None:
        """Read ``ref``'s frame into ``buf`` and verify it there; None on a miss.

        Returns the chunk's length. Raises CorruptChunk for a bad file (the store then deletes
        it and goes on to the next tier); ``buf`` then holds unspecified bytes.
        """
        t0 = time.perf_counter()
        p = self.path_of(ref.digest)
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            self._forget(ref.digest, missing=p)
            self._stats.record_get(False, 0, time.perf_counter() - t0)
            return None
        except OSError:
            self._stats.record_error()
            return None
        try:
            h = chunkmod.read_frame_into(fd, 0, buf, ref.digest, hash_threads=hash_threads)
        except OSError:
            self._stats.record_error()
            return None
        finally:
            os.close(fd)
        self._touch(ref.digest, p)
        self._stats.record_get(True, h.frame_len, time.perf_counter() - t0)
        return h.raw_len

    def put(self, ref: ChunkRef, data: bytes) -> None:
        """Store a frame. A full disk or any write error skips the write (counted as an error)."""
        if len(data) > self.capacity or time.monotonic() < self._full_until:
            return
        with self._lock:
            if ref.digest in self._lru:
                return
        try:
            atomic_write(self.path_of(ref.digest), data, fsync=self.fsync, tmp_dir=os.path.join(self.root, "tmp"),
                         makedirs=True, mode=0o644)
        except OSError as e:
            self._stats.record_error()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._full_until = time.monotonic() + 5.0  # back off: reads still work
            return
        evict: list[bytes] = []
        with self._lock:
            # a concurrent put of the same digest may have landed first: count its bytes once
            old = self._lru.pop(ref.digest, None)
            if old is not None:
                self._used -= old
            self._lru[ref.digest] = len(data)
            self._used += len(data)
            while self._used > self.capacity and self._lru:
                d, n = self._lru.popitem(last=False)
                self._used -= n
                evict.append(d)
        for d in evict:
            try:
                os.unlink(self.path_of(d))
            except OSError:
                pass
        self._stats.record_put(len(data))

    def contains(self, ref: ChunkRef) -> bool:
        with self._lock:
            return ref.digest in self._lru

    def _forget(self, digest: bytes, missing: str | None = None) -> None:
        """Drop the LRU entry of ``digest``; with ``missing``, only if that file is still
        absent (a put renames before it adds its entry under the lock). A ghost entry for a
        vanished file would turn every later put of it into a no-op."""
        with self._lock:
            if missing is not None and os.path.exists(missing):
                return
            n = self._lru.pop(digest, None)
            if n is not None:
                self._used -= n

    def delete(self, ref: ChunkRef) -> None:
        self._forget(ref.digest)
        try:
            os.unlink(self.path_of(ref.digest))
        except OSError:
            pass

    @property
    def used(self) -> int:
        return self._used
