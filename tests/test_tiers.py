"""The tier contract (``casfs.tiers.base.Tier``), written once and run against every tier, each
over real storage:

    memory      ``MemoryCache``, the decoded-memory cache in front of the tiers (it holds
                verified bytes, not frames, and is not a frame tier: the frame-only clauses
                skip it)
    ssd         ``SsdTier`` over a fresh directory
    azcache     ``AzCacheTier`` against a real ``casfs cache-server`` (``CacheServer`` on
                127.0.0.1) filling from a local store directory
    blob-local  ``BlobTier`` over a ``LocalObjectStore`` (reads frames straight from files)
    blob-http   ``BlobTier`` over an ``HttpObjectStore`` against nginx
    blob-s3     ``BlobTier`` over an ``S3ObjectStore`` against moto's S3 server (in its own
                process)

Each case places chunks where its tier reads them (``put`` for the caches; objects in the blob
store behind ``blob-*`` and ``azcache``), loose and packed, and the same clauses are checked:
a held chunk comes back exactly and counts as a hit; one it does not hold is a miss, not an
error; ``contains``; ``read_into`` fills a buffer with verified bytes (through local files or
through the default get-and-decode, as the tier declares); pack spans where declared (else
NotImplementedError), frame ranges and frame parts likewise; ``put``/``delete`` on writable
tiers, PermissionError from read-only ones; concurrent readers; and a damaged copy (a flipped bit anywhere in the frame, a truncated
or an extended frame) is never served by a store reading through the tier, by ``get`` or
``get_into``: alone the store raises ChunkUnavailable, with a good tier below it returns the
good bytes, and a writable tier holds the good frame again afterwards.

The store-level properties (fills, eviction, single flight, packs in one request) are
``tests/test_tiered_store.py`` and ``tests/test_read_into.py``; node health and hedging of the
azcache tier are ``tests/test_azcache.py`` and ``tests/test_faults.py``. A new tier joins by
adding a row to ``_case``.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casfs import chunk as chunkmod
from casfs.cacheserver import CacheServer
from casfs.digest import digest_bytes
from casfs.errors import ChunkUnavailable, CorruptChunk, StoreError
from casfs.index import ChunkRef
from casfs.layout import chunk_key, pack_key
from casfs.objects.http import HttpObjectStore
from casfs.objects.local import LocalObjectStore
from casfs.tiered import TieredStore
from casfs.tiers.azcache import AzCacheTier
from casfs.tiers.blob import BlobTier
from casfs.tiers.memory import MemoryCache
from casfs.tiers.ssd import SsdTier
from conftest import S3_BUCKET

CASES = ["memory", "ssd", "azcache", "blob-local", "blob-http", "blob-s3"]
FRAME_TIERS = [c for c in CASES if c != "memory"]
_names = itertools.count()


# -- chunks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    ref: ChunkRef
    frame: bytes
    data: bytes


@dataclass(frozen=True)
class Chunks:
    """Loose chunks (own objects) and packed ones (frames back to back in one pack object)."""

    loose: list[Chunk]
    packed: list[Chunk]
    pack: tuple[bytes, bytes]  # (pack digest, pack bytes)

    @property
    def all(self) -> list[Chunk]:
        return self.loose + self.packed


def make_chunks(seed: int) -> Chunks:
    """Three loose chunks (1 byte, 300 KB random: stored raw, 200 KB text-like: zstd) and four
    small packed ones, all distinct for each seed."""
    rng = random.Random(seed)
    loose = []
    for data in (rng.randbytes(1), rng.randbytes(300_000),
                 bytes(b & 0x3F for b in rng.randbytes(200_000))):
        digest, frame = chunkmod.encode(data)
        loose.append(Chunk(ChunkRef(digest, len(data), len(frame)), frame, data))
    frames, packed_data = [], [rng.randbytes(rng.randrange(10, 5000)) for _ in range(4)]
    for data in packed_data:
        frames.append((data, *chunkmod.encode(data)))
    body = b"".join(f for _, _, f in frames)
    pd = digest_bytes(body)
    packed, off = [], 0
    for data, digest, frame in frames:
        packed.append(Chunk(ChunkRef(digest, len(data), len(frame), pd, off), frame, data))
        off += len(frame)
    return Chunks(loose, packed, (pd, body))


# -- the cases -------------------------------------------------------------------------------


@dataclass
class Case:
    """One tier under the contract.

    ``new()`` opens a fresh tier over this case's storage (tests that hand a tier to a
    TieredStore, which closes it, take their own). ``place(key, bytes)`` writes an object where
    the tier reads (the blob store behind ``blob-*`` and ``azcache``); None when the tier is a
    cache filled through its own ``put``.
    """

    name: str
    new: Callable[[], Any]
    place: Callable[[str, bytes], None] | None
    holds_frames: bool = True  # False: the memory cache holds verified bytes
    writable: bool = False
    reads_files: bool = False  # expected ``supports_read_into``
    store_verifies: bool = True  # damaged frames reach the store's digest check (azcache checks its own)

    def expect(self, c: Chunk) -> bytes:
        return c.frame if self.holds_frames else c.data

    def plant(self, tier: Any, chunks: list[Chunk], pack: tuple[bytes, bytes] | None = None) -> None:
        """Make ``tier`` hold ``chunks`` (and ``pack``, which holds the packed ones)."""
        if self.place is None:
            for c in chunks:
                tier.put(c.ref, self.expect(c))
            return
        for c in chunks:
            if c.ref.pack is None:
                self.place(chunk_key(c.ref.digest), c.frame)
        if pack is not None:
            self.place(pack_key(pack[0]), pack[1])


@pytest.fixture(scope="module")
def s3_objects(s3_endpoint):
    """One S3 store for the module (a boto3 client takes ~0.3 s to make here); tests do not
    collide in it: every key is the digest of that test's own chunks."""
    from casfs.objects.s3 import S3ObjectStore

    return S3ObjectStore(S3_BUCKET, "tiers", endpoint_url=s3_endpoint)


