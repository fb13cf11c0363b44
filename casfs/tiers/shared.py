"""One host copy of verified chunks, mapped by several processes: a sealed shared-memory file.

Why (issue 12): the parked replicas of a model each unpark by copying the model's weights to
the GPU; from pinned host memory that is a DMA at PCIe speed (~50 GB/s), from the store's tiers
a verified read (4 GiB/s from the page cache). N replicas each holding their own pinned copy
would cost N x the weights in host RAM. Pinned memory cannot be handed between processes by
CUDA (CUDA IPC shares *device* memory only), so the sharing is the kernel's: one memfd holds the
chunks, every process maps it, and each registers its own mapping with CUDA
(``cudaHostRegister``: page-locked and DMA-mapped for that process's context; the pages exist
once). ``PinnedTier.adopt`` then lends each chunk to the process's pinned tier, and the weights
loader copies from it as from any pinned buffer.

Trust: only :meth:`SharedChunks.create` writes, and only through verified reads
(``Image.read_into``: every chunk checked against its blake3 digest); then the memfd is sealed
(``F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``), so from that moment no process
can change, shrink or grow it, and :meth:`attach` refuses a file without those seals. Readers do
not hash again. On GPUs that cannot register read-only memory (``seal_writes=False``: the
device attribute ``READ_ONLY_HOST_REGISTER_SUPPORTED`` is 0) the file is sealed against resizing
only and mapped writable; then the bytes are as safe as the processes that map them (ours).

Handing over: :meth:`spec` is a JSON-able dict (``/proc/<creator>/fd/<fd>``, the size, the seal
and each chunk's digest, offset and length); :meth:`attach` opens that path (same user), checks
size and seals, and maps it. The creator keeps the memfd open; the memory goes when the last
mapping and the creator's descriptor do.

Memory accounting: the pages belong to the memfd (``Shmem`` in /proc/meminfo); a process's
PSS (``/proc/PID/smaps_rollup``, ``Pss_Shmem``) counts 1/N of each page that N processes map.
The creator maps the file only while filling it.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from ..errors import CasfsError
from ..index import ChunkRef
from .pinned import HostBuffer, PinnedTier

__all__ = ["SharedChunks"]

ALIGN = 4096  # every chunk starts on a page
SEALS_ALL = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
SEALS_SIZE = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MADV_POPULATE_READ = 22
# cudaHostRegister flags
REGISTER_PORTABLE = 0x01
REGISTER_READ_ONLY = 0x08

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


def _file_chunks(image: Any, paths: Iterable[str]) -> list[tuple[ChunkRef, int, int]]:
    """(ref, entry, offset in the file) of every distinct chunk of ``paths``, in file order."""
    seen: set[bytes] = set()
    out = []
    for p in paths:
        entry = image.lookup(p)
        cs = image.file_chunk_size(entry)
        for j, ref in enumerate(image.chunk_refs(entry)):
            if ref.raw_len and ref.digest not in seen:
                seen.add(ref.digest)
                out.append((ref, entry, j * cs))
    return out


class SharedChunks:
    """Verified chunks in one sealed memfd (see the module docstring). Make one with
    :meth:`create` (the owner) or :meth:`attach` (another process); ``close()`` when done.

    Attributes: ``size`` (bytes of the file), ``chunks`` (digest -> (offset, length)),
    ``sealed_writes`` (writes sealed: mapped read-only), ``address`` (where this process maps
    it; 0 for the owner, which does not), ``registered`` (pinned by CUDA in this process).
    """

    def __init__(self, fd: int, size: int, chunks: dict[bytes, tuple[int, int]], sealed_writes: bool,
                 *, owner: bool) -> None:
        self.fd = fd
        self.size = size
        self.chunks = chunks
        self.sealed_writes = sealed_writes
        self.owner = owner
        self.address = 0
        self.registered = False
        self.fill_seconds = 0.0
        self._lock = threading.Lock()

    # -- the owner ------------------------------------------------------------------------------

    @classmethod
    def create(cls, image: Any, paths: Iterable[str], *, seal_writes: bool = True, threads: int = 8,
               name: str = "casfs-chunks") -> "SharedChunks":
        """A memfd holding every distinct chunk of the files ``paths`` of ``image``, each read
        with ``Image.read_into`` (verified), then sealed. Blocks until filled.

        Raises:
            casfs.ChunkUnavailable / casfs.PathNotFound / casfs.CorruptIndex: a chunk could not
                be read or verified (nothing is left behind).
            CasfsError: the host cannot make a sealed memfd (the reason included).
        """
        t0 = time.perf_counter()
        todo = _file_chunks(image, paths)
        layout: dict[bytes, tuple[int, int]] = {}
        off = 0
        for ref, _, _ in todo:
            layout[ref.digest] = (off, ref.raw_len)
            off += -(-ref.raw_len // ALIGN) * ALIGN
        size = max(off, ALIGN)
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError) as e:
            raise CasfsError(f"shared chunks need memfd_create with sealing: {e}") from None
        try:
            os.ftruncate(fd, size)
            base = _map(fd, size, mmap.PROT_READ | mmap.PROT_WRITE, name)
            try:
                def fill(item: tuple[ChunkRef, int, int]) -> None:
                    ref, entry, foff = item
                    o, n = layout[ref.digest]
                    view = memoryview((ctypes.c_char * n).from_address(base + o)).cast("B")
                    got = image.read_into(entry, foff, view, hash_threads=1)
                    if got != n:
                        raise CasfsError(f"chunk {ref.digest.hex()[:16]}… read {got} bytes, its index says {n}")

                with ThreadPoolExecutor(max(1, threads)) as pool:
                    for _ in pool.map(fill, todo):
                        pass
            finally:
                _libc.munmap(base, size)  # the owner keeps no mapping (views over it are dead now)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS_ALL if seal_writes else SEALS_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self = cls(fd, size, layout, seal_writes, owner=True)
        self.fill_seconds = time.perf_counter() - t0
        return self

    def spec(self) -> dict:
        """What another process needs to :meth:`attach` (JSON-able). Valid while this owner is open."""
        if self.fd < 0:
            raise CasfsError("the shared chunks are closed")
        return {"path": f"/proc/{os.getpid()}/fd/{self.fd}", "size": self.size, "sealed_writes": self.sealed_writes,
                "chunks": [[d.hex(), o, n] for d, (o, n) in self.chunks.items()]}

    # -- any process ----------------------------------------------------------------------------

    @classmethod
    def attach(cls, spec: dict) -> "SharedChunks":
        """Map the chunks another process created (its :meth:`spec`): read-only when its writes
        are sealed. Pages are not read yet (see :meth:`populate` and :meth:`register`).

        Raises:
            CasfsError: the file is gone, has another size, or lacks the seals its spec claims.
        """
        path = str(spec.get("path", ""))
        try:
            fd = os.open(path, (os.O_RDONLY if spec.get("sealed_writes", True) else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise CasfsError(f"cannot open the shared chunks at {path}: {e.strerror} (is their owner still running?)") from None
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            want = SEALS_ALL if spec.get("sealed_writes", True) else SEALS_SIZE
            if seals & want != want:
                raise CasfsError(f"{path} is not sealed as its owner said (seals {seals:#x}, need {want:#x}): "
                                 "refusing to trust its bytes")
            size = int(spec["size"])
            if os.fstat(fd).st_size != size:
                raise CasfsError(f"{path} is {os.fstat(fd).st_size} bytes, its spec says {size}")
            chunks = {bytes.fromhex(d): (int(o), int(n)) for d, o, n in spec["chunks"]}
            if any(o < 0 or o + n > size for o, n in chunks.values()):
                raise CasfsError(f"{path}: a chunk lies outside the {size}-byte file")
            sealed = bool(spec.get("sealed_writes", True))
            addr = _map(fd, size, mmap.PROT_READ if sealed else mmap.PROT_READ | mmap.PROT_WRITE, path)
        finally:
            os.close(fd)
        self = cls(-1, size, chunks, sealed, owner=False)
        self.address = int(addr)
        return self

    def populate(self) -> float:
        """Map every page now (so a process's PSS shows its share); returns the seconds."""
        self._mapped()
        t0 = time.perf_counter()
        if _libc.madvise(self.address, self.size, MADV_POPULATE_READ) != 0:  # Linux < 5.14: touch
            view = (ctypes.c_char * self.size).from_address(self.address)
            for o in range(0, self.size, mmap.PAGESIZE):
                view[o]
        return time.perf_counter() - t0

    def register(self) -> float:
        """Page-lock this process's mapping for CUDA (``cudaHostRegister``, read-only when the
        writes are sealed); a no-op when registered. Returns the seconds it took.

        Raises:
            CasfsError: without torch and CUDA, or when the driver refuses (its error named).
        """
        self._mapped()
        with self._lock:
            if self.registered:
                return 0.0
            rt = _cudart()
            flags = REGISTER_PORTABLE | (REGISTER_READ_ONLY if self.sealed_writes else 0)
            t0 = time.perf_counter()
            err = _code(rt.cudaHostRegister(self.address, self.size, flags))
            if err:
                raise CasfsError(f"cudaHostRegister of {self.size} bytes of shared chunks failed: CUDA error {err}"
                                 + (" (read-only registration: does this GPU support it?)" if self.sealed_writes else ""))
            self.registered = True
            return time.perf_counter() - t0

    def unregister(self) -> float:
        """Undo :meth:`register` (e.g. before the driver suspends the process); returns the seconds."""
        with self._lock:
            if not self.registered:
                return 0.0
            t0 = time.perf_counter()
            err = _code(_cudart().cudaHostUnregister(self.address))
            self.registered = False
            if err:
                raise CasfsError(f"cudaHostUnregister of the shared chunks failed: CUDA error {err}")
            return time.perf_counter() - t0

    def lend_to(self, tier: PinnedTier) -> int:
        """Lend every chunk to ``tier`` (``PinnedTier.adopt``); returns how many it took. Keep
        this object open while the tier may copy from them."""
        self._mapped()
        torch = _torch_or_none()
        n = 0
        for digest, (o, length) in self.chunks.items():
            raw = (ctypes.c_char * max(1, length)).from_address(self.address + o)
            tensor = torch.frombuffer(raw, dtype=torch.uint8, count=length) if torch is not None and length else None
            buf = HostBuffer(length, self.address + o, memoryview(raw).cast("B")[:length], tensor, self)
            n += tier.adopt(ChunkRef(digest, length, length), buf)
        return n

    def close(self) -> None:
        """Unregister, unmap, close the owner's descriptor. Tensors and tiers that still point
        here must be dropped first."""
        if self.registered:
            try:
                self.unregister()
            except CasfsError:
                pass
        if self.address:
            _libc.munmap(self.address, self.size)
            self.address = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _mapped(self) -> None:
        if not self.address:
            raise CasfsError("the shared chunks are not mapped in this process: attach() them (the owner does not map them)")

    def __enter__(self) -> "SharedChunks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map(fd: int, size: int, prot: int, what: str) -> int:
    """mmap(MAP_SHARED) through libc: an address, with no Python buffer export to outlive."""
    addr = _libc.mmap(None, size, prot, mmap.MAP_SHARED, fd, 0)
    if addr in (None, MAP_FAILED):
        raise CasfsError(f"mapping {what} ({size} bytes) failed: {os.strerror(ctypes.get_errno())}")
    return int(addr)


def _torch_or_none() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _cudart() -> Any:
    torch = _torch_or_none()
    if torch is None or not torch.cuda.is_available():
        raise CasfsError("registering shared chunks with CUDA needs torch with a CUDA device")
    rt = torch.cuda.cudart()
    if not hasattr(rt, "cudaHostRegister") or not hasattr(rt, "cudaHostUnregister"):
        raise CasfsError(f"torch {torch.__version__} does not expose cudaHostRegister")
    return rt


def _code(res: Any) -> int:
    """The integer of a cudaError torch returns (an enum or an int)."""
    v = getattr(res, "value", res)
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0 if str(res).endswith("success") else -1
