"""Chunk size per file: the build policy, the index format (version 2, and version 1 still
read), and every reader mapping offsets to chunks with the file's own size."""

from __future__ import annotations

import os
import random
import shutil
import stat
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import casfs
from casfs.build import policy
from casfs.errors import CorruptIndex
from casfs.index import _HEADER, _LENGTHS, _SECTIONS, ChunkRef, EntrySpec, Index, serialize

from conftest import write_tree

KiB, MiB = 1 << 10, 1 << 20
DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644
V1_STORE = os.path.join(os.path.dirname(__file__), "data", "store-index-v1")


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _text(n: int) -> bytes:
    line = b"def f(x):\n    return x * 2  # a line of code that zstd shrinks well\n"
    return (line * (n // len(line) + 1))[:n]


# -- the policy --------------------------------------------------------------------------------


def test_weight_names_get_large_chunks_and_code_gets_small_ones():
    assert casfs.chunk_size_for("model.safetensors", 5 << 30) == casfs.WEIGHT_CHUNK_SIZE == 16 * MiB
    for name in ("m/pytorch_model.bin", "x.PT", "a.gguf", "w.npy"):
        assert casfs.chunk_size_for(name, 100 * MiB) == casfs.WEIGHT_CHUNK_SIZE, name
    for name in ("lib/libtorch_cpu.so", "site-packages/numpy/core/_multiarray.py", "README"):
        assert casfs.chunk_size_for(name, 300 * MiB) == casfs.CODE_CHUNK_SIZE == 512 * KiB, name


def test_a_large_file_of_unknown_kind_gets_large_chunks_only_when_incompressible():
    big = policy.LARGE_FILE
    assert policy.needs_sample("data.dat", big) and not policy.needs_sample("data.dat", big - 1)
    assert not policy.needs_sample("w.safetensors", big)
    assert casfs.chunk_size_for("data.dat", big, _random(policy.SAMPLE_BYTES, 1)) == casfs.WEIGHT_CHUNK_SIZE
    assert casfs.chunk_size_for("data.dat", big, _text(policy.SAMPLE_BYTES)) == casfs.CODE_CHUNK_SIZE
    assert casfs.chunk_size_for("data.dat", big - 1, _random(policy.SAMPLE_BYTES, 1)) == casfs.CODE_CHUNK_SIZE


@pytest.fixture
def mixed(tmp_path, store, monkeypatch):
    """A tree with a weight file, a large incompressible file, a large compressible file, code,
    a hard link and an empty file, built with the default policy (LARGE_FILE lowered to 1 MiB
    so the test stays small)."""
    monkeypatch.setattr(policy, "LARGE_FILE", 1 * MiB)
    files = {
        "model/model.safetensors": _random(40 * MiB + 123, 2),
        "data/blob.dat": _random(3 * MiB + 7, 3),
        "data/log.txt": _text(3 * MiB + 11),
        "lib/libx.so": _text(2 * MiB + 5) + _random(100 * KiB, 4),
        "lib/tiny.py": b"print(1)\n",
        "empty": b"",
    }
    src = tmp_path / "src"
    write_tree(src, files)
    os.link(src / "lib/libx.so", src / "lib/libx-again.so")
    files["lib/libx-again.so"] = files["lib/libx.so"]
    casfs.build(store, str(src), tag="mixed", progress=False)
    return store.open_image("mixed"), files, src


def test_the_default_build_records_each_files_chunk_size(mixed):
    image, files, _ = mixed
    want = {"model/model.safetensors": 16 * MiB, "data/blob.dat": 16 * MiB, "data/log.txt": 512 * KiB,
            "lib/libx.so": 512 * KiB, "lib/libx-again.so": 512 * KiB, "lib/tiny.py": 512 * KiB,
            "empty": 512 * KiB}
    for path, cs in want.items():
        e = image.lookup(path)
        assert image.file_chunk_size(e) == cs, path
        assert len(image.chunk_refs(e)) == -(-len(files[path]) // cs), path
        assert all(r.raw_len <= cs for r in image.chunk_refs(e)), path
    assert image.index.version == 2
    assert image.chunk_size == 16 * MiB  # the largest of any file


def test_every_reader_returns_the_right_bytes_across_chunk_boundaries(mixed, tmp_path):
    image, files, _ = mixed
    rng = random.Random(5)
    for path, data in files.items():
        e = image.lookup(path)
        assert image.read(path) == data, path
        cs = image.file_chunk_size(e)
        offsets = [0, cs - 1, cs, len(data) - 1] + [rng.randrange(0, len(data) + 1) for _ in range(6)]
        for off in offsets:
            for n in (1, 3, cs + 2, 2 * cs + 5):
                assert image.read_entry(e, max(0, off), n) == data[max(0, off):max(0, off) + n], (path, off, n)
                buf = bytearray(n)
                got = image.read_into(e, max(0, off), buf)
                assert bytes(buf[:got]) == data[max(0, off):max(0, off) + n], (path, off, n)
    out = tmp_path / "out"
    casfs.export(image, str(out), progress=False)
    for path, data in files.items():
        assert (out / path).read_bytes() == data, path


def test_a_forced_chunk_size_applies_to_every_file(tmp_path, store):
    src = tmp_path / "src"
    write_tree(src, {"w.safetensors": _random(3 * MiB, 6), "code.py": _text(700 * KiB)})
    casfs.build(store, str(src), tag="forced", chunk_size=1 * MiB, progress=False)
    image = store.open_image("forced")
    for path in ("w.safetensors", "code.py"):
        assert image.file_chunk_size(image.lookup(path)) == 1 * MiB
        assert image.read(path) == (src / path).read_bytes()


def test_the_cli_defaults_to_the_policy_and_forces_a_size_when_asked(tmp_path, capsys):
    from casfs.cli.main import main

    src = tmp_path / "src"
    write_tree(src, {"w.safetensors": _random(1 * MiB, 7), "code.py": _text(900 * KiB)})
    url = str(tmp_path / "st")
    assert main(["--store", url, "build", str(src), "-t", "auto", "--no-progress"]) == 0
    assert main(["--store", url, "build", str(src), "-t", "one", "--chunk-size", "64K", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["--store", url, "stat", "auto", "code.py"]) == 0
    assert "chunk size 512.0 KiB" in capsys.readouterr().out
    assert main(["--store", url, "stat", "auto", "w.safetensors"]) == 0
    assert "chunk size 16.0 MiB" in capsys.readouterr().out
    with casfs.open_store(url) as s:
        a, o = s.open_image("auto"), s.open_image("one")
        assert a.file_chunk_size(a.lookup("w.safetensors")) == 16 * MiB
        assert a.file_chunk_size(a.lookup("code.py")) == 512 * KiB
        assert o.file_chunk_size(o.lookup("w.safetensors")) == o.file_chunk_size(o.lookup("code.py")) == 64 * KiB


# -- format version 1 still reads -----------------------------------------------------------------


@pytest.fixture
def v1_image(tmp_path):
    """The image in tests/data/store-index-v1: built by casfs before per-file chunk sizes
    (format version 1, one 4 KiB chunk size in the header), copied so the test cannot touch it."""
    shutil.copytree(V1_STORE, tmp_path / "v1")
    s = casfs.open_store(str(tmp_path / "v1"))
    yield s.open_image("v1")
    s.close()


def test_an_index_written_in_format_version_1_still_reads(v1_image, tmp_path):
    image = v1_image
    assert image.index.version == 1 and image.chunk_size == 4096
    a = random.Random(13)
    want_a = bytes(a.getrandbits(8) for _ in range(10000))
    want_b = b"print('hello from a v1 index')\n" * 40
    assert image.file_chunk_size(image.lookup("a.bin")) == 4096
    assert len(image.chunk_refs(image.lookup("a.bin"))) == 3
    assert image.read("a.bin") == want_a
    assert image.read("a.bin", 4000, 5000) == want_a[4000:9000]
    buf = bytearray(6000)
    assert image.read_into(image.lookup("a.bin"), 4096, buf) == 5904
    assert bytes(buf[:5904]) == want_a[4096:]
    assert image.read("dir/b.py") == want_b == image.read("dir/b2.py")
    assert image.readlink("dir/link") == "../a.bin"
    assert image.stat("dir/b.py").ino == image.stat("dir/b2.py").ino
    casfs.export(image, str(tmp_path / "out"), progress=False)
    assert (tmp_path / "out" / "a.bin").read_bytes() == want_a


# -- the parser: the new column is hostile input --------------------------------------------------


def _shift_offset(data: bytes) -> int:
    """Byte offset of the chunk_shift column in a version-2 index."""
    lengths = _LENGTHS.unpack_from(data, _HEADER.size)
    k = [name for name, _, _ in _SECTIONS].index("chunk_shift")
    return _HEADER.size + _LENGTHS.size + sum(lengths[:k])


def _two_files() -> bytes:
    chunks = [ChunkRef(bytes([i]) * 32, 4096, 100) for i in range(3)] + [ChunkRef(b"\x09" * 32, 1 << 16, 1 << 16)]
    entries = [EntrySpec("", DIR), EntrySpec("a", REG, size=3 * 4096, chunks=[0, 1, 2], chunk_size=4096),
               EntrySpec("b", REG, size=1 << 16, chunks=[3], chunk_size=1 << 16)]
    return serialize(entries, chunks, 4096)


def test_per_file_chunk_sizes_survive_a_serialize_parse_round_trip():
    ix = Index.parse(_two_files())
    assert ix.chunk_size == 1 << 16  # the header holds the largest
    assert ix.file_chunk_size(ix.lookup("a")) == 4096 and ix.file_chunk_size(ix.lookup("b")) == 1 << 16
    assert [r.digest[0] for r in ix.file_chunks(ix.lookup("a"))] == [0, 1, 2]


@pytest.mark.parametrize("shift", [0, 11, 17, 28, 29, 255])
def test_a_file_chunk_size_out_of_range_is_corrupt_index_never_a_wrong_read(shift):
    data = bytearray(_two_files())
    ix0 = Index.parse(bytes(data))
    a = ix0.lookup("a")
    data[_shift_offset(bytes(data)) + a] = shift
    try:
        ix = Index.parse(bytes(data))
    except CorruptIndex:
        assert shift > 28
        return
    # 12 <= shift <= 16 parses; the chunk list must then agree with it, or it is corrupt
    if shift == 12:
        assert ix.file_chunk_size(a) == 4096
        return
    with pytest.raises(CorruptIndex):
        ix.file_chunks(a)


def test_serialize_refuses_a_chunk_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        serialize([EntrySpec("", DIR), EntrySpec("a", REG, size=10, chunks=[0], chunk_size=5000)],
                  [ChunkRef(b"\x01" * 32, 10, 10)], 4096)
    with pytest.raises(ValueError, match="power of two"):
        serialize([EntrySpec("", DIR)], [], 6000)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(12, 20), st.integers(0, 3)), min_size=1, max_size=8), st.data())
def test_random_per_file_sizes_round_trip_and_map_offsets(files, data):
    chunks: list[ChunkRef] = []
    entries = [EntrySpec("", DIR)]
    for k, (shift, n) in enumerate(files):
        cs = 1 << shift
        size = 0 if n == 0 else (n - 1) * cs + data.draw(st.integers(1, cs))
        ids = []
        for j in range(n):
            ids.append(len(chunks))
            chunks.append(ChunkRef(struct.pack("<II", k, j) * 4, min(cs, size - j * cs), 10))
        entries.append(EntrySpec(f"f{k}", REG, size=size, chunks=ids, chunk_size=cs))
    ix = Index.parse(serialize(entries, chunks, 4096))
    for k, (shift, n) in enumerate(files):
        i = ix.lookup(f"f{k}")
        assert ix.file_chunk_size(i) == 1 << shift
        refs = ix.file_chunks(i)
        assert [struct.unpack_from("<II", r.digest)[1] for r in refs] == list(range(n))


def test_chunks_of_multi_chunk_files_are_loose_so_a_read_fetches_one_chunk(mixed):
    image, files, _ = mixed
    big = image.chunk_refs(image.lookup("lib/libx.so"))  # five 512 KiB chunks
    assert len(big) == 5 and all(r.pack is None for r in big)
    small = image.chunk_refs(image.lookup("lib/tiny.py"))
    assert len(small) == 1 and small[0].pack is not None  # small files still travel in packs
