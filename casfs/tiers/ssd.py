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

With ``raw`` (a host's ssd tier: ``casfs.Store``) zstd frames are kept decompressed
(``casfs.chunk.as_raw``, on the background writer): a warm start then reads and hashes what it
needs but decompresses nothing (zstd costs ~0.6 GiB/s a core, blake3 ~2 GiB/s), for up to ~3x
the disk space of shared libraries. A cache server's ssd keeps frames as fetched (it serves
them over the network).

Verified sub-chunk reads (``casfs.chunk.FrameMeta``): ``get_range`` preads a range of a whole
frame's file; when only blocks of a chunk were ever fetched (a cold start reads a few 64 KiB
blocks of a 4 MiB chunk) the tier keeps those *parts* instead: ``<hex>.m`` (the frame's
header, block ends and outboard) and ``<hex>.<i>`` (block i's stored bytes), each verified
against the chunk's name on every read like a whole frame, and counted in the same LRU. A
whole frame put later replaces its parts.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import OrderedDict

from .. import chunk as chunkmod
from ..errors import CorruptChunk
from ..fsutil import atomic_write, remove_stale_temps
from ..index import ChunkRef
from ..layout import fanout_name
from .base import Tier


class SsdTier(Tier):
    """Chunk frames as files under ``root``, at most ``capacity`` bytes."""

    writable = True
    supports_read_into = True
    supports_ranges = True
    supports_parts = True

    def __init__(self, root: str, capacity: int = 50 << 30, *, fsync: bool = False, name: str = "ssd",
                 raw: bool = False) -> None:
        if capacity <= 0:
            raise ValueError("ssd tier capacity must be > 0 bytes")
        super().__init__(name)
        self.root = os.path.abspath(root)
        self.capacity = capacity
        self.fsync = fsync
        self.raw = raw
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # file name (hex, or hex.part) -> bytes
        self._parts: dict[str, set[str]] = {}  # hex -> its part suffixes held
        self._used = 0
        self._full_until = 0.0
        os.makedirs(os.path.join(self.root, "tmp"), exist_ok=True)
        self._scan()

    def path_of(self, digest: bytes) -> str:
        """The file that holds (or would hold) the frame of ``digest``."""
        return os.path.join(self.root, fanout_name(digest.hex()))

    def _path(self, name: str) -> str:
        return os.path.join(self.root, fanout_name(name))

    def _add(self, name: str, n: int) -> None:
        """Count file ``name`` of ``n`` bytes (under the lock)."""
        old = self._lru.pop(name, None)
        if old is not None:
            self._used -= old
        self._lru[name] = n
        self._used += n
        hexname, dot, part = name.partition(".")
        if dot:
            self._parts.setdefault(hexname, set()).add(part)

    def _drop(self, name: str) -> bool:
        """Uncount file ``name`` (under the lock); True when it was counted."""
        n = self._lru.pop(name, None)
        if n is None:
            return False
        self._used -= n
        hexname, dot, part = name.partition(".")
        if dot:
            held = self._parts.get(hexname)
            if held is not None:
                held.discard(part)
                if not held:
                    del self._parts[hexname]
        return True

    def _scan(self) -> None:
        """Rebuild the LRU from the directory (oldest mtime first); drop temp files that killed
        writers left (``remove_stale_temps``)."""
        found: list[tuple[float, str, int]] = []
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            if sub.name == "tmp":  # (not a live writer's: another process may share this cache)
                remove_stale_temps(sub.path)
                continue
            for f in os.scandir(sub.path):
                try:
                    hexname, _, part = f.name.partition(".")
                    if len(hexname) != 64 or (part and part != "m" and not part.isdigit()):
                        continue
                    bytes.fromhex(hexname)
                    st = f.stat()
                    found.append((st.st_mtime, f.name, st.st_size))
                except (OSError, ValueError):
                    continue
        found.sort()
        for _, name, n in found:
            self._add(name, n)

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

    def _touch(self, digest: bytes | str, path: str, persist: bool = True) -> None:
        """A hit: most recently used now, in memory and (mtime, unless ``persist`` is False)
        across restarts. Block reads pass False: a small read must not cost a metadata write
        (they were ~10% of a 4 KiB read's time); the in-memory order still moves."""
        name = digest if isinstance(digest, str) else digest.hex()
        with self._lock:
            if name in self._lru:
                self._lru.move_to_end(name)
        if persist:
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
        with self._lock:
            if ref.digest.hex() in self._lru:
                return
        if self.raw:
            try:
                data = chunkmod.as_raw(data, ref.digest)
            except CorruptChunk:
                self._stats.record_error()
                return
        if self._write(ref.digest.hex(), data):
            # the whole frame makes its parts redundant
            with self._lock:
                parts = [f"{ref.digest.hex()}.{p}" for p in self._parts.get(ref.digest.hex(), ())]
            for name in parts:
                self._remove(name)

    def _write(self, name: str, data: bytes) -> bool:
        """Write file ``name`` and count it; evicts the least recently used files past the
        capacity. False when it was skipped (already held, full disk, too large)."""
        if len(data) > self.capacity or time.monotonic() < self._full_until:
            return False
        with self._lock:
            if name in self._lru:
                return False
        try:
            atomic_write(self._path(name), data, fsync=self.fsync, tmp_dir=os.path.join(self.root, "tmp"),
                         makedirs=True, mode=0o644)
        except OSError as e:
            self._stats.record_error()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self._full_until = time.monotonic() + 5.0  # back off: reads still work
            return False
        evict: list[str] = []
        with self._lock:
            # a concurrent put of the same name may have landed first: count its bytes once
            self._add(name, len(data))
            while self._used > self.capacity and self._lru:
                victim = next(iter(self._lru))
                self._drop(victim)
                evict.append(victim)
        for victim in evict:
            try:
                os.unlink(self._path(victim))
            except OSError:
                pass
        self._stats.record_put(len(data))
        return True

    def _remove(self, name: str) -> None:
        with self._lock:
            self._drop(name)
        try:
            os.unlink(self._path(name))
        except OSError:
            pass

    # -- ranges and parts (verified sub-chunk reads) -----------------------------------------

    def get_range(self, ref: ChunkRef, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of the whole frame of ``ref``; None when this tier
        holds no whole frame of it."""
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
            data = os.pread(fd, length, offset)
        except OSError:
            self._stats.record_error()
            return None
        finally:
            os.close(fd)
        self._touch(ref.digest, p, persist=False)
        self._stats.record_get(True, len(data), time.perf_counter() - t0)
        return data

    def get_part(self, ref: ChunkRef, part: str) -> bytes | None:
        """Part ``part`` ("m" or a block number) of ``ref``'s frame, or None."""
        name = f"{ref.digest.hex()}.{part}"
        with self._lock:
            if name not in self._lru:
                return None
        t0 = time.perf_counter()
        p = self._path(name)
        try:
            with open(p, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            with self._lock:
                self._drop(name)
            self._stats.record_get(False, 0, time.perf_counter() - t0)
            return None
        except OSError:
            self._stats.record_error()
            return None
        self._touch(name, p, persist=False)
        self._stats.record_get(True, len(data), time.perf_counter() - t0)
        return data

    def put_part(self, ref: ChunkRef, part: str, data: bytes) -> None:
        """Keep part ``part`` of ``ref``'s frame (skipped when the whole frame is here)."""
        if not (part == "m" or part.isdigit()):
            raise ValueError(f"a frame part is 'm' or a block number, not {part!r}")
        with self._lock:
            if ref.digest.hex() in self._lru:
                return
        self._write(f"{ref.digest.hex()}.{part}", data)

    def holds(self, ref: ChunkRef, blocks: range) -> bool:
        """Whether the whole frame of ``ref``, or every one of ``blocks`` as a part, is here
        (the in-memory LRU: no I/O)."""
        name = ref.digest.hex()
        with self._lock:
            if name in self._lru:
                return True
            held = self._parts.get(name)
            return held is not None and all(str(i) in held for i in blocks)

    def drop_part(self, ref: ChunkRef, part: str) -> None:
        self._remove(f"{ref.digest.hex()}.{part}")

    def contains(self, ref: ChunkRef) -> bool:
        """Whether the whole frame of ``ref`` is here (parts do not count)."""
        with self._lock:
            return ref.digest.hex() in self._lru

    def _forget(self, digest: bytes, missing: str | None = None) -> None:
        """Drop the LRU entry of ``digest``; with ``missing``, only if that file is still
        absent (a put renames before it adds its entry under the lock). A ghost entry for a
        vanished file would turn every later put of it into a no-op."""
        with self._lock:
            if missing is not None and os.path.exists(missing):
                return
            self._drop(digest.hex())

    def delete(self, ref: ChunkRef) -> None:
        """Drop the whole frame of ``ref`` and every part of it."""
        self._forget(ref.digest)
        try:
            os.unlink(self.path_of(ref.digest))
        except OSError:
            pass
        with self._lock:
            parts = [f"{ref.digest.hex()}.{p}" for p in self._parts.get(ref.digest.hex(), ())]
        for name in parts:
            self._remove(name)

    @property
    def used(self) -> int:
        return self._used
