"""Shared packing for every builder: chunking, dedup, compression, packs, uploads.

Files are cut into fixed-size chunks aligned to file offsets (each file its own size:
``casfs.build.policy``). Each chunk is named by its blake3 digest; a chunk already known
(earlier in this build, or in any tagged image of the store) is referenced, not stored again.
A file that fits in one chunk whose frame is small is appended to the current *pack*, so that
the many small files of a container root travel in few objects; every chunk of a file larger
than one chunk, and every frame over ``PACK_ENTRY_MAX``, is a loose ``chunks/<hex>`` object.

Why chunks of large files are not packed (``Packer.pack_file_chunks = False``; measured with
``benchmarks/bench_chunk_policy.py`` on a torch venv, docs/benchmarks.md "Per-file chunk
sizes"): with 512 KiB code chunks in packs, a cold 4 KiB read of a large ``.so`` fetched the
pack span around it (1.8 MB on average); loose, it fetches the one chunk (134 KB; 2.7 MB with
the old 4 MiB chunks), and a cold ``import torch`` fetched 0.73x the bytes of the 4 MiB build,
at the price of 12x more requests (501 against 42), which concurrency hid at 50 ms RTT. Hashing and compression run
on a thread pool (blake3 and zstd release the GIL), in file order, so packs keep directory
locality and builds are deterministic.

Compression policy (``compress``), decided per file:

* ``"auto"`` (default): files named like model weights (``WEIGHT_SUFFIXES``) are stored raw;
  every other chunk is stored as zstd when that saves at least 10% (``chunk.MIN_SAVING``).
  Why weights go raw (measured on the H100 machine, docs/benchmarks.md): zstd saves only ~24%
  of bf16 weights (~8% of fp32) but decompresses at ~0.55 GiB/s a core, and only a raw payload
  can be read straight from a file into a pinned buffer (11.5-23.7 GiB/s verified, against
  ~5 GiB/s for zstd chunks on 16 cores).
* ``"always"``: every chunk is stored as zstd whenever that makes it smaller at all.
* ``"never"``: every chunk is stored raw.

A chunk that is already in the store (deduplicated) keeps the frame it was stored with.

Every chunk's place in the source (its file's opener, offset, length) is remembered, so that
``restore`` can store again, from the source, a chunk whose object vanished while the build ran
(a gc that no lease covered: ``casfs.leases``). That costs one small tuple per distinct chunk.
"""

from __future__ import annotations

import bisect
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Callable

import blake3

from .. import chunk as chunkmod
from ..digest import digest_bytes
from ..errors import BuildError
from ..index import ChunkRef
from ..layout import chunk_key, pack_key
from ..objects.base import ObjectStore
from .policy import SAMPLE_BYTES, WEIGHT_SUFFIXES, chunk_size_for, is_weight_name, needs_sample

DEFAULT_CHUNK_SIZE = 4 << 20  # the chunk size of indexes made before per-file sizes (format v1)
PACK_TARGET = 4 << 20  # close a pack once it holds this many bytes
PACK_ENTRY_MAX = 1 << 20  # frames up to this size go into packs; larger ones are loose objects
WINDOW_BYTES = 64 << 20  # input bytes hashed/compressed ahead of placement
WINDOW_ITEMS = 64
COMPRESS_POLICIES = ("auto", "always", "never")


@dataclass
class PackStats:
    """What a build wrote and what it found already stored."""

    bytes_in: int = 0
    chunks_total: int = 0
    chunks_new: int = 0
    chunks_reused: int = 0
    bytes_new_raw: int = 0
    bytes_stored: int = 0
    packs: int = 0
    loose: int = 0


def codec_choice(name: str, compress: str = "auto") -> tuple[bool, float | None]:
    """``(try zstd, min saving)`` for the file ``name`` under policy ``compress``.

    Raises:
        ValueError: for a policy other than ``COMPRESS_POLICIES``.
    """
    if compress == "auto":
        if is_weight_name(name):
            return False, None
        return True, None
    if compress == "always":
        return True, 0.0
    if compress == "never":
        return False, None
    raise ValueError(f"compress must be one of {', '.join(COMPRESS_POLICIES)}, got {compress!r}")


def _hash_and_encode(data: bytes, codec: tuple[bool, float | None] = (True, None),
                     block: int = chunkmod.DEFAULT_BLOCK) -> tuple[bytes, bytes, int]:
    # one thread per chunk: the pool already keeps both cores busy
    d = blake3.blake3(data).digest()
    return (*chunkmod.encode(data, d, compress=codec[0], min_saving=codec[1], block=block), len(data))


def _open(opener: Callable[[], BinaryIO], name: str) -> BinaryIO:
    try:
        return opener()
    except OSError as e:
        raise _unreadable(name, e) from None


