"""Store: a blob store plus the cache tiers above it, the images it holds, and their tags."""

from __future__ import annotations

import os
import re
import threading
from typing import TYPE_CHECKING, Iterator

from . import chunk as chunkmod
from .digest import from_hex
from .errors import CasfsError, CorruptChunk, CorruptIndex, ImageNotFound, StoreError
from .fsutil import atomic_write, remove_stale_temps
from .index import ChunkRef, Index
from .layout import (DATA_KINDS, INDEXES, TAGS, cache_chunks_dir, check_key, index_key, kind_prefix, name_of,
                     object_key, tag_key)
from .tiered import TieredStore
from .tiers.base import Tier
from .tiers.blob import BlobTier, ObjectStore
from .tiers.memory import MemoryCache
from .tiers.pinned import PinnedTier
from .tiers.ssd import SsdTier

if TYPE_CHECKING:
    from .image import Image

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


def check_tag(name: str) -> str:
    """Validate a tag name: letters, digits and ``._:@+-``, at most 128, no '/'.

    Raises:
        ValueError: with the rule, when ``name`` breaks it.
    """
    if not _TAG.match(name) or _HEX.match(name):
        raise ValueError(f"invalid tag {name!r}: use 1-128 of letters, digits and ._:@+- "
                         "(starting with a letter or digit, and not 64 hex digits)")
    return name


