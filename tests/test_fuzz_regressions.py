"""Regression tests for bugs the fuzz targets (fuzz/fuzz_index.py, fuzz/fuzz_chunk.py,
fuzz/fuzz_export.py) found,
plus a replay of every seed input through the targets' own contract checks."""

from __future__ import annotations

import importlib
import os
import stat as statmod
import struct
import sys

import pytest
import zstandard

from casfs import chunk as chunkmod
from casfs.digest import digest_bytes
from casfs.errors import CorruptChunk, CorruptIndex
from casfs.index import _HEADER, _LENGTHS, _SECTIONS, ChunkRef, EntrySpec, Index, serialize

FUZZ_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz")
DIR = statmod.S_IFDIR | 0o755
FILE = statmod.S_IFREG | 0o644


def _set_column(data: bytes, column: str, i: int, value: int) -> bytes:
    """Overwrite element ``i`` of one column of serialized index bytes."""
    buf = bytearray(data)
    lengths = _LENGTHS.unpack_from(buf, _HEADER.size)
    off = _HEADER.size + _LENGTHS.size
    for (name, tc, _), ln in zip(_SECTIONS, lengths):
        if name == column:
            size = struct.calcsize(tc)
            struct.pack_into("<" + tc, buf, off + i * size, value)
            return bytes(buf)
        off += ln
    raise KeyError(column)


def _chain_of_dirs(depth: int) -> bytes:
    """'' -> d0 -> d0/d1 -> ... each directory holding the next one and one file."""
    entries = [EntrySpec("", DIR)]
    path = ""
    for k in range(depth):
        path = f"{path}/d{k}" if path else f"d{k}"
        entries.append(EntrySpec(path, DIR))
        entries.append(EntrySpec(f"{path}/f", FILE))
    return serialize(entries, [], 4096)


def test_a_directory_claiming_another_directorys_children_makes_walk_raise_not_repeat():
    data = _chain_of_dirs(3)
    ix = Index.parse(data)
    assert len(list(ix.walk())) == ix.n_entries
    # the root claims entries 1.. (its real child d0 plus d0's children): overlapping ranges
    bad = Index.parse(_set_column(data, "count", 0, 3))
    with pytest.raises(CorruptIndex, match="whose parent is"):
        list(bad.walk())


def test_overlapping_child_ranges_cannot_make_walk_exponential():
    """Found by fuzz_index: every directory claiming all later entries made walk() visit
    entries 2**n times (a hang on a hostile index). Now it stops at the first bad child."""
    n_dirs = 40
    entries = [EntrySpec("", DIR)] + [EntrySpec("/".join(f"d{j}" for j in range(k + 1)), DIR)
                                      for k in range(n_dirs)]
    data = serialize(entries, [], 4096)
    n = n_dirs + 1
    for i in range(n - 1):  # directory i claims every entry after it
        data = _set_column(data, "first", i, i + 1)
        data = _set_column(data, "count", i, n - i - 1)
    ix = Index.parse(data)
    seen = 0
    with pytest.raises(CorruptIndex):
        for _ in ix.walk():
            seen += 1
            assert seen <= n
    assert seen <= n


def test_walk_from_an_entry_out_of_range_is_rejected():
    ix = Index.parse(_chain_of_dirs(1))
    with pytest.raises(CorruptIndex):
        list(ix.walk(-1))
    with pytest.raises(CorruptIndex):
        list(ix.walk(ix.n_entries))


def test_a_pack_number_beyond_the_pack_table_is_rejected_when_packs_equal_chunks():
    """Found by fuzz_index: with as many packs as chunks the pack-number check was skipped, and
    the chunk came back with an empty pack digest (b'') that reached the blob store as a key."""
    entries = [EntrySpec("", DIR)]
    chunks = []
    for k in range(2):
        chunks.append(ChunkRef(bytes([k + 1]) * 32, 10, 58, bytes([k + 100]) * 32, 0))
        entries.append(EntrySpec(f"f{k}", FILE, size=10, chunks=[k]))
    data = serialize(entries, chunks, 4096)
    assert Index.parse(data).chunk(1).pack == bytes([101]) * 32
    with pytest.raises(CorruptIndex, match="pack out of range"):
        Index.parse(_set_column(data, "chunk_pack", 1, 2))


def _zstd_frame_declaring(content_size: int, block: bytes) -> bytes:
    """A hand-made zstd frame: 8-byte content-size field, one raw block holding ``block``."""
    fhd = 0xC0  # frame content size flag 3 (8 bytes), no single segment, no checksum, no dict
    window = 0x00  # 1 KiB window
    block_header = (len(block) << 3 | 0 << 1 | 1).to_bytes(3, "little")  # last block, raw
    return (b"\x28\xb5\x2f\xfd" + bytes([fhd, window]) + content_size.to_bytes(8, "little")
            + block_header + block)


def _chunk_frame(payload: bytes, raw_len: int, digest: bytes) -> bytes:
    return chunkmod.HEADER.pack(chunkmod.MAGIC, chunkmod.VERSION, chunkmod.CODEC_ZSTD, 0, raw_len,
                                len(payload), digest) + payload


def test_a_zstd_frame_declaring_a_huge_size_is_rejected_before_any_allocation():
    """Found by fuzz_chunk: python-zstandard allocates the content size a zstd frame declares
    (ignoring max_output_size), so a 60-byte frame claiming 2**60 bytes raised MemoryError."""
    payload = _zstd_frame_declaring(1 << 60, b"abc")
    assert zstandard.frame_content_size(payload) == 1 << 60
    frame = _chunk_frame(payload, 3, digest_bytes(b"abc"))
    with pytest.raises(CorruptChunk, match="declares"):
        chunkmod.decode(frame)


