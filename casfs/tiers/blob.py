"""The blob tier: the durable bottom tier, chunk frames read from an object store.

``BlobTier`` adapts an object store (``casfs.objects``: local directory, S3, HTTP; key ->
bytes, keys from ``casfs.layout``) to the chunk ``Tier`` interface: a loose chunk is its own
object, a packed one a byte range of its pack. A backend whose objects are local files offers
``local_path(key) -> str``; ``BlobTier.read_into`` then reads frames (loose or inside a pack)
straight from those files into a caller's buffer.
"""

from __future__ import annotations

import os
import time

from .. import chunk as chunkmod
from ..index import ChunkRef
from ..layout import chunk_key, pack_key
from ..objects.base import ObjectStore
from .base import Tier


class BlobTier(Tier):
    """Reads chunk frames from an ``ObjectStore``: loose chunks whole, packed ones by range.

    Read-only for the store (chunks enter the blob store through builds and copies and leave
    it through gc). Reads pack spans; reads into buffers from local-file backends.
    """

    supports_spans = True
    supports_ranges = True

    def __init__(self, objects: ObjectStore, name: str = "blob") -> None:
        super().__init__(name)
        self.objects = objects

    def get(self, ref: ChunkRef) -> bytes | None:
        t0 = time.perf_counter()
        try:
            if ref.pack is None:
                data = self.objects.get(chunk_key(ref.digest))
            else:
                data = self.objects.get_range(pack_key(ref.pack), ref.pack_off, ref.stored_len)
        except KeyError:
            self._stats.record_get(False, 0, time.perf_counter() - t0)
            return None
        self._stats.record_get(True, len(data), time.perf_counter() - t0)
        return data

    @property
    def supports_read_into(self) -> bool:
        """True when the backend's objects are local files (``read_into`` works)."""
        return callable(getattr(self.objects, "local_path", None))

    def read_into(self, ref: ChunkRef, buf: memoryview, *, hash_threads: int = 0) -> int | None:
        """Read ``ref``'s frame from a local-file backend into ``buf`` and verify it there.

        Returns the chunk's length, or None on a miss. Other backends: the base class's
        ``get`` + decode.

        Raises:
            CorruptChunk: the stored frame is bad (``buf`` then holds unspecified bytes).
            OSError: the object's file could not be read.
        """
        if not self.supports_read_into:
            return super().read_into(ref, buf, hash_threads=hash_threads)
        t0 = time.perf_counter()
        if ref.pack is None:
            path, offset, frame_len = self.objects.local_path(chunk_key(ref.digest)), 0, None  # type: ignore[attr-defined]
        else:
            path, offset, frame_len = (self.objects.local_path(pack_key(ref.pack)),  # type: ignore[attr-defined]
                                       ref.pack_off, ref.stored_len)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._stats.record_get(False, 0, time.perf_counter() - t0)
            return None
        try:
            h = chunkmod.read_frame_into(fd, offset, buf, ref.digest, frame_len=frame_len,
                                         hash_threads=hash_threads)
        finally:
            os.close(fd)
        self._stats.record_get(True, h.frame_len, time.perf_counter() - t0)
        return h.raw_len

    def get_range(self, ref: ChunkRef, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` of ``ref``'s frame: a ranged read of its loose object
        or of its pack (never past the frame's end inside a pack)."""
        t0 = time.perf_counter()
        try:
            if ref.pack is None:
                data = self.objects.get_range(chunk_key(ref.digest), offset, length)
            else:
                length = max(0, min(length, ref.stored_len - offset))
                data = self.objects.get_range(pack_key(ref.pack), ref.pack_off + offset, length)
        except KeyError:
            self._stats.record_get(False, 0, time.perf_counter() - t0)
            return None
        self._stats.record_get(True, len(data), time.perf_counter() - t0)
        return data

    def get_span(self, pack: bytes, offset: int, length: int) -> bytes | None:
        """A contiguous byte range of a pack (many frames in one request)."""
        t0 = time.perf_counter()
        try:
            data = self.objects.get_range(pack_key(pack), offset, length)
        except KeyError:
            self._stats.record_get(False, 0, time.perf_counter() - t0)
            return None
        self._stats.record_get(True, len(data), time.perf_counter() - t0)
        return data

    def put(self, ref: ChunkRef, data: bytes) -> None:
        raise PermissionError("the store never writes chunks into the blob tier on a read")

    def contains(self, ref: ChunkRef) -> bool:
        if ref.pack is None:
            return self.objects.contains(chunk_key(ref.digest))
        return self.objects.contains(pack_key(ref.pack))

    def delete(self, ref: ChunkRef) -> None:
        raise PermissionError("chunks leave the blob store only through gc")
