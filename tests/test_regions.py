"""snapshot's releasable memory regions: addresses kept across release and remap.

The CPU region (an anonymous mapping, released with madvise) runs here; the CUDA region is
checked on a GPU in tests/test_gpu_replica.py, and here only for its refusal without one.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import snapshot  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_released_cpu_region_gives_its_memory_back_and_keeps_its_addresses():
    r = snapshot.allocate_region(64 << 20, "cpu")
    t = r.tensor(0, (16 << 20,), torch.float32)
    t.fill_(1.5)
    addr = t.data_ptr()
    before = _rss()
    assert r.release() == r.nbytes and not r.mapped
    assert before - _rss() >= 48 << 20  # the pages went back to the kernel
    assert r.release() == 0  # twice is harmless
    r.remap()
    assert t.data_ptr() == addr == r.address and float(t.sum()) == 0.0  # same place, zero pages
    t.fill_(2.0)
    assert float(t[123]) == 2.0


def test_tensors_are_placed_by_aligned_offsets_and_never_outside_the_region():
    offsets, total = snapshot.region_layout([3, 300, 256, 0])
    assert offsets == [0, 256, 768, 1024] and total == 1024
    r = snapshot.allocate_region(total, "cpu")
    a, b = r.tensor(0, (3,), torch.uint8), r.tensor(256, (150,), torch.bfloat16)
    a.fill_(7)
    b.fill_(1)
    assert a.tolist() == [7, 7, 7] and b.data_ptr() - r.address == 256
    with pytest.raises(snapshot.RegionError):
        r.tensor(r.nbytes - 2, (4,), torch.uint8)
    with pytest.raises(snapshot.RegionError):
        r.tensor(100, (4,), torch.uint8)  # not aligned


def test_a_cuda_region_without_a_gpu_or_bindings_is_refused_with_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/test_gpu_replica.py covers CUDA regions")
    with pytest.raises((snapshot.GpuUnavailable, RuntimeError, AssertionError)):
        snapshot.allocate_region(1 << 20, "cuda")
    with pytest.raises(ValueError, match="regions live on"):
        snapshot.allocate_region(1 << 20, "meta")