def _case(name: str, request, tmp_path, closers: list) -> Case:
    if name == "memory":
        return Case(name, lambda: MemoryCache(64 << 20), None, holds_frames=False, writable=True)
    if name == "ssd":
        dirs = itertools.count()
        return Case(name, lambda: SsdTier(str(tmp_path / f"ssd{next(dirs)}"), 64 << 20), None,
                    writable=True, reads_files=True)
    if name == "azcache":
        behind = LocalObjectStore(str(tmp_path / "behind"))
        server = CacheServer(behind, memory_bytes=8 << 20).start()
        closers.append(server.close)

        def new() -> AzCacheTier:
            tier = AzCacheTier([server.url])
            closers.append(tier.close)
            return tier

        return Case(name, new, behind.put, store_verifies=False)
    if name == "blob-local":
        objects = LocalObjectStore(str(tmp_path / "blob"))
        return Case(name, lambda: BlobTier(objects), objects.put, reads_files=True)
    if name == "blob-http":
        root, url = request.getfixturevalue("web_root")
        sub = f"t{next(_names)}"
        served = LocalObjectStore(os.path.join(root, sub))
        objects = HttpObjectStore(url + sub + "/", backoff=0.01)
        closers.append(objects.close)
        closers.append(lambda: shutil.rmtree(served.root, ignore_errors=True))
        return Case(name, lambda: BlobTier(objects), served.put)
    if name == "blob-s3":
        objects = request.getfixturevalue("s3_objects")
        return Case(name, lambda: BlobTier(objects), objects.put)
    raise AssertionError(name)


@pytest.fixture(params=CASES)
def case(request, tmp_path) -> Iterator[Case]:
    closers: list = []
    try:
        yield _case(request.param, request, tmp_path, closers)
    finally:
        for close in reversed(closers):
            close()


@pytest.fixture(params=FRAME_TIERS)
def frame_case(request, tmp_path) -> Iterator[Case]:
    closers: list = []
    try:
        yield _case(request.param, request, tmp_path, closers)
    finally:
        for close in reversed(closers):
            close()


def good_blob(tmp_path, chunks: list[Chunk]) -> BlobTier:
    """A blob tier over a fresh local store holding the good frames of ``chunks`` (loose)."""
    objects = LocalObjectStore(str(tmp_path / f"good{next(_names)}"))
    for c in chunks:
        objects.put(chunk_key(c.ref.digest), c.frame)
    return BlobTier(objects, name="good")


# -- the contract ----------------------------------------------------------------------------


