"""TieredStore invariants: reads equal the source, fills, eviction, single flight, corruption."""

from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import casfs
from casfs.errors import ChunkUnavailable
from casfs.objects.local import LocalObjectStore

from conftest import write_tree

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(data=st.binary(min_size=0, max_size=70000), cs_log=st.integers(12, 15), ranges=st.data())
def test_any_range_read_from_the_store_equals_the_source_slice(tmp_path_factory, data, cs_log, ranges):
    d = tmp_path_factory.mktemp("t")
    write_tree(d / "src", {"f": data})
    with casfs.open_store(str(d / "store"), memory_bytes=1 << 20) as store:
        casfs.build(store, str(d / "src"), tag="t", chunk_size=1 << cs_log, progress=False)
        image = store.open_image("t")
        assert image.read("f") == data
        for _ in range(5):
            off = ranges.draw(st.integers(0, len(data) + 10))
            size = ranges.draw(st.integers(0, len(data) + 10))
            assert image.read("f", off, size) == data[off:off + size]


def test_eviction_from_memory_and_ssd_never_loses_data_the_blob_holds(tmp_path):
    files = {f"f{i}": os.urandom(5000 + 997 * i) for i in range(40)}
    write_tree(tmp_path / "src", files)
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", chunk_size=4096, progress=False)
    # tiny tiers: every read evicts something
    store = casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"),
                             memory_bytes=20000, cache_bytes=30000)
    image = store.open_image("t")
    for _ in range(3):
        for name, data in files.items():
            assert image.read(name) == data
            store.chunks.flush()
    assert store.ssd.used <= 30000 and store.memory.used <= 20000
    assert store.ssd.stats().puts > 0
    store.close()


def test_a_miss_fills_memory_at_once_and_ssd_in_the_background(tmp_path):
    write_tree(tmp_path / "src", {"big": os.urandom(3 << 20)})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", chunk_size=1 << 20, progress=False)
    store = casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    image = store.open_image("t")
    image.read("big")
    store.chunks.flush()
    refs = image.chunk_refs(image.lookup("big"))
    assert all(store.memory.contains(r) for r in refs)
    assert all(store.ssd.contains(r) for r in refs)
    store.memory.clear()
    image.read("big")
    assert store.ssd.stats().hits == 3
    store.close()


class _SlowCountingObjects(LocalObjectStore):
    """A real local object store that counts reads and slows them, to widen races."""

    def __init__(self, root):
        super().__init__(root)
        self.gets = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            self.gets += 1
        time.sleep(0.05)
        return super().get(key)

    def get_range(self, key, offset, length):
        with self.lock:
            self.gets += 1
        time.sleep(0.05)
        return super().get_range(key, offset, length)


@pytest.mark.parametrize("offset, size, requests", [(1000, 1 << 20, 1), (1000, 100, 1), (1 << 20, 100, 2)],
                         ids=["whole-chunk", "first-block", "one-block"])
