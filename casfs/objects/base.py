"""The object-store protocol: a flat namespace of named byte strings (key -> bytes).

Keys are ``kind/name`` (``casfs.layout``); each store maps a key to its own paths or S3 keys
through ``casfs.layout.relpath``. Implementations: ``casfs.objects.local`` (a directory, the
embedded default), ``casfs.objects.s3`` (boto3), ``casfs.objects.http`` (read-only, any static
web server or CDN). Object stores are not tiers: they know nothing of chunks, frames or
verification (``casfs.tiers.blob.BlobTier`` adapts one to the tier walk).

Retries belong here, in the stores that talk to a network: they know which failures are
transient (``casfs.httpclient``). The contract every store keeps is written once as a test
suite (``tests/test_object_stores.py``) and run against each of them.
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

from ..chunk import MAX_FRAME_LEN
from ..layout import LEASES, TAGS

SMALL_OBJECT_MAX = 64 << 10  # a tag (an image id) or a lease (a few lines of JSON)


def max_object_len(key: str) -> int:
    """The most bytes object ``key`` can hold, by its kind: a reader of a network store (HTTP,
    S3, a cache server's fill) refuses a longer answer instead of buffering it. Chunks, packs,
    indexes and profiles are chunk frames or frames back to back (packs close at 4 MiB), so the
    longest frame ``casfs.chunk`` accepts bounds them; tags and leases are a few lines.
    """
    kind = key.partition("/")[0]
    return SMALL_OBJECT_MAX if kind in (TAGS, LEASES) else MAX_FRAME_LEN


@runtime_checkable
class ObjectStore(Protocol):
    """A flat namespace of immutable objects. Thread-safe.

    ``get``/``get_range``/``size`` raise KeyError for a missing object; ``get_range`` returns
    fewer bytes at the end of an object and b"" past it (like ``pread``); ``delete`` of a
    missing object is not an error; ``list(prefix)`` yields the keys of one kind
    (``"tags/"``). Every failure of the backend is a ``casfs.errors.StoreError``; an invalid
    key is a ValueError. ``read_only`` stores raise StoreError from ``put`` and ``delete``.

    Optional: ``local_path(key) -> str``, offered by stores whose objects are local files
    (``LocalObjectStore``); ``casfs.tiers.blob.BlobTier`` then reads frames straight from them
    into callers' buffers. It is the one optional method, and the only one a caller asks for.
    """

    url: str
    read_only: bool

    def get(self, key: str) -> bytes: ...
    def get_range(self, key: str, offset: int, length: int) -> bytes: ...
    def put(self, key: str, data: bytes) -> None: ...
    def contains(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def size(self, key: str) -> int: ...
