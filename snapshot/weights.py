"""Stream safetensors weights from a casfs image straight into tensors on the CPU or a GPU.

The file is never read through FUSE and never staged whole: its chunk references come from the
image index, and ``concurrency`` worker threads read verified chunks from the store's tiers in
file order with ``Image.read_into`` (``TieredStore.get_into``: memory -> ssd -> cache servers
-> blob, every byte checked against its blake3 digest, nothing put into the memory tier). Each
chunk is read straight into where its bytes go:

* CUDA destinations: from the store's pinned tier (``casfs.PinnedTier``) when it holds the
  chunk, else into a buffer of that tier (kept for the next load), else into a pinned staging
  slot (a ring of two slots per worker; a raw chunk from a local file goes from the page cache
  into the slot with one ``preadv`` and is hashed there); then asynchronous host-to-device
  copies on one of several CUDA streams; an event per slot (or per pinned chunk, released to
  the tier with it) says when the memory may be reused. Pageable memory would cap the copy near
  3 GB/s; pinned memory runs at PCIe speed.
* CPU destinations: a chunk that lies inside one contiguous tensor is read straight into the
  tensor's memory; a chunk that spans tensors is read into a per-worker buffer and moved with
  ``memmove`` (no GIL).

A safetensors file is untrusted input: an 8-byte little-endian header length, a JSON header,
then the data region. ``parse_header`` (``casfs.parse_safetensors_header``, the one parser,
shared with the FUSE mount's prefetch) bounds the header length, rejects duplicate keys,
unknown dtypes, non-integer or negative shapes and offsets, sizes that disagree with
dtype x shape, tensors outside the data region and tensors that overlap. A header that lies
can only produce ``InvalidSafetensors``, never an out-of-bounds copy.

Because chunks are content-addressed, a file (or the chunk-aligned parts of one) that two
models share is fetched from the blob tier once: the second load is served by the upper tiers.

Speed (H200 machine, 2026-12-04, docs/benchmarks.md "Weights on the H200"): a 4.17 GB file with
``casfs.build``'s defaults (16 MiB raw chunks for weight files) loads at 23.3 GB/s warm with 16
workers, every byte verified: 3.9x ``safetensors.torch.load_file(device="cuda")`` in the same
run and 0.79x an unverified 8-thread pread into pinned memory. The verified read path alone
tops out at 25.6 GB/s there (blake3, one thread per worker), which bounds this loader. From the
pinned tier (chunks already in page-locked memory) a load is host-to-device copies alone:
49.8 GB/s, 94% of the 52.9 GB/s copy ceiling. Cold, the disk is the limit (2.1 GB/s against
1.6 for ``load_file``). Slot events are blocking (a waiting worker sleeps instead of spinning
beside the hashing threads); pinned slots are allocated on first use, so a load served by the
pinned tier allocates none. zstd chunks decompress at ~0.55 GiB/s a core and stay slow.
On an error, destination tensors hold unspecified bytes.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import casfs
from casfs import InvalidSafetensors, SafetensorsHeader, TensorInfo
from casfs import SAFETENSORS_DTYPES as DTYPES
from casfs import parse_safetensors_header as parse_header
from casfs import parse_safetensors_index as parse_shard_index
from casfs import safetensors_header_length as header_length

if TYPE_CHECKING:  # torch is imported lazily: ``import snapshot`` must not need it
    import torch

__all__ = [
    "InvalidSafetensors",
    "LoadStats",
    "ModuleMismatch",
    "SafetensorsHeader",
    "TensorInfo",
    "load_into_module",
    "load_safetensors",
    "parse_header",
    "read_header",
]

DEFAULT_CONCURRENCY = 16
DEFAULT_STREAMS = 4
SLOTS_PER_WORKER = 2


class ModuleMismatch(ValueError):
    """A module's parameters do not match a file's tensors (missing, unexpected or wrong shape)."""


@dataclass
class LoadStats:
    """What one load moved and how long it took (filled in by the loaders when passed)."""

    tensors: int = 0
    bytes: int = 0  # tensor bytes delivered
    chunks: int = 0  # chunk fetches
    chunk_bytes: int = 0
    pinned_bytes: int = 0  # chunk bytes copied to the GPU from the pinned tier (hit or filled)
    seconds: float = 0.0
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)  # tier -> counter deltas

    @property
    def gib_per_s(self) -> float:
        return self.bytes / (1 << 30) / self.seconds if self.seconds else 0.0


# ------------------------------------------------------------------------------------------
# Sources


def _resolve(source: "casfs.Image | casfs.Store", path: str) -> tuple["casfs.Image", str]:
    """(image, path inside it). A Store takes ``"<tag-or-image-id>/<path inside the image>"``."""
    if isinstance(source, casfs.Image):
        return source, path.lstrip("/")
    if isinstance(source, casfs.Store):
        ref, sep, inner = path.lstrip("/").partition("/")
        if not sep or not inner:
            raise ValueError(f"with a Store, name the file as '<tag-or-image-id>/<path>', got {path!r}")
        return source.open_image(ref), inner
    raise TypeError(f"expected a casfs.Image or casfs.Store, got {type(source).__name__}")


def _file_entry(image: "casfs.Image", path: str) -> tuple[int, int]:
    """(entry number, size) of the regular file ``path``. Raises PathNotFound / NotAFile."""
    st = image.stat(path)
    if not st.is_file:
        raise casfs.NotAFile(f"{path!r} in image {image.name} is not a regular file")
    return image.lookup(path), st.size


def read_header(image: "casfs.Image", path: str) -> SafetensorsHeader:
    """Fetch and validate the header of the safetensors file ``path`` in ``image``.

    Raises:
        InvalidSafetensors, casfs.PathNotFound, casfs.NotAFile, casfs.ChunkUnavailable.
    """
    entry, size = _file_entry(image, path)
    what = f"{path} (image {image.name})"
    n = header_length(image.read_entry(entry, 0, 8) if size >= 8 else b"", size, what)
    raw = image.read_entry(entry, 8, n)
    if len(raw) != n:
        raise InvalidSafetensors(f"{what}: header is truncated ({len(raw)} of {n} bytes)")
    return parse_header(raw, size, what)


def _shard_paths(image: "casfs.Image", index_path: str) -> dict[str, list[str]]:
    """shard path -> tensor names, from a ``model.safetensors.index.json``."""
    entry, size = _file_entry(image, index_path)
    return parse_shard_index(lambda: image.read_entry(entry), size, index_path,
                             f"{index_path} (image {image.name})")


# ------------------------------------------------------------------------------------------
# Torch helpers


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the weights extra installs it
        raise ImportError(f"snapshot.weights needs torch: pip install 'casfs[weights]' ({e})") from None
    return torch


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype name. Raises InvalidSafetensors if torch lacks it."""
    torch = _torch()
    dt = getattr(torch, DTYPES[name][1], None)
    if dt is None:
        raise InvalidSafetensors(f"dtype {name} is not supported by torch {torch.__version__}")
    return dt