def test_concurrent_readers_of_one_chunk_trigger_one_fetch(tmp_path, offset, size, requests):
    """A read of a quarter of the chunk or more fetches the whole frame once; a small read
    near the chunk's start fetches the block table with its block in one ranged read, one
    further in two (table, then block); once, however many readers."""
    write_tree(tmp_path / "src", {"big": os.urandom(2 << 20)})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", chunk_size=2 << 20, progress=False)
    objects = _SlowCountingObjects(str(tmp_path / "store"))
    store = casfs.Store(objects, memory_bytes=64 << 20)
    image = store.open_image("t")
    gets_after_open = objects.gets
    results = []
    barrier = threading.Barrier(8)

    def reader():
        barrier.wait()
        results.append(image.read("big", offset, size))

    ts = [threading.Thread(target=reader) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(set(results)) == 1 and len(results) == 8 and len(results[0]) == size
    assert objects.gets - gets_after_open == requests
    store.close()


def _chunk_files(root):
    out = []
    for dp, _, fs in os.walk(root):
        out += [os.path.join(dp, f) for f in fs if os.path.basename(dp) != "tmp"]
    return out


def test_a_corrupt_blob_with_no_other_copy_is_an_error_not_data(tmp_path):
    data = os.urandom(200_000)
    write_tree(tmp_path / "src", {"f": data})
    store = casfs.open_store(str(tmp_path / "store"), memory_bytes=0)
    casfs.build(store, str(tmp_path / "src"), tag="t", chunk_size=65536, progress=False)
    victim = sorted(_chunk_files(tmp_path / "store" / "chunks"))[0]  # chunks of a multi-chunk file are loose
    raw = bytearray(open(victim, "rb").read())
    raw[-1] ^= 0xFF
    open(victim, "wb").write(bytes(raw))
    image = store.open_image("t")
    with pytest.raises(ChunkUnavailable, match="corrupt"):
        image.read("f")
    store.close()


def test_small_files_in_one_pack_cost_one_blob_read(tmp_path):
    """150 files of 2 KB: the span window ahead of the first (384 KiB) holds them all."""
    files = {f"d/s{i:03d}": os.urandom(2000) for i in range(150)}
    write_tree(tmp_path / "src", files)
    with casfs.open_store(str(tmp_path / "store")) as s:
        r = casfs.build(s, str(tmp_path / "src"), tag="t", progress=False)
        assert r.pack.packs == 1 and r.pack.loose == 0
    store = casfs.open_store(str(tmp_path / "store"))
    image = store.open_image("t")
    for name, data in files.items():
        assert image.read(name) == data
    blob = store.blob.stats()
    assert blob.hits == 1  # the whole pack came in one ranged read
    store.close()


def test_a_pack_span_brings_a_window_or_exactly_the_wanted_frames(tmp_path):
    """Without a profile a miss fetches the frames within the span window around it, not the
    whole pack; with ``want`` (a startup profile) it fetches just the wanted frames near it."""
    files = {f"d/s{i:03d}": os.urandom(4000) for i in range(800)}  # ~3.2 MB: one 4 MiB pack
    write_tree(tmp_path / "src", files)
    with casfs.open_store(str(tmp_path / "store")) as s:
        r = casfs.build(s, str(tmp_path / "src"), tag="t", progress=False)
        assert r.pack.packs == 1
    with casfs.open_store(str(tmp_path / "store")) as store:
        image = store.open_image("t")
        assert image.read("d/s400") == files["d/s400"]
        blob = store.blob.stats()
        assert blob.hits == 1 and 400_000 < blob.bytes_read <= store.chunks.span_window + 4100
    with casfs.open_store(str(tmp_path / "store")) as store:
        image = store.open_image("t")
        wanted = [f"d/s{i:03d}" for i in (10, 11, 13, 500, 501)]
        store.chunks.want(r for w in wanted for r in image.chunk_refs(image.lookup(w)))
        for w in wanted:
            assert image.read(w) == files[w]
        blob = store.blob.stats()
        assert blob.hits == 2  # s010-s013 in one span (s012 is read through), s500-s501 in another
        assert blob.bytes_read <= 6 * 4100


def test_a_full_ssd_skips_cache_writes_but_reads_succeed(tmp_path):
    """The ssd tier's directory is made unwritable (chmod does not bind root, so a read-only
    bind would be needed; instead its tmp dir is replaced by a file, which makes every write
    fail the way a full disk does)."""
    data = os.urandom(500_000)
    write_tree(tmp_path / "src", {"f": data})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", chunk_size=65536, progress=False)
    store = casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"), memory_bytes=0)
    tmpdir = tmp_path / "cache" / "chunks" / "tmp"
    os.rmdir(tmpdir)
    tmpdir.write_bytes(b"")
    image = store.open_image("t")
    assert image.read("f") == data
    store.chunks.flush()
    assert store.ssd.stats().errors > 0 and store.ssd.used == 0
    store.close()
