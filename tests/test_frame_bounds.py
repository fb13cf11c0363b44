"""A chunk frame may not make a reader allocate more than the index says the chunk holds.

A small hostile frame (right digest in its header, a zstd payload declaring 256 MiB) sits in
each place a reader meets frames: the ssd tier (``get`` and the zero-copy ``read_into``), a
pack span from the blob store, and the cache server's check of what it fetched. Every path
refuses it before allocating its declared size (measured with tracemalloc, which sees
python-zstandard's output buffer) and the read is served from the next tier or fails cleanly.
"""

from __future__ import annotations

import os
import tracemalloc

import pytest
import zstandard

import casfs
from casfs import chunk as chunkmod
from casfs.cacheserver.objects import verify_object
from casfs.digest import digest_bytes
from casfs.errors import ChunkUnavailable, CorruptChunk
from casfs.layout import fanout_name

from conftest import write_tree

HUGE = 256 << 20
CS = 65536
LIMIT = 32 << 20  # peak bytes a read may allocate here (the chunk, a few copies, bookkeeping)


def hostile_frame(digest: bytes, length: int, declared: int = HUGE) -> bytes:
    """A frame of exactly ``length`` bytes, carrying ``digest``, whose header and zstd frame
    both declare ``declared`` bytes (a truncated compression of mostly zeros)."""
    body = os.urandom(length) + bytes(declared - length)
    z = zstandard.ZstdCompressor(level=1).compress(body)[:length - chunkmod.HEADER_SIZE]
    return chunkmod.HEADER.pack(chunkmod.MAGIC, chunkmod.VERSION, chunkmod.CODEC_ZSTD, 0, declared,
                                len(z), digest) + z