def _byte_view(t: "torch.Tensor") -> "torch.Tensor":
    """A 1-D uint8 view of contiguous tensor ``t``'s bytes (same memory)."""
    torch = _torch()
    flat = t.detach().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _address(data: bytes | bytearray) -> int:
    """Address of a bytes or bytearray object's buffer (valid while ``data`` is alive)."""
    if isinstance(data, bytearray):
        return ctypes.addressof(ctypes.c_char.from_buffer(data)) if data else 0
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


def _memory(ptr: int, n: int) -> memoryview:
    """A writable byte memoryview over ``n`` bytes at address ``ptr`` (pinned or tensor memory)."""
    return memoryview((ctypes.c_char * n).from_address(ptr)).cast("B")


# ------------------------------------------------------------------------------------------
# The streaming engine


@dataclass(slots=True)
class _Copy:
    src: int  # offset in the chunk
    n: int
    dst: Any  # 1-D uint8 tensor
    dst_off: int


@dataclass(slots=True)
class _Job:
    image: "casfs.Image"
    entry: int
    offset: int  # of the chunk in the file
    length: int  # expected decoded length of the chunk
    copies: list[_Copy]
    ref: "casfs.ChunkRef"


def _plan(image: "casfs.Image", path: str, header: SafetensorsHeader,
          dests: Mapping[str, "torch.Tensor"]) -> list[_Job]:
    """One job per chunk that holds bytes of some destination, in file order."""
    entry = image.lookup(path)
    cs = image.file_chunk_size(entry)
    refs = image.chunk_refs(entry)
    expect_chunks = -(-header.file_size // cs)
    if len(refs) != expect_chunks:
        raise casfs.CorruptIndex(f"{path}: index lists {len(refs)} chunks for a "
                                 f"{header.file_size}-byte file of {cs}-byte chunks")
    per_chunk: dict[int, list[_Copy]] = {}
    ds = header.data_start
    for name, dst in dests.items():
        info = header.tensors[name]
        if info.nbytes == 0:
            continue
        s, e = ds + info.begin, ds + info.end
        for j in range(s // cs, (e - 1) // cs + 1):
            lo, hi = max(s, j * cs), min(e, (j + 1) * cs)
            per_chunk.setdefault(j, []).append(_Copy(lo - j * cs, hi - lo, dst, lo - s))
    return [_Job(image, entry, j * cs, min(cs, header.file_size - j * cs), per_chunk[j], refs[j])
            for j in sorted(per_chunk)]


def _tier_counts(images: Iterable["casfs.Image"]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    for im in images:
        if id(im.store) in seen:
            continue
        seen.add(id(im.store))
        for st in casfs.tier_stats(im.store):
            d = out.setdefault(st.name, {"hits": 0, "misses": 0, "errors": 0, "bytes_read": 0})
            d["hits"] += st.hits
            d["misses"] += st.misses
            d["errors"] += st.errors
            d["bytes_read"] += st.bytes_read
    return out


def _run(jobs: list[_Job], concurrency: int, streams: int, stats: LoadStats | None,
         pinned: "casfs.PinnedTier | None" = None) -> None:
    """Fetch every job's chunk and perform its copies; returns when all bytes have landed.

    With ``pinned``, a chunk the tier holds is copied to the device straight from it (CPU
    destinations: moved from it), and for CUDA destinations a missing one is read into a buffer
    of the tier (then kept for the next load); when the tier has no free buffer, the worker's
    own pinned slots are used.

    Raises the first error any worker hit (casfs.ChunkUnavailable, casfs.CorruptIndex, ...).
    """
    if not jobs:
        return
    torch = _torch()
    cuda_devs = {c.dst.device for j in jobs for c in j.copies if c.dst.is_cuda}
    if len(cuda_devs) > 1:
        raise ValueError(f"one load targets one GPU; destinations span {sorted(map(str, cuda_devs))}")
    dev = next(iter(cuda_devs)) if cuda_devs else None
    workers = max(1, min(concurrency, len(jobs)))
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(jobs)):
        todo.put(i)
    errors: list[BaseException] = []
    stop = threading.Event()
    moved = [0] * workers
    from_pinned = [0] * workers
    stream_list: list[Any] = []
    slots: list[list[tuple[Any, Any] | None]] = []
    if dev is not None:
        with torch.cuda.device(dev):
            stream_list = [torch.cuda.Stream(dev) for _ in range(max(1, min(streams, workers)))]
        slot_bytes = max(j.length for j in jobs if any(c.dst.is_cuda for c in j.copies))
        slots = [[None] * SLOTS_PER_WORKER for _ in range(workers)]  # allocated on first use

    hash_threads = 1 if workers > 1 else 0  # many hashers at once: one thread each scales best
    scratch_bytes = max(j.length for j in jobs)

    def read(job: _Job, view: memoryview) -> int:
        got = job.image.read_into(job.entry, job.offset, view[:job.length], hash_threads=hash_threads)
        if got != job.length:
            raise casfs.CorruptIndex(f"chunk at offset {job.offset} holds {got} bytes where the "
                                     f"file needs {job.length}")
        return got

    def to_device(job: _Job, src: Any, stream: Any, ev: Any) -> None:
        with torch.cuda.stream(stream):
            for c in job.copies:
                if c.dst.is_cuda:
                    c.dst[c.dst_off:c.dst_off + c.n].copy_(src[c.src:c.src + c.n], non_blocking=True)
            ev.record(stream)

    def work(w: int) -> None:
        nslot = 0
        stream = stream_list[w % len(stream_list)] if stream_list else None
        scratch: bytearray | None = None
        try:
            if dev is not None:
                torch.cuda.set_device(dev)
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    break
                job = jobs[i]
                gpu = any(c.dst.is_cuda for c in job.copies)
                cpu = [c for c in job.copies if not c.dst.is_cuda]
                held = None
                if pinned is not None:  # GPU: read misses into the tier; CPU: copy hits only
                    held = pinned.fill(job.ref, lambda v, job=job: read(job, v)) if gpu else pinned.acquire(job.ref)
                if held is not None:
                    ev = None
                    if gpu:
                        ev = torch.cuda.Event(blocking=True)
                        to_device(job, held.tensor, stream, ev)
                    src = held.ptr
                    for c in cpu:
                        ctypes.memmove(c.dst.data_ptr() + c.dst_off, src + c.src, c.n)
                    held.release(after=ev)
                    from_pinned[w] += job.length
                    moved[w] += job.length
                    continue
                if gpu:
                    k = nslot % SLOTS_PER_WORKER
                    nslot += 1
                    if slots[w][k] is None:
                        slots[w][k] = (torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True),
                                       torch.cuda.Event(blocking=True))
                    slot, ev = slots[w][k]  # type: ignore[misc]
                    ev.synchronize()  # the copies that last read this slot are done (sleeps, no spin)
                    read(job, _memory(slot.data_ptr(), job.length))
                    src = slot.data_ptr()
                    to_device(job, slot, stream, ev)
                elif len(cpu) == 1 and cpu[0].src == 0 and cpu[0].n == job.length:
                    c = cpu[0]  # the whole chunk lies in one tensor: read it in place
                    read(job, _memory(c.dst.data_ptr() + c.dst_off, job.length))
                    cpu = []
                else:
                    if scratch is None:
                        scratch = bytearray(scratch_bytes)
                    src = _address(scratch)
                    read(job, memoryview(scratch))
                for c in cpu:
                    ctypes.memmove(c.dst.data_ptr() + c.dst_off, src + c.src, c.n)
                moved[w] += job.length
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
            stop.set()
        finally:
            if stream is not None:
                stream.synchronize()

    threads = [threading.Thread(target=work, args=(w,), name=f"weights-{w}", daemon=True)
               for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stream_list:
        s.synchronize()
    if errors:
        raise errors[0]
    if stats is not None:
        stats.chunks += len(jobs)
        stats.chunk_bytes += sum(moved)
        stats.pinned_bytes += sum(from_pinned)


def _pinned_of(targets: list, pinned: "casfs.PinnedTier | None") -> "casfs.PinnedTier | None":
    """The pinned tier a load uses: the one given, else its first image's store's (or none)."""
    if pinned is not None or not targets:
        return pinned
    return getattr(targets[0][0].store, "pinned", None)


def _parse_device(device: Any) -> "torch.device":
    torch = _torch()
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA GPU "
                               f"(torch {torch.__version__})")
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
    elif d.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return d


def _targets(source: "casfs.Image | casfs.Store", path: str) -> list[tuple["casfs.Image", str, SafetensorsHeader]]:
    """(image, file, header) for a single file or every shard of an index json."""
    image, inner = _resolve(source, path)
    if inner.endswith(".json"):
        shards = _shard_paths(image, inner)
        out = []
        seen: dict[str, str] = {}
        for shard, names in shards.items():
            h = read_header(image, shard)
            missing = [n for n in names if n not in h.tensors]
            if missing:
                raise InvalidSafetensors(f"{inner}: weight_map puts {missing[0][:100]!r} (and "
                                         f"{len(missing) - 1} more) in {shard}, which lacks them")
            for n in h.tensors:
                if n in seen:
                    raise InvalidSafetensors(f"{inner}: tensor {n[:100]!r} is in both {seen[n]} and {shard}")
                seen[n] = shard
            out.append((image, shard, h))
        return out
    return [(image, inner, read_header(image, inner))]


def load_safetensors(source: "casfs.Image | casfs.Store", path: str, device: Any = "cpu",
                     dtype: "torch.dtype | None" = None, *, concurrency: int = DEFAULT_CONCURRENCY,
                     streams: int = DEFAULT_STREAMS, stats: LoadStats | None = None,
                     pinned: "casfs.PinnedTier | None" = None) -> dict[str, "torch.Tensor"]:
    """Load every tensor of a safetensors file (or sharded set) in a casfs image onto ``device``.

    Args:
        source: a ``casfs.Image``, or a ``casfs.Store`` with ``path`` written as
            ``"<tag-or-image-id>/<path inside the image>"``.
        path: the ``.safetensors`` file, or a ``*.index.json`` (``weight_map``: tensor -> shard
            file relative to the json) to load every shard.
        device: ``"cpu"`` or ``"cuda[:N]"`` (a ``torch.device`` works too).
        dtype: when given, floating-point tensors are converted to it after loading; integer
            and bool tensors keep their dtype.
        concurrency: chunk fetches in flight (worker threads); the read-ahead is bounded by it.
        streams: CUDA streams the host-to-device copies are spread over.
        stats: filled with bytes, chunk fetches, seconds and per-tier counter deltas.
        pinned: a ``casfs.PinnedTier`` (default: the store's, when it was opened with one):
            chunks it holds are copied straight from it (to the GPU: host-to-device copies; to
            the CPU: memmove), and for CUDA loads the chunks it lacks are read into it, so the
            next load of any model sharing them is copies alone. Its chunks may be lent by a
            ``casfs.SharedChunks`` segment that several processes map (issue 12).

    Returns:
        name -> tensor, each tensor its own allocation, bit-identical to the file's bytes.

    Raises:
        InvalidSafetensors: malformed, truncated or hostile header or shard index.
        casfs.PathNotFound / casfs.NotAFile: ``path`` is not a file in the image.
        casfs.ChunkUnavailable: a chunk could not be fetched or failed verification in every tier.
        RuntimeError: a CUDA device was asked for and torch has none.
    """
    torch = _torch()
    t0 = time.perf_counter()
    dev = _parse_device(device)
    targets = _targets(source, path)
    before = _tier_counts(im for im, _, _ in targets) if stats is not None else {}
    out: dict[str, Any] = {}
    jobs: list[_Job] = []
    for image, fpath, h in targets:
        dests = {}
        for name, info in h.tensors.items():
            t = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device=dev)
            out[name] = t
            dests[name] = _byte_view(t)
        jobs.extend(_plan(image, fpath, h, dests))
    _run(jobs, concurrency, streams, stats, _pinned_of(targets, pinned))
    if dtype is not None:
        for name, t in out.items():
            if t.is_floating_point() and t.dtype != dtype:
                out[name] = t.to(dtype)
    if stats is not None:
        stats.tensors += len(out)
        stats.bytes += sum(h.data_len for _, _, h in targets)
        stats.seconds += time.perf_counter() - t0
        _delta(stats, before, _tier_counts(im for im, _, _ in targets))
    return out