class Store:
    """Images, tags and chunks of one blob store, read through a memory cache and ssd
    (/azcache) tiers.

    Args:
        objects: the blob store backend.
        cache_dir: directory for the ssd tier (None: no ssd tier).
        cache_bytes: ssd tier capacity.
        memory_bytes: memory cache capacity (0: no memory cache).
        extra_tiers: tiers placed between ssd and blob (the AZ cache).
        io_threads: concurrent chunk fetches.
        pinned: a ``PinnedTier`` placed first (chunks in pinned host memory for GPU loads;
            filled by the weights loader and the warm pool, not by every read).
    """

    def __init__(self, objects: ObjectStore, *, cache_dir: str | None = None,
                 cache_bytes: int = 50 << 30, memory_bytes: int = 512 << 20,
                 extra_tiers: list[Tier] | None = None, io_threads: int = 16,
                 pinned: "PinnedTier | None" = None) -> None:
        self.objects = objects
        self.url = objects.url
        self.cache_dir = cache_dir
        tiers: list[Tier] = []
        self.pinned = pinned
        if pinned is not None:
            tiers.append(pinned)
        self.memory = MemoryCache(memory_bytes) if memory_bytes > 0 else None
        # raw: a warm start decompresses nothing (casfs.tiers.ssd)
        self.ssd = SsdTier(cache_chunks_dir(cache_dir), cache_bytes, raw=True) if cache_dir else None
        if self.ssd:
            tiers.append(self.ssd)
        tiers.extend(extra_tiers or [])
        self.blob = BlobTier(objects)
        tiers.append(self.blob)
        self.chunks = TieredStore(tiers, memory=self.memory, io_threads=io_threads)
        self._indexes: dict[str, Index] = {}
        self._lock = threading.Lock()
        if cache_dir:  # index-cache writes a killed process left behind
            remove_stale_temps(os.path.join(cache_dir, INDEXES))

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.chunks.close()

    # -- tags ---------------------------------------------------------------------------------

    def tags(self) -> dict[str, str]:
        """tag -> image id (hex) for every readable tag in the store (``unreadable_tags``
        lists the others)."""
        return self._scan_tags()[0]

    def unreadable_tags(self) -> list[tuple[str, str]]:
        """(name, why) of every tag ``tags`` leaves out: a name that is not a valid tag (not
        UTF-8, say; shown with backslash escapes) or a tag file that is not text."""
        return self._scan_tags()[1]

    def _scan_tags(self) -> tuple[dict[str, str], list[tuple[str, str]]]:
        good: dict[str, str] = {}
        bad: list[tuple[str, str]] = []
        for key in self.objects.list(kind_prefix(TAGS)):
            raw_name = key.partition("/")[2]
            shown = raw_name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            try:
                name = name_of(check_key(key))
            except ValueError:
                bad.append((shown, "not a valid tag name (not UTF-8, or characters a tag cannot "
                                   f"have): remove it from {self.url}/tags"))
                continue
            try:
                raw = self.objects.get(key)
            except KeyError:  # removed meanwhile
                continue
            try:
                image_id = raw.decode().strip()
            except UnicodeDecodeError:
                image_id = ""
            if _HEX.match(image_id):
                good[name] = image_id
            else:
                bad.append((shown, "its tag file is not an image id (corrupt): "
                                   f"set it again with casfs tag IMAGE {name}, or casfs rm {name}"))
        return good, bad

    def tag(self, name: str, image_id: str) -> None:
        """Point tag ``name`` at ``image_id`` (which must exist)."""
        check_tag(name)
        if not self.objects.contains(index_key(image_id)):
            raise ImageNotFound(f"no image {image_id} in {self.url}")
        self.objects.put(tag_key(name), (image_id + "\n").encode())

    def untag(self, name: str) -> None:
        check_tag(name)
        if not self.objects.contains(tag_key(name)):
            raise ImageNotFound(f"no tag {name!r} in {self.url}")
        self.objects.delete(tag_key(name))

    def resolve(self, name: str) -> str:
        """Image id (hex) of a tag or an image id (full, or a unique prefix of >= 8 hex digits).

        Raises:
            ImageNotFound: naming the tags available.
        """
        if _HEX.match(name) and self.objects.contains(index_key(name)):
            return name
        if _TAG.match(name):
            try:
                image_id = self.objects.get(tag_key(name)).decode().strip()
                from_hex(image_id)
                return image_id
            except KeyError:
                pass
            except (UnicodeDecodeError, ValueError):
                raise StoreError(f"tag {name!r} in {self.url} is corrupt") from None
        if re.match(r"^[0-9a-f]{8,63}$", name):
            hits = [name_of(k) for k in self.objects.list(kind_prefix(INDEXES))
                    if name_of(k).startswith(name)]
            if len(hits) == 1:
                return hits[0]
        known = ", ".join(sorted(self.tags())[:10]) or "none"
        raise ImageNotFound(f"no image or tag {name!r} in {self.url} (tags: {known})")

    def image_ids(self) -> list[str]:
        return [name_of(k) for k in self.objects.list(kind_prefix(INDEXES))]

    # -- indexes and images -------------------------------------------------------------------

    def put_index(self, data: bytes) -> str:
        """Store serialized index bytes; returns the image id (hex)."""
        digest, frame = chunkmod.encode(data)
        image_id = digest.hex()
        if not self.objects.contains(index_key(image_id)):
            self.objects.put(index_key(image_id), frame)
        return image_id

    def _cached_index(self, image_id: str) -> str | None:
        """The local copy of an index under the cache dir (None without a cache dir)."""
        return os.path.join(self.cache_dir, INDEXES, image_id) if self.cache_dir else None

    def index_frame(self, image_id: str) -> bytes:
        """The stored frame of an index (through the local cache dir for remote stores)."""
        cached = self._cached_index(image_id)
        if cached:
            try:
                with open(cached, "rb") as f:
                    return f.read()
            except OSError:
                pass
        try:
            frame = self.objects.get(index_key(image_id))
        except KeyError:
            raise ImageNotFound(f"image {image_id} has no index in {self.url}") from None
        if cached:
            try:
                atomic_write(cached, frame, makedirs=True)  # not fsynced: a torn copy fails its digest
            except OSError:
                pass
        return frame

    def load_index(self, image_id: str) -> Index:
        """Fetch, verify and parse an image index (cached per Store).

        Raises:
            ImageNotFound, CorruptIndex.
        """
        with self._lock:
            ix = self._indexes.get(image_id)
        if ix is not None:
            return ix
        # a bad local copy (torn by a crash: the cache is not fsynced) is dropped and the
        # store's copy fetched once more; only a bad store copy is an error
        for attempt in range(2 if self.cache_dir else 1):
            frame = self.index_frame(image_id)
            try:
                data = chunkmod.decode(frame, expect=from_hex(image_id))
                break
            except CorruptChunk as e:
                if self.cache_dir:
                    try:
                        os.unlink(self._cached_index(image_id))  # type: ignore[arg-type]
                    except OSError:
                        pass
                if attempt or not self.cache_dir:
                    raise CorruptIndex(f"index of image {image_id[:12]} is corrupt: {e}") from None
        ix = Index.parse(data)
        with self._lock:
            self._indexes[image_id] = ix
        return ix

    def open_image(self, name: str) -> "Image":
        """Open an image by tag or id. Only the index is fetched."""
        from .image import Image

        image_id = self.resolve(name)
        return Image(self, image_id, self.load_index(image_id), name=name)

    def known_chunks(self, limit_images: int = 64, *, image_ids: list[str] | None = None) -> dict[bytes, ChunkRef]:
        """digest -> location for every chunk of the (up to ``limit_images``) tagged images, or
        of ``image_ids`` when given (the images a build's lease pinned: ``casfs.leases``).

        Builders use it to reference existing chunks instead of storing them again. An image
        whose index is gone or unreadable is skipped.
        """
        known: dict[bytes, ChunkRef] = {}
        ids = image_ids if image_ids is not None else list(dict.fromkeys(self.tags().values()))
        for image_id in ids[:limit_images]:
            try:
                ix = self.load_index(image_id)
            except CasfsError:
                continue
            for ref in ix.all_chunks():
                known.setdefault(ref.digest, ref)
        return known

    def referenced_objects(self) -> set[str]:
        """Object keys reachable from every tag (for gc).

        Raises:
            ImageNotFound: a tag names an image whose index is missing (naming the tag).
            CorruptIndex: a tagged image's index is unreadable.
        """
        keep: set[str] = set()
        tags = self.tags()
        for image_id in set(tags.values()):
            keep.add(index_key(image_id))
            try:
                ix = self.load_index(image_id)
            except ImageNotFound:
                names = ", ".join(sorted(t for t, i in tags.items() if i == image_id)[:5])
                raise ImageNotFound(f"tag {names} names image {image_id[:12]}, whose index is missing from "
                                    f"{self.url}: copy the image back, or remove the tag (casfs rm "
                                    f"{names.split(', ')[0]})") from None
            for ref in ix.all_chunks():
                keep.add(object_key(ref))
        return keep

    def iter_objects(self) -> Iterator[str]:
        for kind in DATA_KINDS:
            yield from self.objects.list(kind_prefix(kind))
