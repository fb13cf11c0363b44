"""The pinned tier: bounded, verified on fill, shared by digest, leases and GPU-copy fences.

Pinned (page-locked) memory needs CUDA. Every test here except the last runs the tier's
bookkeeping over ``casfs.plain_memory`` (ordinary pageable memory, the allocator meant for
this and for CUDA-less hosts): the accounting, eviction, single flight, verification and the
store walk are the same code whatever memory backs the buffers. The last test allocates real
pinned memory and copies to a GPU; it skips without one.
"""

from __future__ import annotations

import os
import threading

import pytest

import casfs
from casfs import chunk as chunkmod
from casfs.errors import CasfsError, CorruptChunk
from casfs.index import ChunkRef
from casfs.tiers.pinned import size_class
from conftest import write_tree

KiB, MiB = 1 << 10, 1 << 20


def _chunk(n: int, seed: int = 0) -> tuple[ChunkRef, bytes]:
    data = (bytes([seed % 251]) + os.urandom(15)) * (n // 16) + os.urandom(n % 16)
    digest, frame = chunkmod.encode(data, compress=False)
    return ChunkRef(digest, len(data), len(frame)), data


def _tier(capacity: int) -> casfs.PinnedTier:
    return casfs.PinnedTier(capacity, allocator=casfs.plain_memory)


class _Fence:
    """Stands in for a torch.cuda.Event in plain-memory tests: done when told."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def test_size_classes_are_powers_of_two_from_64_kib():
    assert size_class(1) == size_class(64 * KiB) == 64 * KiB
    assert size_class(64 * KiB + 1) == 128 * KiB
    assert size_class(16 * MiB) == 16 * MiB and size_class(16 * MiB + 1) == 32 * MiB


def test_a_filled_chunk_reads_back_and_is_shared_by_digest():
    tier = _tier(4 * MiB)
    ref, data = _chunk(300 * KiB)
    calls = []

    def read(view):
        calls.append(1)
        view[:len(data)] = data
        return len(data)

    with tier.fill(ref, read) as c:
        assert bytes(c.view) == data and c.length == len(data)
        assert bytes(c.tensor.numpy()) == data  # plain memory: a CPU tensor over the same bytes
    with tier.fill(ref, read) as c2:  # a second fill of the same digest reads nothing
        assert bytes(c2.view) == data
    assert calls == [1]
    buf = bytearray(len(data))
    assert tier.read_into(ref, memoryview(buf)) == len(data) and bytes(buf) == data
    assert chunkmod.decode(tier.get(ref), ref.digest) == data
    assert tier.contains(ref) and tier.used == size_class(len(data)) and tier.held == len(data)


def test_concurrent_fills_of_one_chunk_read_it_once():
    tier = _tier(4 * MiB)
    ref, data = _chunk(1 * MiB, 1)
    gate = threading.Event()
    calls = []

    def read(view):
        calls.append(1)
        gate.wait(5)
        view[:len(data)] = data
        return len(data)

    out = []
    ts = [threading.Thread(target=lambda: out.append(bytes(tier.fill(ref, read).view))) for _ in range(6)]
    [t.start() for t in ts]
    gate.set()
    [t.join() for t in ts]
    assert calls == [1] and out == [data] * 6


def test_put_verifies_the_frame_and_a_bad_one_leaves_nothing_behind():
    tier = _tier(4 * MiB)
    ref, data = _chunk(200 * KiB, 2)
    frame = bytearray(chunkmod.encode(data, ref.digest, compress=False)[1])
    frame[-1] ^= 1
    with pytest.raises(CorruptChunk):
        tier.put(ref, bytes(frame))
    assert not tier.contains(ref) and tier.acquire(ref) is None
    tier.put(ref, chunkmod.encode(data, ref.digest, compress=False)[1])
    assert tier.contains(ref)


def test_a_read_that_fails_or_comes_up_short_drops_the_entry():
    tier = _tier(4 * MiB)
    ref, data = _chunk(100 * KiB, 3)

    def boom(view):
        raise OSError("disk gone")

    with pytest.raises(OSError):
        tier.fill(ref, boom)
    with pytest.raises(CasfsError, match="read 10 bytes"):
        tier.fill(ref, lambda view: 10)
    assert len(tier) == 0 and not tier.contains(ref)
    assert tier.fill(ref, lambda view: (view.__setitem__(slice(0, len(data)), data), len(data))[1]) is not None


def test_the_tier_stays_within_capacity_evicting_least_recently_used_chunks():
    tier = _tier(4 * MiB)  # room for four 1 MiB chunks
    refs = [_chunk(1 * MiB, s) for s in range(6)]
    for ref, data in refs[:4]:
        tier.fill(ref, lambda v, d=data: (v.__setitem__(slice(0, len(d)), d), len(d))[1]).release()
    tier.acquire(refs[0][0]).release()  # chunk 0 is now the most recently used
    for ref, data in refs[4:]:
        tier.fill(ref, lambda v, d=data: (v.__setitem__(slice(0, len(d)), d), len(d))[1]).release()
        assert tier.used <= tier.capacity
    held = [tier.contains(r) for r, _ in refs]
    assert held == [True, False, False, True, True, True] and tier.evictions == 2


def test_leased_chunks_and_chunks_a_gpu_copy_still_reads_are_never_evicted():
    tier = _tier(2 * MiB)
    (a, da), (b, db), (c, dc) = (_chunk(1 * MiB, s) for s in (10, 11, 12))
    fill = lambda ref, d: tier.fill(ref, lambda v: (v.__setitem__(slice(0, len(d)), d), len(d))[1])  # noqa: E731
    lease_a = fill(a, da)
    fence = _Fence()
    fill(b, db).release(after=fence)  # a copy from b is in flight
    assert fill(c, dc) is None and tier.full == 1  # nothing may go: a is leased, b is fenced
    fence.done = True
    got = fill(c, dc)  # b's copy finished: b is evicted, its buffer reused for c
    assert got is not None and bytes(got.view) == dc and not tier.contains(b)
    assert bytes(lease_a.view) == da  # the leased chunk kept its bytes throughout
    got.release()
    lease_a.release()
    assert tier.used <= tier.capacity


def test_a_chunk_deleted_while_a_copy_reads_it_is_freed_after_the_copy():
    tier = _tier(1 * MiB)
    (a, da), (b, db) = _chunk(1 * MiB, 20), _chunk(1 * MiB, 21)
    fence = _Fence()
    tier.fill(a, lambda v: (v.__setitem__(slice(0, len(da)), da), len(da))[1]).release(after=fence)
    tier.delete(a)
    assert not tier.contains(a)
    assert tier.fill(b, lambda v: len(db)) is None  # a's buffer is still being read
    fence.done = True
    assert tier.fill(b, lambda v: (v.__setitem__(slice(0, len(db)), db), len(db))[1]) is not None
    assert tier.used == 1 * MiB


def test_a_store_reads_through_its_pinned_tier_first(tmp_path):
    write_tree(tmp_path / "src", {"w.safetensors": os.urandom(3 * MiB + 5)})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", chunk_size=1 * MiB, progress=False)
    tier = _tier(8 * MiB)
    objects = casfs.open_store(str(tmp_path / "store")).objects
    store = casfs.Store(objects, memory_bytes=0, pinned=tier)
    image = store.open_image("t")
    e = image.lookup("w.safetensors")
    for ref in image.chunk_refs(e):  # fill the tier through the store's verified read
        tier.fill(ref, lambda v, r=ref: store.chunks.get_into(r, v)).release()
    blob_before = store.blob.stats().hits
    want = (tmp_path / "src" / "w.safetensors").read_bytes()
    buf = bytearray(len(want))
    assert image.read_into(e, 0, buf) == len(want) and bytes(buf) == want
    assert store.blob.stats().hits == blob_before  # every chunk came from the pinned tier
    assert tier.stats().hits >= 4
    store.close()
    assert len(tier) == 4  # a tier handed to a Store is the caller's: it outlives the store
    tier.free()
    assert len(tier) == 0 and tier.used == 0
    with casfs.open_store(str(tmp_path / "store"), pinned_bytes=1 * MiB) as own:
        assert own.pinned is not None and own.pinned.close_with_store  # freed with its store


def test_the_pinned_allocator_refuses_clearly_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    tier = casfs.PinnedTier(1 * MiB)  # cuda_pinned, the default
    ref, data = _chunk(1000, 30)
    with pytest.raises(CasfsError, match="needs a CUDA device"):
        tier.fill(ref, lambda v: len(data))


def test_pinned_chunks_copy_to_the_gpu_bit_exact():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (pinned memory)")
    tier = casfs.PinnedTier(64 * MiB)
    ref, data = _chunk(16 * MiB, 40)
    c = tier.fill(ref, lambda v: (v.__setitem__(slice(0, len(data)), data), len(data))[1])
    assert c.tensor.is_pinned()
    dst = torch.empty(len(data), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dst.copy_(c.tensor, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
    c.release(after=ev)
    ev.synchronize()
    assert bytes(dst.cpu().numpy()) == data
    tier.free()