def test_a_held_chunk_comes_back_exactly_and_counts_as_a_hit(case):
    tier = case.new()
    cs = make_chunks(1)
    case.plant(tier, cs.all, cs.pack)
    for c in cs.all:
        assert tier.get(c.ref) == case.expect(c), c.ref
    st_ = tier.stats()
    assert st_.name == tier.name
    assert (st_.hits, st_.misses, st_.errors) == (len(cs.all), 0, 0)
    assert st_.bytes_read == sum(len(case.expect(c)) for c in cs.all)
    assert st_.as_dict()["hits"] == len(cs.all)


def test_a_chunk_it_does_not_hold_is_a_miss_not_an_error(case):
    tier = case.new()
    held, absent = make_chunks(2), make_chunks(3)
    case.plant(tier, held.all, held.pack)
    for c in absent.all:
        assert tier.get(c.ref) is None, c.ref
        assert not tier.contains(c.ref)
    st_ = tier.stats()
    assert (st_.hits, st_.misses, st_.errors) == (0, len(absent.all), 0)


def test_contains_is_true_for_every_held_chunk(case):
    tier = case.new()
    cs = make_chunks(4)
    case.plant(tier, cs.all, cs.pack)
    assert all(tier.contains(c.ref) for c in cs.all)


def test_read_into_fills_a_buffer_with_the_verified_bytes_or_reports_a_miss(frame_case):
    tier = frame_case.new()
    assert tier.supports_read_into == frame_case.reads_files  # files: preadv; else get + decode
    cs, absent = make_chunks(5), make_chunks(6)
    frame_case.plant(tier, cs.all, cs.pack)
    for c in cs.all:
        buf = bytearray(c.ref.raw_len + 5)
        assert tier.read_into(c.ref, memoryview(buf)) == c.ref.raw_len
        assert bytes(buf[:c.ref.raw_len]) == c.data
    assert tier.read_into(absent.loose[1].ref, memoryview(bytearray(300_000))) is None


def test_pack_spans_are_slices_of_the_pack_where_the_tier_declares_them(frame_case):
    tier = frame_case.new()
    cs = make_chunks(7)
    frame_case.plant(tier, cs.all, cs.pack)
    pd, body = cs.pack
    if not tier.supports_spans:
        with pytest.raises(NotImplementedError, match="spans"):
            tier.get_span(pd, 0, len(body))
        return
    first = cs.packed[1].ref.pack_off
    assert tier.get_span(pd, first, len(body) - first) == body[first:]
    assert tier.get_span(pd, 0, len(body)) == body
    assert tier.get_span(make_chunks(8).pack[0], 0, 10) is None  # a pack it does not hold


def test_frame_ranges_are_slices_of_the_stored_frame_where_the_tier_declares_them(frame_case):
    tier = frame_case.new()
    cs = make_chunks(12)
    frame_case.plant(tier, cs.all, cs.pack)
    if not tier.supports_ranges:
        with pytest.raises(NotImplementedError, match="ranges"):
            tier.get_range(cs.loose[1].ref, 0, 48)
        return
    for c in cs.all:
        n = len(c.frame)
        for off, length in ((0, 48), (48, 100), (n - 10, 100), (n, 10)):
            assert tier.get_range(c.ref, off, length) == c.frame[off:off + length], (c.ref, off, length)
    assert tier.get_range(make_chunks(13).loose[1].ref, 0, 48) is None  # a chunk it does not hold


def test_frame_parts_round_trip_where_the_tier_keeps_them(frame_case):
    tier = frame_case.new()
    c = make_chunks(14).loose[1]
    if not tier.supports_parts:
        for call in (lambda: tier.get_part(c.ref, "m"), lambda: tier.put_part(c.ref, "m", b"x"),
                     lambda: tier.drop_part(c.ref, "m")):
            with pytest.raises(NotImplementedError, match="parts"):
                call()
        return
    assert tier.get_part(c.ref, "m") is None
    tier.put_part(c.ref, "m", c.frame[:48])
    tier.put_part(c.ref, "0", b"block zero")
    assert tier.get_part(c.ref, "m") == c.frame[:48] and tier.get_part(c.ref, "0") == b"block zero"
    assert not tier.contains(c.ref)  # parts do not make a whole frame
    tier.drop_part(c.ref, "0")
    assert tier.get_part(c.ref, "0") is None and tier.get_part(c.ref, "m") == c.frame[:48]
    with pytest.raises(ValueError):
        tier.put_part(c.ref, "../m", b"x")  # a part is "m" or a block number