def _delta(stats: LoadStats, before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> None:
    for tier, counts in after.items():
        b = before.get(tier, {})
        d = stats.tiers.setdefault(tier, {k: 0 for k in counts})
        for k, v in counts.items():
            d[k] = d.get(k, 0) + v - b.get(k, 0)


def load_into_module(module: "torch.nn.Module", source: "casfs.Image | casfs.Store", path: str, *,
                     strict: bool = True, concurrency: int = DEFAULT_CONCURRENCY,
                     streams: int = DEFAULT_STREAMS, stats: LoadStats | None = None,
                     pinned: "casfs.PinnedTier | None" = None) -> tuple[list[str], list[str]]:
    """Stream a safetensors file (or sharded set) into ``module``'s parameters and buffers in place.

    Each state-dict tensor keeps its storage, device and address (CUDA graphs captured over
    it stay valid): its bytes are written directly when its dtype matches the file's and it is
    contiguous; otherwise through one temporary of the file's dtype and a ``copy_``. Tied
    parameters (one storage under two names) need to be in the file once.

    Returns:
        (missing, unexpected): state-dict names the file lacks, file tensors the module lacks.

    Raises:
        ModuleMismatch: a shape differs, or (``strict``) names are missing or unexpected;
            raised before any byte is written.
        InvalidSafetensors, casfs.ChunkUnavailable: as ``load_safetensors``.
        ValueError: destinations on more than one GPU, or on the meta device.
    """
    torch = _torch()
    t0 = time.perf_counter()
    targets = _targets(source, path)
    before = _tier_counts(im for im, _, _ in targets) if stats is not None else {}
    sd = module.state_dict(keep_vars=True)
    in_file = {n for _, _, h in targets for n in h.tensors}
    unexpected = sorted(n for n in in_file if n not in sd)
    loaded_ptrs = {sd[n].data_ptr() for n in in_file if n in sd}
    missing = sorted(n for n, t in sd.items() if n not in in_file and t.data_ptr() not in loaded_ptrs)
    bad_shape = [f"{n}: module {tuple(sd[n].shape)} vs file {h.tensors[n].shape}"
                 for _, _, h in targets for n in h.tensors if n in sd and tuple(sd[n].shape) != h.tensors[n].shape]
    if bad_shape:
        raise ModuleMismatch(f"{path}: {len(bad_shape)} shape mismatches, e.g. {bad_shape[0]}")
    if strict and (missing or unexpected):
        raise ModuleMismatch(f"{path}: module and file disagree: missing from the file "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, not in the module "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''} (strict=False to allow)")
    jobs: list[_Job] = []
    post: list[tuple[Any, Any]] = []
    for image, fpath, h in targets:
        dests = {}
        for name, info in h.tensors.items():
            if name not in sd:
                continue
            t = sd[name].detach()
            if t.device.type == "meta":
                raise ValueError(f"{name} is on the meta device: materialise the module first "
                                 "(e.g. module.to_empty(device=...))")
            if t.dtype == torch_dtype(info.dtype) and t.is_contiguous():
                dests[name] = _byte_view(t)
            else:
                tmp = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device=t.device)
                post.append((t, tmp))
                dests[name] = _byte_view(tmp)
        jobs.extend(_plan(image, fpath, h, dests))
    _run(jobs, concurrency, streams, stats, _pinned_of(targets, pinned))
    with torch.no_grad():
        for t, tmp in post:
            t.copy_(tmp)
    if stats is not None:
        stats.tensors += sum(1 for _, _, h in targets for n in h.tensors if n in sd)
        stats.bytes += sum(h.tensors[n].nbytes for _, _, h in targets for n in h.tensors if n in sd)
        stats.seconds += time.perf_counter() - t0
        _delta(stats, before, _tier_counts(im for im, _, _ in targets))
    return missing, unexpected
