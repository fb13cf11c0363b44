"""Zero-copy chunk reads (TieredStore.get_into, Image.read_into, chunk.read_frame_into) and the
build's compression policy. Every test uses real stores on disk; the one backend that is not a
LocalObjectStore (``_RemoteLike``) stands in for S3/HTTP: it hides ``local_path`` so the store
must take its remote path, and it counts and slows requests to make single flight visible."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import casfs
from casfs import chunk
from casfs.build.packer import WEIGHT_SUFFIXES, codec_choice
from casfs.cli.main import main as cli_main
from casfs.digest import digest_bytes
from casfs.errors import BuildError, CorruptChunk
from casfs.objects.local import LocalObjectStore

from conftest import write_tree

KiB, MiB = 1 << 10, 1 << 20


def squeezable(n: int, seed: int = 0) -> bytes:
    """Bytes with 6 bits of entropy each: zstd saves ~25% (like bf16 weights)."""
    rnd = random.Random(seed)
    return bytes(b & 0x3F for b in rnd.randbytes(n))


def build(tmp_path, files: dict[str, bytes], chunk_size: int = 64 * KiB, compress: str = "auto",
          tag: str = "t") -> str:
    src = tmp_path / f"src-{tag}"
    write_tree(src, files)
    root = str(tmp_path / "store")
    with casfs.open_store(root) as s:
        casfs.build(s, str(src), tag=tag, chunk_size=chunk_size, progress=False, compress=compress)
    return root


def refs_of(store, path: str, tag: str = "t"):
    image = store.open_image(tag)
    return image, image.chunk_refs(image.lookup(path))


def codecs(store, path: str, tag: str = "t") -> set[int]:
    _, refs = refs_of(store, path, tag)
    return {chunk.parse_header(store.blob.get(r)).codec for r in refs}


def hits(store) -> dict[str, int]:
    return {st.name: st.hits for st in store.chunks.stats()}


class _RemoteLike:
    """An ObjectStore over a local directory that is not a local-file backend (no
    ``local_path``), with a delay per request and a request counter."""

    read_only = False

    def __init__(self, root: str, delay: float = 0.0) -> None:
        self._inner = LocalObjectStore(root, create=False)
        self.url = "remote+" + self._inner.url
        self.delay = delay
        self.requests = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.requests += 1
        time.sleep(self.delay)

    def get(self, key):
        self._count()
        return self._inner.get(key)

    def get_range(self, key, offset, length):
        self._count()
        return self._inner.get_range(key, offset, length)

    def put(self, key, data):
        self._inner.put(key, data)

    def contains(self, key):
        return self._inner.contains(key)

    def delete(self, key):
        self._inner.delete(key)

    def list(self, prefix):
        return self._inner.list(prefix)

    def size(self, key):
        return self._inner.size(key)


# -- frames into buffers ----------------------------------------------------------------------


@given(st.binary(max_size=20000), st.booleans())
def test_any_frame_decodes_into_a_buffer_as_decode_returns_it(data, compress):
    digest, frame = chunk.encode(data, compress=compress)
    buf = bytearray(len(data) + 7)
    assert chunk.decode_into(frame, buf, digest) == len(data)
    assert bytes(buf[:len(data)]) == chunk.decode(frame, digest)


@settings(max_examples=150)
@given(st.binary(min_size=1, max_size=3000), st.booleans(), st.data())
def test_a_flipped_bit_in_a_frame_file_is_never_reported_as_a_good_read(tmp_path_factory, data, compress, draw):
    digest, frame = chunk.encode(data, compress=compress)
    pos = draw.draw(st.integers(0, len(frame) - 1))
    bad = bytearray(frame)
    bad[pos] ^= 1 << draw.draw(st.integers(0, 7))
    path = tmp_path_factory.mktemp("frame") / "f"
    path.write_bytes(bytes(b"\0" * 5) + bad)  # at an offset, as inside a pack
    buf = bytearray(len(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        h = chunk.read_frame_into(fd, 5, buf, digest, frame_len=len(frame))
    except CorruptChunk:
        return
    finally:
        os.close(fd)
    assert bytes(buf[:h.raw_len]) == data  # a flip that survived (none should) must not matter


def test_reading_a_frame_file_rejects_truncation_trailing_bytes_and_the_wrong_digest(tmp_path):
    data = os.urandom(50000)
    digest, frame = chunk.encode(data, compress=False)
    p = tmp_path / "f"
    buf = bytearray(len(data))

    def read(content: bytes, expect=digest, frame_len=None, into=buf):
        p.write_bytes(content)
        fd = os.open(p, os.O_RDONLY)
        try:
            return chunk.read_frame_into(fd, 0, into, expect, frame_len=frame_len)
        finally:
            os.close(fd)

    assert read(frame).raw_len == len(data) and bytes(buf) == data
    with pytest.raises(CorruptChunk, match="truncated"):
        read(frame[:-1])
    with pytest.raises(CorruptChunk, match="truncated"):
        read(frame[:30])
    with pytest.raises(CorruptChunk, match="after its"):
        read(frame + b"x")
    with pytest.raises(CorruptChunk, match="wanted"):
        read(frame, expect=digest_bytes(b"other"))
    with pytest.raises(CorruptChunk, match="in its pack"):
        read(frame, frame_len=len(frame) - 1)
    with pytest.raises(CorruptChunk, match="more than"):
        read(frame, into=bytearray(len(data) - 1))
    with pytest.raises(ValueError, match="read-only"):
        read(frame, into=bytes(len(data)))


def test_a_zstd_frame_inside_a_pack_decompresses_into_the_buffer(tmp_path):
    data = b"abc" * 30000
    digest, frame = chunk.encode(data)
    assert chunk.parse_header(frame).codec == chunk.CODEC_ZSTD
    p = tmp_path / "pack"
    p.write_bytes(b"z" * 7 + frame + os.urandom(len(data)))  # other frames before and after it
    buf = bytearray(len(data))
    fd = os.open(p, os.O_RDONLY)
    try:
        h = chunk.read_frame_into(fd, 7, buf, digest, frame_len=len(frame))
    finally:
        os.close(fd)
    assert h.codec == chunk.CODEC_ZSTD and bytes(buf) == data


def test_encode_keeps_a_small_saving_only_when_asked_to():
    data = os.urandom(95_000) + bytes(5_000)  # zstd saves about 5%
    _, default = chunk.encode(data)
    _, eager = chunk.encode(data, min_saving=0.0)
    assert chunk.parse_header(default).codec == chunk.CODEC_RAW
    assert chunk.parse_header(eager).codec == chunk.CODEC_ZSTD
    _, incompressible = chunk.encode(os.urandom(100_000), min_saving=0.0)
    assert chunk.parse_header(incompressible).codec == chunk.CODEC_RAW


# -- TieredStore.get_into ---------------------------------------------------------------------


@pytest.mark.parametrize("compress", ["never", "always"])
@pytest.mark.parametrize("layers", ["blob", "ssd+blob", "memory+ssd+blob", "remote"])
def test_get_into_returns_what_get_returns_for_loose_and_packed_chunks(tmp_path, compress, layers):
    files = {"big.bin": squeezable(300 * KiB, 1), "small/a": squeezable(3000, 2), "small/b": b"b" * 999}
    root = build(tmp_path, files, compress=compress)
    objects = _RemoteLike(root) if layers == "remote" else LocalObjectStore(root, create=False)
    store = casfs.Store(objects, cache_dir=str(tmp_path / "cache") if "ssd" in layers else None,
                        memory_bytes=(8 * MiB) if "memory" in layers else 0)
    with store:
        image = store.open_image("t")
        for name in files:
            for ref in image.chunk_refs(image.lookup(name)):
                buf = bytearray(ref.raw_len + 3)
                n = store.chunks.get_into(ref, buf, image.index.pack_members)
                assert n == ref.raw_len
                assert bytes(buf[:n]) == store.chunks.get(ref, image.index.pack_members)
        assert store.chunks.verify_failures == 0


def test_get_into_reads_the_local_blob_without_touching_the_memory_tier_by_default(tmp_path):
    data = os.urandom(256 * KiB)
    root = build(tmp_path, {"w.safetensors": data})
    with casfs.open_store(root, memory_bytes=8 * MiB) as s:
        image, refs = refs_of(s, "w.safetensors")
        buf = bytearray(64 * KiB)
        for r in refs:
            s.chunks.get_into(r, buf)
        assert s.memory.used == 0
        assert hits(s)["blob"] == len(refs)
        for r in refs:
            s.chunks.get_into(r, buf, fill_memory=True)
        assert s.memory.used == len(data)
        before = hits(s)
        out = bytearray(len(data))
        assert image.read_into(image.lookup("w.safetensors"), 0, out) == len(data)
        assert bytes(out) == data
        assert hits(s)["memory"] - before["memory"] == len(refs)  # memory hits are copied out
        assert hits(s)["blob"] == before["blob"]


def test_get_into_fills_the_ssd_tier_so_the_next_process_reads_from_it(tmp_path):
    data = os.urandom(512 * KiB)
    root = build(tmp_path, {"w.safetensors": data})
    cache = str(tmp_path / "cache")
    with casfs.open_store(root, cache_dir=cache, memory_bytes=0) as s:
        image, refs = refs_of(s, "w.safetensors")
        out = bytearray(len(data))
        image.read_into(image.lookup("w.safetensors"), 0, out)
        s.chunks.flush()
        assert hits(s)["blob"] == len(refs) and hits(s)["ssd"] == 0
    with casfs.open_store(root, cache_dir=cache, memory_bytes=0) as s:
        image, refs = refs_of(s, "w.safetensors")
        out = bytearray(len(data))
        image.read_into(image.lookup("w.safetensors"), 0, out, hash_threads=1)
        assert bytes(out) == data
        assert hits(s)["ssd"] == len(refs) and hits(s)["blob"] == 0


def test_concurrent_get_and_get_into_of_one_chunk_share_one_fetch(tmp_path):
    data = os.urandom(MiB)
    root = build(tmp_path, {"w.safetensors": data}, chunk_size=MiB)
    objects = _RemoteLike(root, delay=0.1)
    with casfs.Store(objects, memory_bytes=0) as store:
        image, (ref,) = refs_of(store, "w.safetensors")
        before = objects.requests
        barrier = threading.Barrier(8)
        got: list[bytes] = []

        def reader(k: int) -> None:
            barrier.wait()
            if k % 2:
                got.append(store.chunks.get(ref))
            else:
                buf = bytearray(MiB)
                store.chunks.get_into(ref, buf)
                got.append(bytes(buf))

        ts = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert got == [data] * 8
        assert objects.requests - before == 1


def test_small_files_of_one_pack_read_into_buffers_cost_one_remote_request(tmp_path):
    files = {f"d/s{i:03d}": os.urandom(2000) for i in range(100)}
    root = build(tmp_path, files)
    objects = _RemoteLike(root)
    with casfs.Store(objects, memory_bytes=0) as store:
        image = store.open_image("t")
        before = objects.requests
        for name, data in files.items():
            buf = bytearray(len(data))
            assert image.read_into(image.lookup(name), 0, buf) == len(data)
            assert bytes(buf) == data
        assert objects.requests - before == 1


def test_get_into_refuses_small_read_only_and_strided_buffers(tmp_path):
    root = build(tmp_path, {"w.safetensors": os.urandom(100 * KiB)})
    with casfs.open_store(root) as s:
        _, refs = refs_of(s, "w.safetensors")
        with pytest.raises(ValueError, match="smaller"):
            s.chunks.get_into(refs[0], bytearray(refs[0].raw_len - 1))
        with pytest.raises(ValueError, match="read-only"):
            s.chunks.get_into(refs[0], bytes(refs[0].raw_len))
        with pytest.raises(ValueError, match="contiguous"):
            s.chunks.get_into(refs[0], memoryview(bytearray(2 * refs[0].raw_len))[::2])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 300_000), size=st.integers(0, 300_000))
def test_any_range_read_into_a_buffer_equals_the_file_slice(tmp_path_factory, offset, size):
    d = tmp_path_factory.mktemp("range")
    data = squeezable(250_000, 3)
    root = build(d, {"f.bin": data, "f.txt": data}, chunk_size=16 * KiB)
    with casfs.open_store(root, memory_bytes=0) as s:
        image = s.open_image("t")
        for name in ("f.bin", "f.txt"):  # raw frames and zstd frames
            buf = bytearray(size)
            n = image.read_into(image.lookup(name), offset, buf)
            assert n == len(data[offset:offset + size])
            assert bytes(buf[:n]) == data[offset:offset + size]


# -- the build's compression policy -----------------------------------------------------------


def test_auto_stores_weight_files_raw_and_compresses_the_rest(tmp_path):
    blob = squeezable(200 * KiB)
    files = {f"m/w{sfx}": blob for sfx in WEIGHT_SUFFIXES} | {"m/W.SAFETENSORS": blob, "m/notes.txt": squeezable(200 * KiB, 9)}
    root = build(tmp_path, files)
    with casfs.open_store(root) as s:
        for sfx in WEIGHT_SUFFIXES:
            assert codecs(s, f"m/w{sfx}") == {chunk.CODEC_RAW}, sfx
        assert codecs(s, "m/W.SAFETENSORS") == {chunk.CODEC_RAW}
        assert codecs(s, "m/notes.txt") == {chunk.CODEC_ZSTD}


@pytest.mark.parametrize("policy, expect", [("always", chunk.CODEC_ZSTD), ("never", chunk.CODEC_RAW)])
def test_always_and_never_apply_to_every_file(tmp_path, policy, expect):
    blob = squeezable(200 * KiB)
    root = build(tmp_path, {"w.safetensors": blob, "notes.txt": squeezable(200 * KiB, 9)}, compress=policy)
    with casfs.open_store(root) as s:
        assert codecs(s, "w.safetensors") == {expect}
        assert codecs(s, "notes.txt") == {expect}


def test_an_unknown_compress_policy_is_refused(tmp_path, store):
    write_tree(tmp_path / "src", {"a": b"x"})
    with pytest.raises(BuildError, match="auto, always, never"):
        casfs.build(store, str(tmp_path / "src"), tag="t", compress="sometimes")
    with pytest.raises(ValueError, match="compress must be"):
        codec_choice("a", "zstd")


def test_the_cli_takes_a_compress_policy(tmp_path, capsys):
    write_tree(tmp_path / "src", {"w.safetensors": squeezable(100 * KiB)})
    root = str(tmp_path / "store")
    assert cli_main(["--store", root, "build", str(tmp_path / "src"), "-t", "z", "--compress", "always",
                     "--no-progress"]) == 0
    assert cli_main(["--store", root, "build", str(tmp_path / "src"), "-t", "r", "--no-progress"]) == 0
    with casfs.open_store(root) as s:
        assert codecs(s, "w.safetensors", "z") == {chunk.CODEC_ZSTD}
        # the second build found every chunk stored already: dedup keeps the existing frames
        assert codecs(s, "w.safetensors", "r") == {chunk.CODEC_ZSTD}
    with pytest.raises(SystemExit):
        cli_main(["--store", root, "build", str(tmp_path / "src"), "-t", "x", "--compress", "fast"])