def test_a_zstd_frame_whose_declared_size_matches_still_decodes():
    payload = _zstd_frame_declaring(3, b"abc")
    assert chunkmod.decode(_chunk_frame(payload, 3, digest_bytes(b"abc"))) == b"abc"


def test_a_zstd_frame_without_a_declared_size_still_decodes():
    data = b"no content size in this frame " * 50
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert zstandard.frame_content_size(payload) == -1
    assert chunkmod.decode(_chunk_frame(payload, len(data), digest_bytes(data))) == data


def test_an_empty_chunk_in_an_unsized_zstd_frame_decodes_on_every_read_path():
    """Found by fuzz_chunk's differential check: decode() rejected a zstd frame without a
    content size that decompresses to 0 bytes (zstd's one-shot call cannot size an empty
    output) while decode_into() accepted it; both now return the empty chunk."""
    payload = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x00]) + (0 << 3 | 1).to_bytes(3, "little")
    assert zstandard.frame_content_size(payload) == -1
    frame = _chunk_frame(payload, 0, digest_bytes(b""))
    assert chunkmod.decode(frame) == b""
    if hasattr(chunkmod, "decode_into"):
        assert chunkmod.decode_into(frame, bytearray(4)) == 0
    unsized_x = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x00]) + (1 << 3 | 1).to_bytes(3, "little") + b"x"
    assert zstandard.frame_content_size(unsized_x) == -1
    assert zstandard.ZstdDecompressor().decompress(unsized_x, max_output_size=8) == b"x"
    one = _chunk_frame(unsized_x, 0, digest_bytes(b""))  # holds 1 byte, its header says 0
    with pytest.raises(CorruptChunk):
        chunkmod.decode(one)


def test_a_corrupt_zstd_frame_declaring_zero_bytes_is_rejected_like_decode_into_does():
    """Found by fuzz_chunk's differential check: python-zstandard's one-shot decompress returns
    b"" for a frame whose header declares 0 bytes without decoding its blocks, so decode()
    accepted a truncated frame (its digest, of b"", matched) that decode_into() rejected."""
    # single-segment frame, content size 0, then a raw block header claiming ~2 MB that is absent
    payload = b"\x28\xb5\x2f\xfd" + bytes([0x20, 0x00]) + bytes([0x01, 0x00, 0xFF])
    assert zstandard.frame_content_size(payload) == 0
    assert zstandard.ZstdDecompressor().decompress(payload) == b""  # the shortcut
    frame = _chunk_frame(payload, 0, digest_bytes(b""))
    with pytest.raises(CorruptChunk):
        chunkmod.decode(frame)
    if hasattr(chunkmod, "decode_into"):
        with pytest.raises(CorruptChunk):
            chunkmod.decode_into(frame, bytearray(4))


def test_bytes_after_the_zstd_frame_in_a_payload_are_rejected_on_every_read_path():
    """Found by fuzz_chunk's differential check: decode() ignored bytes after the zstd frame
    inside a chunk's payload (its digest still matched) while decode_into() rejected them."""
    data = b"hello world " * 8
    payload = zstandard.ZstdCompressor().compress(data) + bytes(10)
    frame = _chunk_frame(payload, len(data), digest_bytes(data))
    with pytest.raises(CorruptChunk):
        chunkmod.decode(frame)
    if hasattr(chunkmod, "decode_into"):
        with pytest.raises(CorruptChunk):
            chunkmod.decode_into(frame, bytearray(len(data)))
    clean = _chunk_frame(payload[:-10], len(data), digest_bytes(data))
    assert chunkmod.decode(clean) == data


@pytest.mark.parametrize("target", ["fuzz_index", "fuzz_chunk", "fuzz_export", "fuzz_oci", "fuzz_http"])
def test_every_seed_input_meets_the_fuzz_target_contract(target, tmp_path):
    """Runs each target's TestOneInput (its contract checks, without libFuzzer) on the seeds."""
    pytest.importorskip("atheris")
    sys.path.insert(0, FUZZ_DIR)
    try:
        seeds = importlib.import_module("seeds")
        mod = importlib.import_module(target)
        seeds.write_corpora(str(tmp_path))
        corpus = tmp_path / ("corpus-" + target.removeprefix("fuzz_"))
        files = sorted(corpus.iterdir())
        assert len(files) >= 8
        for f in files:
            mod.TestOneInput(f.read_bytes())
    finally:
        sys.path.remove(FUZZ_DIR)


def test_a_blocked_frame_cut_inside_its_block_table_is_corrupt_not_a_crash():
    """Found by fuzz_chunk: ``read_frame_into`` of a raw blocked frame whose file ends inside
    its block table passed the short read to the CV merge, which raised ValueError."""
    import os

    from casfs import blocktree
    from casfs.errors import CorruptChunk

    if not blocktree.available():
        pytest.skip("no C compiler for casfs.blocktree")
    digest, frame = chunkmod.encode(os.urandom(40000), compress=False, block=16384)
    fd = os.memfd_create("cut")
    try:
        os.write(fd, frame[:chunkmod.HEADER_SIZE + 30])
        with pytest.raises(CorruptChunk, match="truncated"):
            chunkmod.read_frame_into(fd, 0, bytearray(40000), digest)
    finally:
        os.close(fd)


def test_a_suffix_range_of_an_empty_object_is_the_whole_object_not_an_inverted_range():
    """Found by fuzz_http: ``Range: bytes=-5`` on an empty object parsed to (0, 0), which the
    cache server would have answered with ``Content-Range: bytes 0--1/0``."""
    from casfs.cacheserver import parse_range

    assert parse_range("bytes=-5", 0) is None
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=-5", 3) == (0, 3)
