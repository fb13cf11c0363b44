"""Memory regions whose physical memory can be given back while their addresses stay reserved.

A replica puts its weights and its KV cache in such regions so that, before a snapshot or while
it is parked, it can free that memory (a GPU snapshot then carries neither) and later get memory
back *at the same addresses*: the CUDA graphs it captured point at those addresses and stay
valid, so nothing is recompiled or re-captured ("weights out, graphs in").

* ``CudaRegion`` (a GPU): the CUDA virtual memory API through ``cuda.bindings.driver``:
  ``cuMemAddressReserve`` keeps the address range; ``cuMemCreate`` + ``cuMemMap`` +
  ``cuMemSetAccess`` back it with physical memory; ``release`` is ``cuMemUnmap`` +
  ``cuMemRelease`` (the reservation stays), ``remap`` maps fresh physical memory at the same
  address. Measured on the H100 (DESIGN.md): releasing 4 GiB of weights before a driver
  checkpoint cut the checkpoint from 2.6 s to 0.55 s and the restore from 0.98 s to 0.46 s; the
  graph replayed identically after the weights were copied back.
* ``HostRegion`` (the CPU): an anonymous ``mmap``; ``release`` is ``madvise(MADV_DONTNEED)``
  (the kernel takes the pages back, the mapping stays; touched again, they read as zeros) and
  ``remap`` has nothing to do. The same contract, so a CPU replica runs the same code path.

``tensor(offset, shape, dtype)`` gives a tensor over part of a region. Each call makes a tensor
of its own (not a view of another torch tensor), so torch.compile sees distinct inputs with no
aliasing between them. Contents after ``release`` + ``remap`` are unspecified (zeros on the
CPU): the owner refills them (weights from casfs, the KV cache zeroed).
"""

from __future__ import annotations

import mmap
import threading
from typing import TYPE_CHECKING, Any

from .compat import GpuUnavailable

if TYPE_CHECKING:
    import torch

__all__ = ["CudaRegion", "HostRegion", "MemoryRegion", "RegionError", "allocate_region", "region_layout"]

ALIGN = 256  # bytes: every tensor handed out starts at a multiple of this


class RegionError(RuntimeError):
    """A region operation failed (a CUDA driver error, a tensor outside the region, use after close)."""


class MemoryRegion:
    """Common part of a region: ``nbytes`` (its size, rounded up to the granularity),
    ``address`` (where it starts, fixed for its lifetime), ``mapped`` (backed by memory now)."""

    nbytes: int
    address: int
    mapped: bool
    device: "torch.device"

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: "torch.dtype") -> "torch.Tensor":
        """A tensor of ``shape``/``dtype`` over ``[offset, offset + its bytes)`` of the region.

        Raises:
            RegionError: the range falls outside the region, or ``offset`` is not aligned.
        """
        import torch

        n = 1
        for s in shape:
            n *= int(s)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset % ALIGN or offset + nbytes > self.nbytes:
            raise RegionError(f"tensor of {nbytes} bytes at offset {offset} does not fit a "
                              f"{self.nbytes}-byte region (offsets must be multiples of {ALIGN})")
        raw = self._raw(offset, nbytes)
        return raw.view(dtype).view(tuple(shape)) if nbytes else torch.empty(tuple(shape), dtype=dtype,
                                                                             device=self.device)

    def _raw(self, offset: int, nbytes: int) -> "torch.Tensor":
        raise NotImplementedError

    def release(self) -> int:
        """Give the physical memory back, keeping the addresses; returns the bytes freed
        (0 when already released). Tensors over the region must not be used until ``remap``."""
        raise NotImplementedError

    def remap(self) -> None:
        """Back the region with memory again, at the same addresses (a no-op when mapped)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the region for good (memory and addresses). Tensors over it are invalid after."""
        raise NotImplementedError