def _read(f: BinaryIO, n: int, name: str) -> bytes:
    """``_read_full``, with a read error (EIO, EACCES) named after the file."""
    try:
        return _read_full(f, n)
    except OSError as e:
        raise _unreadable(name, e) from None


def _unreadable(name: str, e: OSError) -> BuildError:
    return BuildError(f"{name or 'a file'}: cannot read it ({e.strerror or e}); fix it or leave it out "
                      "of the source")


def _read_full(f: BinaryIO, n: int) -> bytes:
    """Read up to ``n`` bytes, looping over short reads (pipes, tar streams)."""
    data = f.read(n)
    while data and len(data) < n:
        more = f.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _skip(f: BinaryIO, n: int) -> None:
    """Move ``f`` forward ``n`` bytes (seek where it can, else read and drop)."""
    try:
        if f.seekable():
            f.seek(n)
            return
    except (AttributeError, OSError):
        pass
    while n > 0:
        got = f.read(min(n, 1 << 20))
        if not got:
            return
        n -= len(got)


def _hole_test(f: BinaryIO, size: int) -> Callable[[int, int], bool] | None:
    """For a sparse source file, a test ``(offset, length) -> the range is all hole``; None
    when ``f`` is not sparse or cannot tell. Tar members tell through ``data_ranges`` (their
    sparse map); files on disk through ``SEEK_DATA`` when they hold fewer blocks than bytes.
    A 2 KiB sparse tar claiming 100 GiB then costs 25,600 cheap chunk placements (~1 s), not
    the 80 s of reading and hashing 100 GiB of zeros it took before (#17)."""
    ranges = getattr(f, "data_ranges", None)
    if ranges is not None:
        starts = [off for off, _ in ranges]
        ends = [off + n for off, n in ranges]

        def in_map(off: int, n: int) -> bool:
            k = bisect.bisect_right(starts, off + n - 1)  # regions starting before the range ends
            return k == 0 or ends[k - 1] <= off  # ... the last of which ends before it starts

        return in_map
    try:
        fd = f.fileno()
        st = os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return None
    if not hasattr(os, "SEEK_DATA") or st.st_blocks * 512 >= min(st.st_size, size):
        return None

    def on_disk(off: int, n: int) -> bool:
        cur = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            nxt = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # ENXIO: no data at or after off
            return True
        finally:
            os.lseek(fd, cur, os.SEEK_SET)  # (the buffered reader's position stays right)
        return nxt >= off + n

    return on_disk


def _advance(f: BinaryIO, here: int, pos: int) -> None:
    """Move ``f`` from position ``here`` to ``pos`` (seek where it can, else read and drop:
    a compressed stream then still costs the hole's decompressed zeros, not their hashing)."""
    try:
        if f.seekable():
            f.seek(pos)
            return
    except (AttributeError, OSError):
        pass
    n = pos - here
    while n > 0:
        got = f.read(min(n, 1 << 20))
        if not got:
            return
        n -= len(got)


def _read_small(opener: Callable[[], BinaryIO], size: int, name: str,
                codec: tuple[bool, float | None], block: int) -> tuple[bytes, bytes, int]:
    with _open(opener, name) as f:
        data = _read(f, size + 1, name)
    if len(data) != size:
        raise BuildError(f"{name or 'a file'}: size changed during the build ({size} -> {len(data)}+ bytes); "
                         "build again from a stable tree")
    return _hash_and_encode(data, codec, block)


