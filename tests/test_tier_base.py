"""The tier base class: one required method (get), declared defaults for every optional
capability; the decoded-memory cache in front of the tiers (peek); one pass of the tier walk."""

from __future__ import annotations

import os
import threading

import pytest

import casfs
from casfs import chunk as chunkmod
from casfs.errors import ChunkUnavailable, StoreError
from casfs.index import ChunkRef
from casfs.store import Store
from casfs.tiered import TieredStore
from casfs.tiers.base import Tier
from casfs.objects.local import LocalObjectStore
from casfs.tiers.memory import MemoryCache

from conftest import write_tree


class DictTier(Tier):
    """A real, complete read-only frame tier over a dict: it writes only ``get``; everything
    else comes from the base class."""

    def __init__(self, name: str = "dict") -> None:
        super().__init__(name)
        self.frames: dict[bytes, bytes] = {}
        self.lock = threading.Lock()

    def get(self, ref: ChunkRef) -> bytes | None:
        with self.lock:
            frame = self.frames.get(ref.digest)
        self._stats.record_get(frame is not None, len(frame or b""), 0.0)
        return frame


class WritableDictTier(DictTier):
    """``DictTier`` as a cache: ``writable`` with ``put`` and ``delete``."""

    writable = True

    def put(self, ref: ChunkRef, frame: bytes) -> None:
        with self.lock:
            self.frames[ref.digest] = frame

    def delete(self, ref: ChunkRef) -> None:
        with self.lock:
            self.frames.pop(ref.digest, None)


def _chunk(data: bytes) -> tuple[ChunkRef, bytes]:
    digest, frame = chunkmod.encode(data)
    return ChunkRef(digest, len(data), len(frame)), frame


def test_a_tier_that_writes_only_get_gets_every_optional_capability_by_default():
    tier = DictTier()
    ref, frame = _chunk(b"abc" * 1000)
    assert tier.contains(ref) is False
    assert tier.read_into(ref, memoryview(bytearray(3000))) is None
    tier.frames[ref.digest] = frame
    assert tier.contains(ref) is True
    buf = bytearray(3000)
    assert tier.read_into(ref, memoryview(buf)) == 3000 and bytes(buf) == b"abc" * 1000
    assert not tier.supports_read_into and not tier.supports_spans and not tier.writable
    with pytest.raises(PermissionError, match="read-only"):
        tier.put(ref, frame)
    with pytest.raises(PermissionError, match="read-only"):
        tier.delete(ref)
    with pytest.raises(NotImplementedError, match="spans"):
        tier.get_span(b"\0" * 32, 0, 10)
    tier.rejected(ref)  # read-only: keeps it
    assert tier.contains(ref)
    tier.close()
    assert tier.stats().name == "dict"


def test_a_tier_without_get_is_an_error_naming_the_class():
    class Empty(Tier):
        pass

    with pytest.raises(NotImplementedError, match="Empty must implement get"):
        Empty("e").get(_chunk(b"x")[0])


def test_the_store_serves_get_and_get_into_through_a_get_only_tier_and_evicts_its_bad_copies():
    good = DictTier("good")
    cache = WritableDictTier("cache")
    store = TieredStore([cache, good], memory=MemoryCache(1 << 20))
    try:
        ref, frame = _chunk(os.urandom(5000))
        good.frames[ref.digest] = frame
        data = store.get(ref)
        store.flush()
        assert cache.frames[ref.digest] == frame  # filled in the background
        buf = bytearray(ref.raw_len)
        store.memory.clear()
        assert store.get_into(ref, buf) == ref.raw_len and bytes(buf) == data
        bad = bytearray(frame)
        bad[-1] ^= 1
        cache.frames[ref.digest] = bytes(bad)
        store.memory.clear()
        assert store.get(ref) == data
        assert store.verify_failures == 1
        store.flush()
        assert cache.frames[ref.digest] == frame  # the bad copy was deleted, then refilled
    finally:
        store.close()


def test_peek_answers_from_memory_only_and_counts_only_hits(tmp_path):
    write_tree(tmp_path / "src", {"f": os.urandom(100_000)})
    with casfs.open_store(str(tmp_path / "store"), memory_bytes=1 << 20) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", chunk_size=65536, progress=False)
        image = s.open_image("t")
        ref = image.chunk_refs(image.lookup("f"))[0]
        s.memory.clear()
        before = s.memory.stats().as_dict()
        assert s.chunks.peek(ref) is None and not s.chunks.in_memory(ref)
        assert s.memory.stats().misses == before["misses"]  # a peek miss is not a miss
        data = s.chunks.get(ref)
        assert s.chunks.peek(ref) == data and s.chunks.in_memory(ref)
        assert s.memory.stats().hits == before["hits"] + 1
    with casfs.open_store(str(tmp_path / "store"), memory_bytes=0) as s:
        assert s.chunks.memory is None and s.chunks.peek(ref) is None and not s.chunks.in_memory(ref)


class _FailingObjects(LocalObjectStore):
    """A real local store whose chunk and pack reads fail the way a dead backend's do after
    its own retries (StoreError), counting the calls the tier walk makes."""

    def __init__(self, root: str) -> None:
        super().__init__(root, create=False)
        self.calls = 0

    def get(self, key: str) -> bytes:
        if key.startswith(("chunks/", "packs/")):
            self.calls += 1
            raise StoreError("backend down (after its own retries)")
        return super().get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.calls += 1
        raise StoreError("backend down (after its own retries)")


def test_the_tier_walk_asks_a_failing_blob_store_once_per_read(tmp_path):
    """Retries belong to the object store (it knows what is transient); the walk used to retry
    the whole walk twice more on top (3 calls here, 15 requests behind an HTTP store)."""
    write_tree(tmp_path / "src", {"big": os.urandom(200_000)})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", chunk_size=1 << 20, progress=False)
    objects = _FailingObjects(str(tmp_path / "store"))
    with Store(objects, memory_bytes=0) as store:
        image = store.open_image("t")
        with pytest.raises(ChunkUnavailable, match="blob: error backend down"):
            image.read("big", 0, 10)
        assert objects.calls == 1
