"""The blob store: the durable bottom tier, an object store of named byte strings.

Object names (keys)::

    chunks/<hex>    one chunk frame (large chunks)
    packs/<hex>     many small chunk frames back to back (read with ranged GETs)
    indexes/<hex>   an image index, as a chunk frame; <hex> is the image id
    tags/<name>     a text file holding an image id
    profiles/<hex>  a startup access profile

``ObjectStore`` is the backend protocol (local directory, S3, HTTP); ``BlobTier`` adapts one to
the chunk ``Tier`` protocol.
"""

from __future__ import annotations

import time
from typing import Iterator, Protocol, runtime_checkable

from ..index import ChunkRef
from .base import TierStats


@runtime_checkable
class ObjectStore(Protocol):
    """A flat namespace of immutable objects. Thread-safe. Missing objects raise KeyError."""

    url: str
    read_only: bool

    def get(self, key: str) -> bytes: ...
    def get_range(self, key: str, offset: int, length: int) -> bytes: ...
    def put(self, key: str, data: bytes) -> None: ...
    def contains(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def size(self, key: str) -> int: ...


def chunk_key(digest: bytes) -> str:
    return f"chunks/{digest.hex()}"


def pack_key(digest: bytes) -> str:
    return f"packs/{digest.hex()}"


class BlobTier:
    """Reads chunk frames from an ``ObjectStore``: loose chunks whole, packed ones by range."""

    decoded = False
    writable = False

    def __init__(self, objects: ObjectStore, name: str = "blob") -> None:
        self.name = name
        self.objects = objects
        self._stats = TierStats(name)

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

    def stats(self) -> TierStats:
        return self._stats
