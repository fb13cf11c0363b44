"""Chunk size per file, chosen at build time.

Every regular file gets its own chunk size (recorded in the index, format version 2). The
default policy (``chunk_size_for``) puts each file in one of two classes:

* **weights**: names ending in ``WEIGHT_SUFFIXES`` (``.safetensors .bin .pt .pth .gguf .onnx
  .npy``), and any file of at least ``LARGE_FILE`` bytes whose first ``SAMPLE_BYTES`` zstd
  cannot shrink by ``chunk.MIN_SAVING``: ``WEIGHT_CHUNK_SIZE`` (16 MiB). Such a file is read
  whole and in order (a loader, ``casfs.export``), stored raw, and every chunk costs a fixed
  amount of work per read (a store lookup, a ``preadv``, a blake3 call, a host-to-device copy):
  on the H200 a 6 GiB file loaded at 18.8-21.3 GB/s with 16 MiB chunks against 7.4-8.5 GB/s
  with 4 MiB ones (same run, docs/benchmarks.md).
* **everything else** (code, shared libraries, text, small data): ``CODE_CHUNK_SIZE``
  (512 KiB, the size AWS Lambda's container-image loader uses). These files are read in
  small, scattered pieces: ``import`` touches a few pages of each ``.so`` it maps, and a page
  fault through the FUSE mount fetches (and verifies) the whole chunk it falls in, so a 4 MiB
  chunk turns a 4 KiB fault into a 4 MiB fetch.

Measured on the CPU box (docs/benchmarks.md, "Per-file chunk sizes"): see that section for
build speed and the bytes a cold ``import torch`` fetches from a lazily mounted venv under
each policy.

``casfs build --chunk-size SIZE`` (``chunk_size=`` in the API) still forces one size for every
file.
"""

from __future__ import annotations

from .. import chunk as chunkmod

__all__ = ["CODE_CHUNK_SIZE", "LARGE_FILE", "SAMPLE_BYTES", "WEIGHT_CHUNK_SIZE", "WEIGHT_SUFFIXES",
           "chunk_size_for", "is_weight_name", "needs_sample"]

CODE_CHUNK_SIZE = 512 << 10
WEIGHT_CHUNK_SIZE = 16 << 20
LARGE_FILE = 64 << 20  # a file at least this large and incompressible is treated as weights
SAMPLE_BYTES = 1 << 20  # how much of a large file's head the compressibility test looks at
# tensor/array formats whose float data zstd barely shrinks: stored raw, in large chunks
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".npy")


def is_weight_name(name: str) -> bool:
    """Whether ``name`` ends in one of ``WEIGHT_SUFFIXES`` (case-insensitive)."""
    return name.lower().endswith(WEIGHT_SUFFIXES)


def needs_sample(name: str, size: int) -> bool:
    """Whether ``chunk_size_for`` wants a sample of the file's head to decide."""
    return size >= LARGE_FILE and not is_weight_name(name)


def chunk_size_for(name: str, size: int, sample: bytes | memoryview | None = None) -> int:
    """The default chunk size of a file named ``name`` of ``size`` bytes.

    Args:
        sample: the file's first bytes (up to ``SAMPLE_BYTES``) when ``needs_sample`` says so;
            without it a large file of an unknown kind counts as compressible.

    Returns a power of two: ``WEIGHT_CHUNK_SIZE`` or ``CODE_CHUNK_SIZE``.
    """
    if is_weight_name(name):
        return WEIGHT_CHUNK_SIZE
    if size >= LARGE_FILE and sample is not None and len(sample) >= 64:
        if not _compressible(sample):
            return WEIGHT_CHUNK_SIZE
    return CODE_CHUNK_SIZE


def _compressible(sample: bytes | memoryview) -> bool:
    """Whether zstd (the build's level) saves at least ``chunk.MIN_SAVING`` of ``sample``."""
    _, frame = chunkmod.encode(sample, b"\0" * 32, compress=True)
    return len(frame) - chunkmod.HEADER_SIZE < len(sample)
