"""Verified sub-chunk reads: BLAKE3 block CVs, blocked frames, the store's block path, and the
faults of that path (every tier, real servers on 127.0.0.1, real FUSE mounts).

Each fault test asserts that no wrong byte reaches the caller: a read returns the source's
bytes or raises a clean error, and a bad copy is dropped from the tier that served it.
"""

from __future__ import annotations

import os
import random

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import casfs
from casfs import blocktree
from casfs import chunk as chunkmod
from casfs.cacheserver import CacheServer
from casfs.cacheserver.objects import _slot
from casfs.errors import ChunkUnavailable, CorruptChunk
from casfs.layout import chunk_key, object_key
from casfs.objects.http import HttpObjectStore
from casfs.objects.local import LocalObjectStore
from casfs.store import Store
from casfs.tiers.azcache import AzCacheTier

from conftest import write_tree

from tests.support import NGINX, missing_binary, nginx_static

pytestmark = pytest.mark.skipif(not blocktree.available(), reason="no C compiler for casfs.blocktree")

BLOCK = 64 << 10


# -- the BLAKE3 tree --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5 << 20), st.sampled_from([1 << 10, 4 << 10, 16 << 10, 64 << 10, 1 << 20]),
       st.integers(0, 2**32 - 1))
def test_block_cvs_merge_to_the_blake3_digest_of_the_whole(n, block, seed):
    if n <= block:
        n = block + 1 + seed % block
    data = random.Random(seed).randbytes(n)
    ob = blocktree.outboard(data, block)
    assert len(ob) == 32 * blocktree.block_count(n, block)
    assert blocktree.root_from_cvs(ob) == blake3.blake3(data).digest()
    i = seed % blocktree.block_count(n, block)
    assert blocktree.block_cv(data[i * block:(i + 1) * block], block, i) == ob[32 * i:32 * i + 32]


def test_a_block_cv_depends_on_the_blocks_position_and_bytes():
    data = os.urandom(4 * BLOCK)
    ob = blocktree.outboard(data, BLOCK)
    assert blocktree.block_cv(data[:BLOCK], BLOCK, 1) != ob[32:64]  # right bytes, wrong place
    flipped = bytearray(data[BLOCK:2 * BLOCK])
    flipped[7] ^= 1
    assert blocktree.block_cv(flipped, BLOCK, 1) != ob[32:64]


def test_bad_block_sizes_are_refused():
    with pytest.raises(ValueError):
        blocktree.outboard(b"x" * 5000, 3000)
    with pytest.raises(ValueError):
        chunkmod.encode(b"x" * 5000, block=4096)  # frames take 16 KiB to 1 MiB blocks


# -- blocked frames ---------------------------------------------------------------------------