def region_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets for buffers of ``sizes`` bytes packed in one region, each ``ALIGN``-aligned,
    and the total size."""
    offsets, off = [], 0
    for n in sizes:
        offsets.append(off)
        off += -(-int(n) // ALIGN) * ALIGN
    return offsets, off


class HostRegion(MemoryRegion):
    """A region of CPU memory: an anonymous private mapping (see the module docstring)."""

    def __init__(self, nbytes: int) -> None:
        import torch

        page = mmap.PAGESIZE
        self.nbytes = max(page, -(-int(nbytes) // page) * page)
        self._mm: mmap.mmap | None = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._base = torch.frombuffer(self._mm, dtype=torch.uint8)
        self.address = self._base.data_ptr()
        self.mapped = True
        self.device = torch.device("cpu")

    def _raw(self, offset: int, nbytes: int) -> "torch.Tensor":
        import torch

        if self._mm is None:
            raise RegionError("the region is closed")
        return torch.frombuffer(self._mm, dtype=torch.uint8, count=nbytes, offset=offset)

    def release(self) -> int:
        if self._mm is None:
            raise RegionError("the region is closed")
        if not self.mapped:
            return 0
        self._mm.madvise(mmap.MADV_DONTNEED)
        self.mapped = False
        return self.nbytes

    def remap(self) -> None:
        if self._mm is None:
            raise RegionError("the region is closed")
        self.mapped = True  # the kernel hands out zero pages on first touch

    def close(self) -> None:
        # The mapping goes when the last tensor over it does (tensors hold the buffer).
        self._mm = None
        self._base = None  # type: ignore[assignment]
        self.mapped = False


_drv_lock = threading.Lock()
_drv: Any = None


def _driver() -> Any:
    global _drv
    with _drv_lock:
        if _drv is None:
            try:
                from cuda.bindings import driver
            except ImportError as e:
                raise GpuUnavailable(f"CUDA regions need cuda-bindings: pip install 'casfs[gpu]' ({e})") from None
            _drv = driver
        return _drv


class CudaRegion(MemoryRegion):
    """A region of device memory through the CUDA virtual memory API (see the module docstring).

    Create it on the thread and device where the process's CUDA context is current (torch's
    primary context: any torch CUDA call on ``device`` first makes it so).
    """

    def __init__(self, nbytes: int, device_index: int = 0) -> None:
        import torch

        d = _driver()
        self._d = d
        torch.cuda.init()
        torch.zeros(1, device=f"cuda:{device_index}")  # the primary context is current here now
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device_index
        self._prop = prop
        gran = int(self._ok("cuMemGetAllocationGranularity", d.cuMemGetAllocationGranularity(
            prop, d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)))
        self.nbytes = max(gran, -(-int(nbytes) // gran) * gran)
        self.address = int(self._ok("cuMemAddressReserve", d.cuMemAddressReserve(self.nbytes, 0, 0, 0)))
        self.device = torch.device("cuda", device_index)
        self._handle: Any = None
        self.mapped = False
        self._closed = False
        try:
            self.remap()
        except BaseException:
            self._d.cuMemAddressFree(self.address, self.nbytes)
            raise

    def _ok(self, what: str, res: Any) -> Any:
        err = res[0]
        if err != self._d.CUresult.CUDA_SUCCESS:
            try:
                name = self._d.cuGetErrorName(err)[1]
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:  # noqa: BLE001
                name = str(err)
            raise RegionError(f"{what} failed: {name} (region of {getattr(self, 'nbytes', 0)} bytes)")
        return res[1] if len(res) > 1 else None

    def _raw(self, offset: int, nbytes: int) -> "torch.Tensor":
        import torch

        if self._closed:
            raise RegionError("the region is closed")

        class _Interface:  # a view of device memory torch wraps without copying
            __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                        "data": (self.address + offset, False), "version": 3}

        return torch.as_tensor(_Interface(), device=self.device)

    def remap(self) -> None:
        if self._closed:
            raise RegionError("the region is closed")
        if self.mapped:
            return
        d = self._d
        handle = self._ok("cuMemCreate", d.cuMemCreate(self.nbytes, self._prop, 0))
        try:
            self._ok("cuMemMap", d.cuMemMap(self.address, self.nbytes, 0, handle, 0))
            acc = d.CUmemAccessDesc()
            acc.location = self._prop.location
            acc.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            self._ok("cuMemSetAccess", d.cuMemSetAccess(self.address, self.nbytes, [acc], 1))
        except BaseException:
            d.cuMemUnmap(self.address, self.nbytes)
            d.cuMemRelease(handle)
            raise
        self._handle = handle
        self.mapped = True

    def release(self) -> int:
        if self._closed:
            raise RegionError("the region is closed")
        if not self.mapped:
            return 0
        import torch

        torch.cuda.synchronize(self.device)  # nothing in flight may still touch the memory
        self._ok("cuMemUnmap", self._d.cuMemUnmap(self.address, self.nbytes))
        self._ok("cuMemRelease", self._d.cuMemRelease(self._handle))
        self._handle = None
        self.mapped = False
        return self.nbytes

    def close(self) -> None:
        if self._closed:
            return
        if self.mapped:
            self.release()
        self._ok("cuMemAddressFree", self._d.cuMemAddressFree(self.address, self.nbytes))
        self._closed = True


def allocate_region(nbytes: int, device: Any = "cpu") -> MemoryRegion:
    """A region of at least ``nbytes`` bytes on ``device`` ("cpu" or "cuda[:N]", or a torch.device).

    Raises:
        GpuUnavailable: a CUDA device without cuda-bindings.
        RegionError: the driver refused (e.g. out of memory).
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        return HostRegion(nbytes)
    if dev.type == "cuda":
        return CudaRegion(nbytes, dev.index if dev.index is not None else torch.cuda.current_device())
    raise ValueError(f"regions live on 'cpu' or 'cuda[:N]', not {device!r}")