def test_put_and_delete_work_on_a_writable_tier_and_a_read_only_one_refuses_both(case):
    tier = case.new()
    c = make_chunks(9).loose[1]
    if not case.writable:
        assert not tier.writable
        with pytest.raises(PermissionError):
            tier.put(c.ref, c.frame)
        with pytest.raises(PermissionError):
            tier.delete(c.ref)
        return
    assert getattr(tier, "writable", True)
    tier.put(c.ref, case.expect(c))
    assert tier.get(c.ref) == case.expect(c) and tier.contains(c.ref)
    tier.delete(c.ref)
    assert tier.get(c.ref) is None and not tier.contains(c.ref)
    tier.delete(c.ref)  # deleting a missing chunk is not an error


def test_concurrent_readers_each_get_their_own_chunk(case):
    tier = case.new()
    cs = make_chunks(10)
    case.plant(tier, cs.all, cs.pack)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            c = rng.choice(cs.all)
            if tier.get(c.ref) != case.expect(c):
                errors.append(c.ref.digest.hex()[:12])

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert errors == []


def _damage(frame: bytes, how: str, pos: int = 0, bit: int = 0) -> bytes:
    if how == "flip":
        raw = bytearray(frame)
        raw[pos % len(raw)] ^= 1 << bit
        return bytes(raw)
    if how == "truncate":
        return frame[:-7]
    if how == "append":
        return frame + b"\0"
    raise AssertionError(how)


def _hold(case: Case, tier: Any, c: Chunk, frame: bytes) -> None:
    """Make ``tier`` hold ``frame`` (good or damaged) as the frame of ``c``."""
    if case.place is None:
        tier.delete(c.ref)  # a cache keeps the first copy of a digest: replace it
        tier.put(c.ref, frame)
    else:
        case.place(chunk_key(c.ref.digest), frame)


def _check_never_served(case: Case, tmp_path, c: Chunk, damaged: bytes) -> None:
    """A fresh tier of ``case`` holds ``damaged`` as the frame of ``c``: no read through it
    returns anything but ``c.data``."""
    tier = case.new()
    _hold(case, tier, c, damaged)
    with pytest.raises((CorruptChunk, StoreError)):
        tier.read_into(c.ref, memoryview(bytearray(c.ref.raw_len + 8)))

    # the store's digest check names the copy corrupt; azcache's client catches it first
    # (length and frame checks) and the server refuses to serve it (502)
    said = "corrupt" if case.store_verifies else "502"
    alone = TieredStore([tier], io_threads=2)
    with pytest.raises(ChunkUnavailable, match=said):
        alone.get(c.ref)
    _hold(case, tier, c, damaged)  # a cache evicted it: damage it again
    with pytest.raises(ChunkUnavailable, match=said):
        alone.get_into(c.ref, bytearray(c.ref.raw_len))
    assert alone.verify_failures == (2 if case.store_verifies else 0)
    assert tier.stats().errors >= 2  # each refusal is counted against the tier
    alone.close()

    tier = case.new()
    _hold(case, tier, c, damaged)
    good = good_blob(tmp_path, [c])
    with_good = TieredStore([tier, good], io_threads=2)
    try:
        assert with_good.get(c.ref) == c.data
        if case.writable:
            with_good.flush()
            assert chunkmod.decode(tier.get(c.ref), expect=c.ref.digest) == c.data  # evicted, refilled
            _hold(case, tier, c, damaged)
        buf = bytearray(c.ref.raw_len)
        assert with_good.get_into(c.ref, buf) == c.ref.raw_len and bytes(buf) == c.data
        assert good.stats().hits == 2
        assert with_good.verify_failures == (2 if case.store_verifies else 0)
        if case.writable:
            with_good.flush()
            assert chunkmod.decode(tier.get(c.ref), expect=c.ref.digest) == c.data
    finally:
        with_good.close()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(0, 10**9), bit=st.integers(0, 7), which=st.integers(0, 2))
def test_a_flipped_bit_anywhere_in_a_frame_is_never_served(frame_case, tmp_path_factory, pos, bit, which):
    c = make_chunks(random.Random(pos).randrange(1 << 30)).loose[which]
    _check_never_served(frame_case, tmp_path_factory.mktemp("flip"), c, _damage(c.frame, "flip", pos, bit))


@pytest.mark.parametrize("how", ["truncate", "append"])
def test_a_truncated_or_extended_frame_is_never_served(frame_case, tmp_path, how):
    c = make_chunks(11).loose[2]
    _check_never_served(frame_case, tmp_path, c, _damage(c.frame, how))