class Packer:
    """Turns file contents into chunk-table indices, writing new chunks to ``objects``.

    Args:
        objects: the blob store to write to.
        chunk_size: bytes per chunk for every file (aligned to file offsets); None (the
            default): each file's own, from ``policy.chunk_size_for``.
        known: digest -> where an existing copy lives (from earlier images).
        threads: hashing/compression workers.
        on_bytes: progress callback, called with the number of input bytes consumed.
        compress: ``"auto"``, ``"always"`` or ``"never"`` (see the module docstring).
        block: block size of blocked frames (``casfs.chunk``: chunks longer than one block
            can then be read and verified block by block); 0 writes whole frames only.

    Raises:
        ValueError: for an unknown ``compress`` policy.
    """

    # False (the default): the chunks of a file larger than one chunk are loose objects, so a
    # cold read of one fetches that chunk alone, never a pack span (see the module doc)
    pack_file_chunks = False

    def __init__(self, objects: ObjectStore, chunk_size: int | None = None,
                 known: dict[bytes, ChunkRef] | None = None, threads: int | None = None,
                 on_bytes: Callable[[int], None] | None = None, compress: str = "auto",
                 block: int = chunkmod.DEFAULT_BLOCK) -> None:
        codec_choice("", compress)  # validates the policy
        self.compress = compress
        self.block = block
        self.objects = objects
        self.chunk_size = chunk_size
        self.known = known if known is not None else {}
        self.table: list[ChunkRef] = []
        self._slot: dict[bytes, int] = {}
        self._pending_pack: dict[bytes, int] = {}  # digest -> table slot awaiting its pack digest
        self._pack_buf = bytearray()
        self._pack_entries: list[tuple[bytes, int, int, int]] = []  # digest, offset, length, raw
        self.stats = PackStats()
        self._pool = ThreadPoolExecutor(max_workers=threads or max(2, os.cpu_count() or 2),
                                        thread_name_prefix="casfs-pack")
        self._uploads: deque[Future] = deque()
        self._up = ThreadPoolExecutor(max_workers=4, thread_name_prefix="casfs-upload")
        self._on_bytes = on_bytes
        self._window: deque[tuple[Future, list[int], tuple, bool]] = deque()
        self._window_bytes = 0
        # table slot -> (opener, offset, raw length, codec): where to read the chunk again
        self._origin: list[tuple] = []
        self._zero_bytes = b""
        self._zero_frames: dict[tuple, tuple[bytes, bytes, int]] = {}

    # -- input --------------------------------------------------------------------------------

    def add_file(self, opener: Callable[[], BinaryIO], size: int, *, parallel_read: bool = False,
                 name: str = "") -> tuple[list[int], int]:
        """Queue a file of ``size`` bytes for chunking.

        Returns ``(slots, chunk_size)``: the file's list of chunk-table indices, filled in as
        chunks are placed (complete once ``finish()`` returns), and the chunk size it was cut
        with. Placement happens in submission order, so builds are deterministic and small
        files keep directory locality in packs. With ``parallel_read`` (only for openers that
        are safe to call from other threads, e.g. real files), files up to one chunk are read
        by the worker pool too, overlapping I/O across files.

        Raises:
            BuildError: when the file's length differs from ``size`` (it changed during the build).
        """
        slots: list[int] = []
        codec = codec_choice(name, self.compress)
        cs = self.chunk_size or chunk_size_for(name, size)
        if parallel_read and size <= cs and not (self.chunk_size is None and needs_sample(name, size)):
            fut = self._pool.submit(_read_small, opener, size, name, codec, self.block)
            self._enqueue(fut, size, slots, (opener, 0, size, codec), True)
            return slots, cs
        total = 0
        with _open(opener, name) as f:
            head = b""
            if self.chunk_size is None and needs_sample(name, size):
                head = _read(f, SAMPLE_BYTES, name)
                cs = chunk_size_for(name, size, head)
            hole = _hole_test(f, size)
            packable = size <= cs or self.pack_file_chunks
            while True:
                n = min(cs, size - total)
                if hole is not None and not head and n > 0 and hole(total, n):
                    # a chunk that lies in a hole of a sparse file is zeros: not read, not hashed
                    # (not while a sample is pending: the file's position is past it then)
                    _advance(f, total, total + n)
                    self._enqueue(self._zero_chunk(n, codec), n, slots, (opener, total, n, codec), packable)
                    total += n
                    continue
                if len(head) >= cs:  # the sample covers this whole chunk
                    data, head = head[:cs], head[cs:]
                elif head:
                    data, head = head + _read(f, cs - len(head), name), b""
                else:
                    data = _read(f, cs, name)
                if not data:
                    break
                if data == self._zeros(len(data)):  # (memcmp: zeros are not hashed again)
                    fut = self._zero_chunk(len(data), codec)
                else:
                    fut = self._pool.submit(_hash_and_encode, data, codec, self.block)
                self._enqueue(fut, len(data), slots, (opener, total, len(data), codec), packable)
                total += len(data)
                if len(data) < cs:
                    break
        if total != size:
            raise BuildError(f"{name or 'a file'}: size changed during the build ({size} -> {total} bytes); "
                             "build again from a stable tree")
        return slots, cs

    def _zeros(self, n: int) -> bytes:
        z = self._zero_bytes
        if len(z) != n:
            z = self._zero_bytes = bytes(n)
        return z

    def _zero_chunk(self, n: int, codec: tuple) -> Future:
        """A finished future of the (digest, frame, n) of ``n`` zero bytes (computed once)."""
        key = (n, codec)
        got = self._zero_frames.get(key)
        if got is None:
            got = self._zero_frames[key] = _hash_and_encode(bytes(n), codec, self.block)
        fut: Future = Future()
        fut.set_result(got)
        return fut

    def _enqueue(self, fut: Future, nbytes: int, slots: list[int], origin: tuple, packable: bool) -> None:
        self._window.append((fut, slots, origin, packable))
        self._window_bytes += nbytes
        self._drain(WINDOW_BYTES, WINDOW_ITEMS)

    def _drain(self, max_bytes: int, max_items: int = 0) -> None:
        while self._window and (self._window_bytes > max_bytes or len(self._window) > max_items):
            fut, slots, origin, packable = self._window.popleft()
            digest, frame, raw_len = fut.result()
            self._window_bytes -= raw_len
            slots.append(self._place(digest, frame, raw_len, origin, packable))

    def _place(self, digest: bytes, frame: bytes, raw_len: int, origin: tuple = (), packable: bool = True) -> int:
        st = self.stats
        st.bytes_in += raw_len
        st.chunks_total += 1
        if self._on_bytes:
            self._on_bytes(raw_len)
        slot = self._slot.get(digest)
        if slot is not None:
            st.chunks_reused += 1
            return slot
        ref = self.known.get(digest)
        loose = len(frame) > PACK_ENTRY_MAX or not packable
        if ref is None and loose and self.objects.contains(chunk_key(digest)):
            ref = ChunkRef(digest, raw_len, len(frame))
        slot = len(self.table)
        self._slot[digest] = slot
        self._origin.append(origin)
        if ref is not None:
            st.chunks_reused += 1
            self.table.append(ref)
            return slot
        st.chunks_new += 1
        st.bytes_new_raw += raw_len
        st.bytes_stored += len(frame)
        if loose:
            st.loose += 1
            self.table.append(ChunkRef(digest, raw_len, len(frame)))
            self._upload(chunk_key(digest), frame)
        else:
            self.table.append(None)  # type: ignore[arg-type] - filled when the pack closes
            self._pending_pack[digest] = slot
            self._pack_entries.append((digest, len(self._pack_buf), len(frame), raw_len))
            self._pack_buf += frame
            if len(self._pack_buf) >= PACK_TARGET:
                self._close_pack()
        return slot

    # -- output -------------------------------------------------------------------------------

    def _close_pack(self) -> None:
        if not self._pack_entries:
            return
        body = bytes(self._pack_buf)
        pd = digest_bytes(body)
        for digest, off, ln, raw in self._pack_entries:
            slot = self._pending_pack.pop(digest)
            self.table[slot] = ChunkRef(digest, raw, ln, pd, off)
        self.stats.packs += 1
        self._pack_buf = bytearray()
        self._pack_entries = []
        self._upload(pack_key(pd), body)

    def _upload(self, key: str, data: bytes) -> None:
        while len(self._uploads) >= 8:
            self._uploads.popleft().result()
        self._uploads.append(self._up.submit(self.objects.put, key, data))

    def _flush(self) -> None:
        self._close_pack()
        while self._uploads:
            self._uploads.popleft().result()

    def finish(self) -> list[ChunkRef]:
        """Close the last pack, wait for every upload, and return the chunk table (the packer
        stays usable for ``restore`` until ``close``).

        Raises:
            whatever an upload raised (StoreError, botocore errors).
        """
        self._drain(-1)
        self._flush()
        return list(self.table)

    def restore(self, missing: set[str]) -> int:
        """Store again, read from the source, every chunk whose object is in ``missing``
        (object keys that vanished from the store after the chunk was placed); the chunk table
        then points at the new objects. Returns the number of chunks stored again.

        Raises:
            BuildError: when the source no longer holds the same bytes (it changed meanwhile).
            StoreError: when the store cannot be written.
        """
        from ..layout import object_key

        redo = [slot for slot, ref in enumerate(self.table) if object_key(ref) in missing]
        for slot in redo:
            ref = self.table[slot]
            opener, offset, length, codec = self._origin[slot]
            with opener() as f:
                if offset:
                    _skip(f, offset)
                data = _read_full(f, length)
            digest, frame, raw_len = _hash_and_encode(data, codec, self.block)
            if digest != ref.digest:
                raise BuildError("a source file changed during the build (a chunk read again to replace "
                                 "one that vanished from the store differs); build again from a stable tree")
            self.stats.bytes_stored += len(frame)
            if len(frame) > PACK_ENTRY_MAX or ref.pack is None:  # loose stays loose
                self.table[slot] = ChunkRef(digest, raw_len, len(frame))
                self._upload(chunk_key(digest), frame)
            else:
                self._pending_pack[digest] = slot
                self._pack_entries.append((digest, len(self._pack_buf), len(frame), raw_len))
                self._pack_buf += frame
                if len(self._pack_buf) >= PACK_TARGET:
                    self._close_pack()
        self._flush()
        return len(redo)

    def close(self) -> None:
        """Stop the worker threads (after ``finish`` and any ``restore``)."""
        self._pool.shutdown()
        self._up.shutdown()

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._up.shutdown(cancel_futures=True)