def _blocked_data(draw_bytes: bytes, n: int) -> bytes:
    """``n`` bytes mixing compressible and random runs (so blocks go zstd and raw)."""
    return (draw_bytes * (n // max(1, len(draw_bytes)) + 1))[:n // 2] + random.Random(n).randbytes(n - n // 2)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=300), st.integers(16 << 10, 700 << 10), st.booleans(),
       st.sampled_from([16 << 10, 64 << 10]))
def test_any_chunk_round_trips_whole_and_block_by_block(seed, n, compress, block):
    data = _blocked_data(seed, n)
    digest, frame = chunkmod.encode(data, compress=compress, block=block)
    assert chunkmod.decode(frame, expect=digest) == data
    h = chunkmod.parse_header(frame)
    assert bool(h.block) == (n > block)
    meta = chunkmod.parse_meta(frame[:chunkmod.meta_probe_len(n, block)], digest)
    if not h.block:
        assert meta is None
        return
    for i in range(meta.n_blocks):
        off, ln = meta.block_range(i)
        assert chunkmod.decode_block(meta, i, frame[off:off + ln]) == data[i * block:(i + 1) * block]


@settings(max_examples=150, deadline=None)
@given(st.integers(BLOCK + 1, 5 * BLOCK), st.booleans(), st.data())
def test_a_flipped_bit_anywhere_in_a_blocked_frame_is_never_returned_as_data(n, compressible, draw):
    data = (b"abc" * n)[:n] if compressible else os.urandom(n)
    digest, frame = chunkmod.encode(data, block=BLOCK)
    pos = draw.draw(st.integers(0, len(frame) - 1))
    bad = bytearray(frame)
    bad[pos] ^= 1 << draw.draw(st.integers(0, 7))
    bad = bytes(bad)
    try:
        assert chunkmod.decode(bad, expect=digest) == data
    except CorruptChunk:
        pass
    try:  # the block path: table first (verified against the name), then each block
        meta = chunkmod.parse_meta(bad, digest)
    except CorruptChunk:
        return
    for i in range(meta.n_blocks):
        off, ln = meta.block_range(i)
        try:
            assert chunkmod.decode_block(meta, i, bad[off:off + ln]) == data[i * BLOCK:(i + 1) * BLOCK]
        except CorruptChunk:
            pass


def test_a_block_table_from_another_chunk_is_rejected():
    d1, f1 = chunkmod.encode(os.urandom(3 * BLOCK), block=BLOCK)
    d2, _ = chunkmod.encode(os.urandom(3 * BLOCK), block=BLOCK)
    with pytest.raises(CorruptChunk):
        chunkmod.parse_meta(f1, d2)
    # the same table with the other name in its header: the CVs do not merge to it
    forged = bytearray(f1)
    forged[16:48] = d2
    with pytest.raises(CorruptChunk, match="do not merge"):
        chunkmod.parse_meta(bytes(forged), d2)


def test_a_raw_blocked_frame_reads_straight_into_a_buffer(tmp_path):
    data = os.urandom(5 * BLOCK + 17)
    digest, frame = chunkmod.encode(data, compress=False, block=BLOCK)
    p = tmp_path / "f"
    p.write_bytes(b"pad" + frame)
    buf = bytearray(len(data))
    fd = os.open(p, os.O_RDONLY)
    try:
        h = chunkmod.read_frame_into(fd, 3, buf, digest, frame_len=len(frame))
    finally:
        os.close(fd)
    assert h.block == BLOCK and bytes(buf) == data


# -- the store's block path -------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(store dir, files): a random 5 MiB file (loose raw chunks), a compressible 3 MiB one
    (zstd blocks, packed frames) and a small file."""
    d = tmp_path_factory.mktemp("blocks")
    rnd = random.Random(5)
    files = {"weights.bin": rnd.randbytes(5 << 20),
             "lib.so": b"".join(rnd.choice([b"\x00" * 64, rnd.randbytes(64), b"text " * 13]) for _ in range(48000)),
             "small.txt": b"hello\n"}
    write_tree(d / "src", files)
    with casfs.open_store(str(d / "store")) as s:
        casfs.build(s, str(d / "src"), tag="t", chunk_size=2 << 20, progress=False)
    return str(d / "store"), files


def _ref(s: Store, name: str, j: int = 0):
    image = s.open_image("t")
    return image, image.chunk_refs(image.lookup(name))[j]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["weights.bin", "lib.so"]), st.integers(0, 3 << 20), st.integers(1, 300 << 10))
def test_any_small_read_equals_the_source_slice_and_fetches_only_its_blocks(built, tmp_path_factory, name, off, n):
    store_dir, files = built
    with casfs.open_store(store_dir, cache_dir=str(tmp_path_factory.mktemp("c"))) as s:
        image = s.open_image("t")
        data = files[name]
        off %= len(data)
        assert image.read(name, off, n) == data[off:off + n]
        blob = next(t for t in s.chunks.stats() if t.name == "blob")
        if n * 4 <= 2 << 20 and (off % (2 << 20)) + n <= 2 << 20:  # small, inside one chunk
            assert s.chunks.counters["block_reads"] == 1
            assert blob.bytes_read <= n + 2 * BLOCK + 8192  # its blocks and the block table
        else:
            assert s.chunks.counters["block_reads"] == 0


def test_blocks_read_cold_are_kept_in_the_ssd_tier_for_the_next_start(built, tmp_path):
    store_dir, files = built
    cache = str(tmp_path / "cache")
    with casfs.open_store(store_dir, cache_dir=cache) as s:
        assert s.open_image("t").read("weights.bin", 3 << 20, 4096) == files["weights.bin"][3 << 20:(3 << 20) + 4096]
    with casfs.open_store(store_dir, cache_dir=cache) as s:
        assert s.open_image("t").read("weights.bin", 3 << 20, 4096) == files["weights.bin"][3 << 20:(3 << 20) + 4096]
        names = {t.name: t for t in s.chunks.stats()}
        assert names["blob"].bytes_read == 0 and names["ssd"].hits == 2  # block table + block


def test_a_corrupt_block_in_the_ssd_frame_evicts_it_and_the_blob_serves(built, tmp_path):
    store_dir, files = built
    cache = str(tmp_path / "cache")
    with casfs.open_store(store_dir, cache_dir=cache) as s:
        image, ref = _ref(s, "weights.bin", 1)
        s.chunks.get(ref)  # the whole frame reaches the ssd tier
        s.chunks.flush()
        path = s.ssd.path_of(ref.digest)
    meta = chunkmod.parse_meta(open(path, "rb").read(), ref.digest)
    off, _ = meta.block_range(3)
    with open(path, "r+b") as f:
        f.seek(off + 100)
        b = f.read(1)
        f.seek(off + 100)
        f.write(bytes([b[0] ^ 0x10]))
    with casfs.open_store(store_dir, cache_dir=cache) as s:
        got = s.open_image("t").read("weights.bin", (2 << 20) + 3 * BLOCK, 5000)
        assert got == files["weights.bin"][(2 << 20) + 3 * BLOCK:(2 << 20) + 3 * BLOCK + 5000]
        assert s.chunks.verify_failures == 1 and not os.path.exists(path)


@pytest.mark.parametrize("part", ["m", "block"])
def test_a_corrupt_part_in_the_ssd_tier_is_dropped_and_fetched_again(built, tmp_path, part):
    store_dir, files = built
    cache = str(tmp_path / "cache")
    want = files["lib.so"][5000:9000]
    with casfs.open_store(store_dir, cache_dir=cache) as s:
        image, ref = _ref(s, "lib.so")
        assert image.read("lib.so", 5000, 4000) == want
        s.chunks.flush()
    name = ref.digest.hex() + (".m" if part == "m" else ".0")
    path = os.path.join(cache, "chunks", name[:2], name)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(path, "wb").write(bytes(raw))
    with casfs.open_store(store_dir, cache_dir=cache) as s:
        assert s.open_image("t").read("lib.so", 5000, 4000) == want
        assert s.chunks.verify_failures == 1
        s.chunks.flush()
    assert open(path, "rb").read() != bytes(raw)  # dropped, then filled again with good bytes


def test_a_corrupt_block_in_the_only_copy_is_an_error_not_data(built, tmp_path):
    store_dir, files = built
    import shutil

    copy = str(tmp_path / "store")
    shutil.copytree(store_dir, copy)
    with casfs.open_store(copy, memory_bytes=0) as s:
        _, ref = _ref(s, "weights.bin", 0)
        path = s.objects.local_path(chunk_key(ref.digest))
        meta = chunkmod.parse_meta(open(path, "rb").read(), ref.digest)
    off, _ = meta.block_range(2)
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x80]))
    with casfs.open_store(copy, memory_bytes=0) as s:
        image = s.open_image("t")
        with pytest.raises(ChunkUnavailable, match="blocks"):
            image.read("weights.bin", 2 * BLOCK + 10, 100)
        assert image.read("weights.bin", 10, 100) == files["weights.bin"][10:110]  # other blocks serve
        assert s.chunks.verify_failures == 1


def test_a_cache_node_serving_a_flipped_block_is_marked_bad_and_the_blob_serves(built):
    store_dir, files = built
    with casfs.open_store(store_dir, memory_bytes=0) as plain:
        _, ref = _ref(plain, "weights.bin", 0)
    meta_s = casfs.open_store(store_dir, memory_bytes=0)
    meta = chunkmod.parse_meta(meta_s.blob.get(ref), ref.digest)
    meta_s.close()
    off, _ = meta.block_range(1)
    with CacheServer(LocalObjectStore(store_dir)) as srv:
        key = object_key(ref)
        bad = bytearray(srv.objects.get(key))
        bad[off + 5] ^= 0x04
        srv.cache.memory.put(_slot(key), bytes(bad))
        tier = AzCacheTier([srv.url], bad_seconds=60.0)
        s = Store(LocalObjectStore(store_dir), memory_bytes=0, extra_tiers=[tier])
        try:
            got = s.open_image("t").read("weights.bin", BLOCK + 3, 4096)
            assert got == files["weights.bin"][BLOCK + 3:BLOCK + 3 + 4096]
            assert s.chunks.verify_failures == 1
            assert not tier.node_status()[0]["up"]
        finally:
            s.close()


@pytest.mark.skipif(bool(missing_binary(NGINX)), reason="nginx is not installed")
def test_blocks_come_by_ranged_reads_from_an_http_store(built):
    store_dir, files = built
    with nginx_static(store_dir) as base:
        s = Store(HttpObjectStore(base), memory_bytes=0)
        try:
            image = s.open_image("t")
            for off in (0, 777_777, (4 << 20) + 12345):
                assert image.read("weights.bin", off, 4096) == files["weights.bin"][off:off + 4096]
            assert image.read("lib.so", 100_000, 2000) == files["lib.so"][100_000:102_000]
            blob = next(t for t in s.chunks.stats() if t.name == "blob")
            assert blob.bytes_read < 4 * 3 * (BLOCK + 4096)  # tables + blocks, not 2 MiB chunks
        finally:
            s.close()


def test_the_ssd_tier_keeps_zstd_frames_decompressed_and_block_reads_still_verify(built, tmp_path):
    store_dir, files = built
    cache = str(tmp_path / "cache")
    with casfs.open_store(store_dir, cache_dir=cache) as s:
        image, ref = _ref(s, "lib.so")
        assert chunkmod.parse_header(s.blob.get(ref)).codec == chunkmod.CODEC_ZSTD
        assert image.read("lib.so") == files["lib.so"]  # whole chunks: they fill the ssd tier
        s.chunks.flush()
        kept = open(s.ssd.path_of(ref.digest), "rb").read()
    h = chunkmod.parse_header(kept)
    assert h.codec == chunkmod.CODEC_RAW and h.block == BLOCK
    assert chunkmod.decode(kept, expect=ref.digest) == files["lib.so"][:ref.raw_len]
    with casfs.open_store(store_dir, cache_dir=cache) as s:  # a block read from the raw copy
        assert s.open_image("t").read("lib.so", 70_000, 3000) == files["lib.so"][70_000:73_000]
        assert next(t for t in s.chunks.stats() if t.name == "blob").bytes_read == 0