def peak_of(fn):
    """(result or exception, peak traced bytes) of ``fn()``."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_decode_refuses_a_frame_declaring_more_than_the_index_entry_before_allocating():
    real = os.urandom(4096)
    frame = hostile_frame(digest_bytes(real), 4000)
    err, peak = peak_of(lambda: chunkmod.decode(frame, expect=digest_bytes(real), length=len(real)))
    assert isinstance(err, CorruptChunk) and "index entry 4096" in str(err)
    assert peak < 1 << 20


def test_a_zstd_payload_longer_than_its_chunk_could_compress_to_is_refused_by_the_header_check():
    header = chunkmod.HEADER.pack(chunkmod.MAGIC, 1, chunkmod.CODEC_ZSTD, 0, 4096, HUGE, b"\0" * 32)
    with pytest.raises(CorruptChunk, match="compress to"):
        chunkmod.parse_header(header)


def test_the_cache_servers_check_of_a_fetched_frame_uses_bounded_memory():
    real = os.urandom(4096)
    frame = hostile_frame(digest_bytes(real), 5000)
    err, peak = peak_of(lambda: verify_object("chunks/" + digest_bytes(real).hex(), frame))
    assert isinstance(err, CorruptChunk)
    assert peak < 4 << 20
    good = chunkmod.encode(b"abc" * 10000)[1]
    verify_object("chunks/" + chunkmod.frame_digest(good).hex(), good)  # a good frame passes
    assert chunkmod.verify(good).raw_len == 30000


@pytest.fixture
def built(tmp_path):
    data = os.urandom(3 * CS)
    small = {f"s{i}": os.urandom(3000) for i in range(5)}
    write_tree(tmp_path / "src", {"f": data, **small})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", chunk_size=CS, progress=False)
    return tmp_path, data, small


@pytest.mark.parametrize("how", ["read", "read_into"])
def test_a_hostile_ssd_frame_is_refused_and_the_read_served_from_the_blob(built, how):
    tmp_path, data, _ = built
    store = casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"), memory_bytes=0)
    try:
        image = store.open_image("t")
        assert image.read("f") == data
        store.chunks.flush()
        ref = image.chunk_refs(image.lookup("f"))[1]
        path = store.ssd.path_of(ref.digest)
        assert os.path.exists(path)
        with open(path, "wb") as f:
            f.write(hostile_frame(ref.digest, 5000))
        if how == "read":
            got, peak = peak_of(lambda: image.read("f", CS, CS))
            assert got == data[CS:2 * CS]
        else:
            buf = bytearray(CS)
            got, peak = peak_of(lambda: image.read_into(image.lookup("f"), CS, buf))
            assert got == CS and bytes(buf) == data[CS:2 * CS]
        assert peak < LIMIT
        assert store.chunks.verify_failures == 1
    finally:
        store.close()


def test_a_hostile_ssd_frame_whose_payload_claims_256_mib_costs_no_allocation_on_read_into(built):
    tmp_path, data, _ = built
    store = casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"), memory_bytes=0)
    try:
        image = store.open_image("t")
        assert image.read("f") == data
        store.chunks.flush()
        ref = image.chunk_refs(image.lookup("f"))[0]
        with open(store.ssd.path_of(ref.digest), "wb") as f:  # right length, a payload of "256 MiB"
            f.write(chunkmod.HEADER.pack(chunkmod.MAGIC, 1, chunkmod.CODEC_ZSTD, 0, CS, HUGE, ref.digest) + b"x" * 100)
        buf = bytearray(CS)
        got, peak = peak_of(lambda: image.read_into(image.lookup("f"), 0, buf))
        assert got == CS and bytes(buf) == data[:CS]
        assert peak < LIMIT
    finally:
        store.close()


def test_a_hostile_frame_inside_a_pack_span_is_refused_without_allocating_its_declared_size(built):
    tmp_path, _, small = built
    store = casfs.open_store(str(tmp_path / "store"), memory_bytes=0)
    try:
        image = store.open_image("t")
        ref = image.chunk_refs(image.lookup("s2"))[0]
        assert ref.pack is not None
        pack = tmp_path / "store" / "packs" / fanout_name(ref.pack.hex())
        raw = bytearray(pack.read_bytes())
        raw[ref.pack_off:ref.pack_off + ref.stored_len] = hostile_frame(ref.digest, ref.stored_len)
        pack.write_bytes(bytes(raw))
        err, peak = peak_of(lambda: image.read("s2"))
        assert isinstance(err, ChunkUnavailable) and "index entry" in str(err)
        assert peak < LIMIT
        assert image.read("s3") == small["s3"]  # its neighbours still read
    finally:
        store.close()


def _ssd_frames(root):
    out = []
    for dp, _, fs in os.walk(root):
        if os.path.basename(dp) != "tmp":
            out += [os.path.join(dp, f) for f in fs]
    return out


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_pack_neighbours_are_verified_before_they_fill_the_ssd_tier(tmp_path, damage):
    files = {f"s{i:03d}": os.urandom(3000) for i in range(60)}
    write_tree(tmp_path / "src", files)
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", progress=False)
    store = casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"), memory_bytes=0)
    try:
        image = store.open_image("t")
        refs = {n: image.chunk_refs(image.lookup(n))[0] for n in files}
        pack = tmp_path / "store" / "packs" / fanout_name(refs["s000"].pack.hex())
        raw = bytearray(pack.read_bytes())
        if damage == "truncated":
            del raw[len(raw) // 2:]
        else:
            for r in refs.values():
                raw[r.pack_off + r.stored_len - 1] ^= 0x55  # every frame's last byte
            r0 = refs["s000"]
            raw[r0.pack_off + r0.stored_len - 1] ^= 0x55  # ... but the first one's
        pack.write_bytes(bytes(raw))
        assert image.read("s000") == files["s000"]
        store.chunks.flush()
        cached = _ssd_frames(tmp_path / "cache" / "chunks")
        assert cached  # s000 (verified) went in
        for p in cached:  # and nothing else that does not verify: no zero-byte, torn or bad frame
            frame = open(p, "rb").read()
            chunkmod.verify(frame, expect=bytes.fromhex(os.path.basename(p)))
        assert len(cached) < len(files)
    finally:
        store.close()
