"""Chunk frames: the stored form of every chunk (and of every index).

Frame layout (little-endian), 48-byte header then payload::

    0  magic    4  b"CSC1"
    4  version  1  1
    5  codec    1  0 = raw, 1 = zstd
    6  flags    2  0 (reserved)
    8  raw_len  4  length of the decompressed bytes
    12 pay_len  4  length of the payload that follows
    16 digest  32  blake3 of the decompressed bytes

Decoding checks every field against hard bounds before touching the payload and verifies the
digest of what it produced, so a frame from any tier is either the right bytes or an error.

A frame never decides how much a reader allocates: the header's ``raw_len`` is checked against
the chunk's length in the index (``decode(length=)``, ``TieredStore`` passes it; the buffer
decoders are handed exactly that many bytes) and a zstd payload may not be longer than its
chunk could compress to (``zstd_bound``), all before any output buffer exists. A 12 KiB frame
declaring 256 MiB used to make ``decode`` allocate 256 MiB (a mount daemon grew from 31 MB to
1.35 GB RSS); ``verify`` checks a frame whose length nothing states (the cache server's fetches)
in ~1 MiB of memory.

Version 2, *blocked* frames (chunks longer than one block; ``encode(..., block=B)``): the same
header with ``version`` 2 and ``flags`` = log2 of the block size B (16 KiB to 1 MiB); the
payload is ``[ends: n x u32, zstd frames only] [outboard: n x 32-byte CVs] [the n blocks]``.
Each block is stored on its own (a zstd frame, or raw when zstd does not shrink it: a block
whose stored length equals its length is raw), ``ends`` are the blocks' end offsets after the
outboard, and the outboard holds the BLAKE3 chaining values of the blocks
(``casfs.blocktree``): merged, they give the chunk's name. So a reader can fetch the *meta*
(header, ends, outboard: 2.3 KiB for a 4 MiB chunk of 64 KiB blocks), verify it against the
name, then fetch and verify any one block alone (``parse_meta``, ``FrameMeta.block_range``,
``decode_block``). A raw blocked frame's blocks are the chunk's bytes back to back, so whole
reads of it stay one ``preadv``. Whole-frame decoding of either version verifies the whole
chunk's digest, as before. Why 64 KiB blocks by default (``DEFAULT_BLOCK``), measured on
libtorch_cpu.so (zstd level 1): 4 MiB blocks compress 3.14x, 256 KiB 3.19x, 64 KiB 3.05x,
16 KiB 2.90x; one block's CV costs 64 us at 64 KiB, so a 4 KiB read pays at most ~16x its
bytes for its check.

Two ways to decode:

* ``decode(frame)`` returns a new ``bytes`` object (one copy of a raw payload, made under the
  GIL). It is what ``TieredStore.get`` and every caller that keeps chunk bytes use, and it
  stays ``bytes`` on purpose: those callers (``Image.read_entry``'s slices and joins, the
  memory tier, the FUSE daemon, the cache server, index and profile parsing) rely on an
  immutable, hashable, self-contained object, and a memoryview into the frame would keep the
  whole frame alive. The stream that needed the copy gone (weights to pinned memory) uses
  ``decode_into`` / ``read_frame_into`` through ``TieredStore.get_into``.
* ``decode_into(frame, buf)`` and ``read_frame_into(fd, offset, buf)`` write the chunk into a
  caller's buffer (e.g. pinned host memory) and verify it there. ``read_frame_into`` reads a
  raw payload straight from a file with ``os.preadv`` (no GIL, no intermediate object);
  zstd payloads decompress straight into the buffer. Both leave ``buf`` holding unspecified
  bytes when they raise.
"""

from __future__ import annotations

import array
import ctypes
import os
import struct
import sys
import threading
from dataclasses import dataclass

import blake3
import zstandard

from . import blocktree
from .blocktree import CV_SIZE
from .digest import DIGEST_SIZE, digest_bytes
from .errors import CorruptChunk

_BIG_ENDIAN = sys.byteorder == "big"

MAGIC = b"CSC1"
VERSION = 1
VERSION_BLOCKED = 2
MIN_FRAME_BLOCK_LOG2 = 14  # 16 KiB: keeps a blocked frame's meta under 36 bytes per 16 KiB
MAX_FRAME_BLOCK_LOG2 = 20  # 1 MiB
DEFAULT_BLOCK = 64 << 10
CODEC_RAW = 0
CODEC_ZSTD = 1
HEADER = struct.Struct("<4sBBHII32s")
HEADER_SIZE = HEADER.size  # 48
MAX_RAW_LEN = 256 << 20  # no chunk (or index) may claim more than 256 MiB
ZSTD_LEVEL = 1
# Store raw unless zstd saves at least this fraction: float weights compress ~1.08x, and
# decompressing costs ~0.6 GiB/s a core, far more than the bytes saved.
MIN_SAVING = 0.10

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """The parsed header of a chunk frame."""

    codec: int
    raw_len: int
    payload_len: int
    digest: bytes
    block: int = 0  # block size of a blocked (version 2) frame; 0: a whole frame

    @property
    def frame_len(self) -> int:
        return HEADER_SIZE + self.payload_len

    @property
    def n_blocks(self) -> int:
        """Blocks of a blocked frame (0 for a whole frame)."""
        return -(-self.raw_len // self.block) if self.block else 0

    @property
    def meta_len(self) -> int:
        """Bytes from the frame's start to its first block (the header of a whole frame)."""
        n = self.n_blocks
        return HEADER_SIZE + n * (CV_SIZE + (4 if self.codec == CODEC_ZSTD else 0))

    @property
    def blocks_len(self) -> int:
        """Stored bytes of the blocks (or of the whole payload of a whole frame)."""
        return self.frame_len - self.meta_len


def encode(data: bytes | memoryview, digest: bytes | None = None, *, compress: bool = True,
           min_saving: float | None = None, block: int = 0) -> tuple[bytes, bytes]:
    """Encode ``data`` as a frame.

    Returns ``(digest, frame)``. With ``compress``, zstd is used only when it saves at least
    ``min_saving`` of the bytes (default ``MIN_SAVING``; 0 keeps zstd whenever it is smaller).
    With ``block`` (a power of two from 16 KiB to 1 MiB) a chunk longer than one block gets a
    blocked frame (version 2, readable block by block) when ``casfs.blocktree`` is available
    here; otherwise, and for shorter chunks, a whole frame.

    Raises:
        ValueError: when ``data`` is larger than ``MAX_RAW_LEN``, or ``block`` is invalid.
        CorruptChunk: ``digest`` is not the digest of ``data`` (checked for blocked frames).
    """
    n = len(data)
    if n > MAX_RAW_LEN:
        raise ValueError(f"chunk of {n} bytes exceeds the {MAX_RAW_LEN}-byte limit")
    if digest is None:
        digest = digest_bytes(data)
    if block:
        if block & (block - 1) or not (1 << MIN_FRAME_BLOCK_LOG2 <= block <= 1 << MAX_FRAME_BLOCK_LOG2):
            raise ValueError(f"frame block size {block} is not a power of two from "
                             f"{1 << MIN_FRAME_BLOCK_LOG2} to {1 << MAX_FRAME_BLOCK_LOG2}")
        if n > block and blocktree.available():
            return digest, _encode_blocked(data, digest, compress, min_saving, block)
    payload: bytes | memoryview = data
    codec = CODEC_RAW
    if compress and n >= 64:
        z = _compressor().compress(data)
        keep = MIN_SAVING if min_saving is None else min_saving
        if len(z) < n and len(z) <= n * (1.0 - keep):
            payload, codec = z, CODEC_ZSTD
    header = HEADER.pack(MAGIC, VERSION, codec, 0, n, len(payload), digest)
    return digest, header + bytes(payload)


def _encode_blocked(data: bytes | memoryview, digest: bytes, compress: bool, min_saving: float | None,
                    block: int) -> bytes:
    n = len(data)
    mv = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    ob = blocktree.outboard(mv, block)
    if blocktree.root_from_cvs(ob) != digest:
        raise CorruptChunk(f"chunk {digest.hex()[:16]}…: its block CVs do not merge to its digest "
                           "(the bytes changed while encoding, or a casfs.blocktree bug)")
    nb = len(ob) // CV_SIZE
    log2 = block.bit_length() - 1
    if compress and n >= 64:
        c = _compressor()
        parts: list[bytes | memoryview] = []
        total = 0
        for i in range(nb):
            raw = mv[i * block:(i + 1) * block]
            z = c.compress(raw)
            part = z if len(z) < len(raw) else raw
            parts.append(part)
            total += len(part)
        keep = MIN_SAVING if min_saving is None else min_saving
        if total < n and total <= n * (1.0 - keep):
            ends = array.array("I")
            pos = 0
            for p in parts:
                pos += len(p)
                ends.append(pos)
            if _BIG_ENDIAN:
                ends.byteswap()
            body = ends.tobytes() + ob + b"".join(parts)
            return HEADER.pack(MAGIC, VERSION_BLOCKED, CODEC_ZSTD, log2, n, len(body), digest) + body
    header = HEADER.pack(MAGIC, VERSION_BLOCKED, CODEC_RAW, log2, n, len(ob) + n, digest)
    return b"".join((header, ob, mv))


def parse_header(buf: bytes | memoryview) -> FrameHeader:
    """Parse and bound-check a frame header (either version).

    Raises:
        CorruptChunk: bad magic/version/codec, or lengths beyond limits or the buffer.
    """
    if len(buf) < HEADER_SIZE:
        raise CorruptChunk(f"chunk frame truncated: {len(buf)} bytes, header needs {HEADER_SIZE}")
    magic, version, codec, flags, raw_len, pay_len, digest = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptChunk(f"not a casfs chunk frame (magic {bytes(magic)!r})")
    if version not in (VERSION, VERSION_BLOCKED):
        raise CorruptChunk(f"chunk frame version {version} is not supported (this casfs reads "
                           f"{VERSION} and {VERSION_BLOCKED})")
    block = 0
    if version == VERSION_BLOCKED:
        if not (MIN_FRAME_BLOCK_LOG2 <= flags <= MAX_FRAME_BLOCK_LOG2) or codec not in (CODEC_RAW, CODEC_ZSTD):
            raise CorruptChunk(f"blocked chunk frame has codec {codec} and block log2 {flags}")
        block = 1 << flags
        if raw_len <= block:
            raise CorruptChunk(f"blocked chunk frame of {raw_len} bytes has one block of {block}")
    elif codec not in (CODEC_RAW, CODEC_ZSTD) or flags != 0:
        raise CorruptChunk(f"chunk frame has unknown codec {codec} or flags {flags:#x}")
    if raw_len > MAX_RAW_LEN:
        raise CorruptChunk(f"chunk frame claims {raw_len} bytes, over the {MAX_RAW_LEN} limit")
    h = FrameHeader(codec, raw_len, pay_len, bytes(digest), block)
    if pay_len > zstd_bound(raw_len) + h.meta_len - HEADER_SIZE:
        raise CorruptChunk(f"chunk frame payload of {pay_len} bytes is more than {raw_len} bytes compress to")
    if codec == CODEC_RAW and h.blocks_len != raw_len:
        raise CorruptChunk(f"raw chunk frame payload {pay_len} does not fit length {raw_len}")
    if h.frame_len < h.meta_len:
        raise CorruptChunk(f"blocked chunk frame payload {pay_len} is shorter than its block table")
    return h


def zstd_bound(raw_len: int) -> int:
    """The most bytes a zstd payload of a ``raw_len``-byte chunk may take: zstd's own
    ``ZSTD_compressBound`` is ``n + n/256 + 64`` at most, and ``encode`` keeps zstd only when
    it is smaller than the raw bytes, so a longer payload is forged or damaged."""
    return raw_len + (raw_len >> 7) + 512


# The longest frame ``parse_header`` accepts (a blocked zstd frame of MAX_RAW_LEN bytes in the
# smallest blocks): what a reader of a frame of unknown length may have to hold, and no more.
MAX_FRAME_LEN = (zstd_bound(MAX_RAW_LEN) + HEADER_SIZE
                 + (MAX_RAW_LEN >> MIN_FRAME_BLOCK_LOG2) * (CV_SIZE + 4))


def check_length(h: FrameHeader, length: int | None) -> None:
    """Refuse a frame whose chunk length is not ``length`` (the index's, when known),
    before anything is allocated for it: a small hostile frame must not make a reader
    allocate the 256 MiB it declares.

    Raises:
        CorruptChunk: when the lengths differ.
    """
    if length is not None and h.raw_len != length:
        raise CorruptChunk(f"chunk frame {h.digest.hex()[:16]}… declares {h.raw_len} bytes, its index "
                           f"entry {length}")


def decode(frame: bytes | memoryview, expect: bytes | None = None, *, length: int | None = None) -> bytes:
    """Decode a frame (either version) and verify its bytes.

    Args:
        frame: exactly one frame (trailing bytes are an error).
        expect: the digest the caller asked for; when given, the frame must carry it.
        length: the chunk's length from the index; when given, a frame that declares another
            length is refused before its output is allocated (chunk reads always pass it; an
            index or profile, whose length nothing states beforehand, may be up to
            ``MAX_RAW_LEN``). Callers that only check a frame use ``verify`` (bounded memory).

    Returns the decompressed bytes, whose blake3 digest has been checked.

    Raises:
        CorruptChunk: on any malformed, truncated, or mismatching frame.
    """
    h = parse_header(frame)
    if len(frame) != h.frame_len:
        raise CorruptChunk(f"chunk frame is {len(frame)} bytes, header says {h.frame_len}")
    if expect is not None and h.digest != expect:
        raise CorruptChunk(f"chunk frame holds {h.digest.hex()[:16]}…, wanted {expect.hex()[:16]}…")
    check_length(h, length)
    payload = memoryview(frame)[HEADER_SIZE:]
    if h.block and h.codec == CODEC_RAW:
        _check_outboard(h, memoryview(frame))
        data = bytes(memoryview(frame)[h.meta_len:])
    elif h.block:
        out = bytearray(h.raw_len)
        _blocked_into(h, memoryview(frame), memoryview(out))
        data = bytes(out)
    elif h.codec == CODEC_RAW:
        data = bytes(payload)
    else:
        try:
            # python-zstandard allocates the size a zstd frame declares, whatever
            # max_output_size says: refuse a declaration that disagrees with raw_len first
            declared = zstandard.frame_content_size(payload)
            if declared not in (-1, h.raw_len):
                raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… zstd frame declares {declared} bytes, "
                                   f"its header {h.raw_len}")
            if h.raw_len == 0:
                # zstd's one-shot call returns b"" for a frame declaring 0 bytes without decoding
                # it, and cannot size the output of an unsized one: stream it (validates it)
                _decompress_into(h, payload, memoryview(bytearray()))
                data = b""
            else:
                # one zstd frame and nothing after it (decode_into streams and refuses extra too)
                data = _decompressor().decompress(payload, max_output_size=h.raw_len, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… does not decompress: {e}") from None
        if len(data) != h.raw_len:
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… decompressed to {len(data)} bytes, expected {h.raw_len}")
    if digest_bytes(data) != h.digest:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… failed digest verification (corrupted bytes)")
    return data


VERIFY_BLOCK = 1 << 20


def verify(frame: bytes | memoryview, expect: bytes | None = None) -> FrameHeader:
    """Check a frame (its header, its zstd payload, its digest) without keeping its bytes:
    a zstd payload is decompressed and hashed ``VERIFY_BLOCK`` bytes at a time, so checking a
    frame costs about 1 MiB of memory whatever length it declares (the cache server checks
    what it fetches this way; it does not know the chunk's length beforehand).

    Like ``decode_into``'s stream it cannot tell a few bytes after the zstd frame from none
    (see fuzz/README.md); the length and digest of what it produced are checked.

    Raises:
        CorruptChunk: on any malformed, truncated, or mismatching frame.
    """
    h = parse_header(frame)
    if len(frame) != h.frame_len:
        raise CorruptChunk(f"chunk frame is {len(frame)} bytes, header says {h.frame_len}")
    if expect is not None and h.digest != expect:
        raise CorruptChunk(f"chunk frame holds {h.digest.hex()[:16]}…, wanted {expect.hex()[:16]}…")
    payload = memoryview(frame)[HEADER_SIZE:]
    if h.block:
        got = _verify_blocked(h, memoryview(frame))
    elif h.codec == CODEC_RAW:
        got = digest_bytes(payload)
    else:
        hasher = blake3.blake3()
        n = 0
        try:
            declared = zstandard.frame_content_size(payload)
            if declared not in (-1, h.raw_len):
                raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… zstd frame declares {declared} bytes, "
                                   f"its header {h.raw_len}")
            reader = _decompressor().stream_reader(payload)
            while n <= h.raw_len:
                block = reader.read(min(VERIFY_BLOCK, h.raw_len - n + 1))
                if not block:
                    break
                n += len(block)
                hasher.update(block)
        except zstandard.ZstdError as e:
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… does not decompress: {e}") from None
        if n != h.raw_len:
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… decompressed to {n} bytes, expected {h.raw_len}")
        got = hasher.digest()
    if got != h.digest:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… failed digest verification (corrupted bytes)")
    return h


def _verify_blocked(h: FrameHeader, frame: memoryview) -> bytes:
    """The digest of a blocked frame's bytes, decoded one block at a time (bounded memory);
    its outboard is checked too."""
    _check_outboard(h, frame)
    base = h.meta_len
    if h.codec == CODEC_RAW:
        return digest_bytes(frame[base:])
    hasher = blake3.blake3()
    ends = _block_ends(h, frame)
    start = 0
    buf = bytearray(h.block)
    for i, end in enumerate(ends):  # type: ignore[arg-type]
        blen = min(h.block, h.raw_len - i * h.block)
        stored = frame[base + start:base + end]
        if len(stored) == blen:
            hasher.update(stored)
        else:
            view = memoryview(buf)[:blen]
            _decompress_exact(h.digest, stored, view, f" block {i}")
            hasher.update(view)
        start = end
    return hasher.digest()


def as_raw(frame: bytes | memoryview, expect: bytes | None = None) -> bytes:
    """The same chunk as a raw frame (a raw blocked frame, with the same outboard, for a
    blocked one): what a cache keeps to skip decompression on every later read. Returns
    ``frame`` itself when it is raw already.

    Raises:
        CorruptChunk: as ``decode`` (the bytes are verified on the way).
    """
    h = parse_header(frame)
    if h.codec == CODEC_RAW:
        return bytes(frame)
    data = decode(frame, expect=expect)
    if not h.block:
        return encode(data, h.digest, compress=False)[1]
    mv = memoryview(frame)
    n = h.n_blocks
    ob = bytes(mv[HEADER_SIZE + 4 * n:HEADER_SIZE + 4 * n + CV_SIZE * n])
    header = HEADER.pack(MAGIC, VERSION_BLOCKED, CODEC_RAW, h.block.bit_length() - 1, h.raw_len,
                         len(ob) + h.raw_len, h.digest)
    return b"".join((header, ob, data))


def frame_digest(frame: bytes | memoryview) -> bytes:
    """The digest a frame claims (unverified: use ``decode`` to verify)."""
    return parse_header(frame).digest


# -- decoding into a caller's buffer ---------------------------------------------------------


def writable_view(buf: object) -> memoryview:
    """``buf`` as a flat, writable byte memoryview (no copy).

    Raises:
        ValueError: when ``buf`` is read-only or not contiguous.
    """
    mv = memoryview(buf)  # type: ignore[arg-type]
    if mv.readonly:
        raise ValueError("the destination buffer is read-only")
    if not mv.c_contiguous:
        raise ValueError("the destination buffer must be contiguous")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def _address(mv: memoryview) -> int:
    """Address of the first byte of a writable, non-empty memoryview."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


def copy_into(out: memoryview, src: bytes | bytearray | memoryview, offset: int = 0,
              length: int | None = None) -> int:
    """Copy ``src[offset:offset+length]`` to the start of ``out``; returns the byte count.

    A ``bytes`` source is copied with ``ctypes.memmove``, which releases the GIL (a memoryview
    slice assignment would hold it for the whole copy).

    Raises:
        ValueError: when ``out`` is too small.
    """
    n = len(src) - offset if length is None else length
    if n > len(out):
        raise ValueError(f"a {n}-byte chunk does not fit a {len(out)}-byte buffer")
    if n <= 0:
        return 0
    if isinstance(src, bytes):
        base = ctypes.cast(ctypes.c_char_p(src), ctypes.c_void_p).value or 0
        ctypes.memmove(_address(out), base + offset, n)
    else:
        out[:n] = memoryview(src).cast("B")[offset:offset + n]
    return n


def _check_fit(h: FrameHeader, out: memoryview, expect: bytes | None) -> memoryview:
    if expect is not None and h.digest != expect:
        raise CorruptChunk(f"chunk frame holds {h.digest.hex()[:16]}…, wanted {expect.hex()[:16]}…")
    if h.raw_len > len(out):
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… holds {h.raw_len} bytes, more than the "
                           f"{len(out)}-byte buffer its index entry sized")
    return out[:h.raw_len]


def _verify_view(h: FrameHeader, view: memoryview, hash_threads: int) -> None:
    if hash_threads > 0:
        got = blake3.blake3(view, max_threads=hash_threads).digest()
    else:
        got = digest_bytes(view)
    if got != h.digest:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… failed digest verification (corrupted bytes)")


def _decompress_into(h: FrameHeader, payload: bytes | memoryview, view: memoryview) -> None:
    """Decompress a zstd payload straight into ``view`` (exactly ``h.raw_len`` bytes)."""
    _decompress_exact(h.digest, payload, view[:h.raw_len])


def _decompress_exact(digest: bytes, payload: bytes | memoryview, view: memoryview, what: str = "") -> None:
    """Decompress one zstd frame into all of ``view``: exactly ``len(view)`` bytes, no more."""
    want = len(view)
    try:
        declared = zstandard.frame_content_size(payload)
        if declared not in (-1, want):
            raise CorruptChunk(f"chunk {digest.hex()[:16]}…{what} zstd frame declares {declared} bytes, "
                               f"its header {want}")
        reader = _decompressor().stream_reader(payload)
        got = 0
        while got < want:
            n = reader.readinto(view[got:])
            if not n:
                break
            got += n
        extra = reader.read(1) if got == want else b""
    except zstandard.ZstdError as e:
        raise CorruptChunk(f"chunk {digest.hex()[:16]}…{what} does not decompress: {e}") from None
    if got != want or extra:
        raise CorruptChunk(f"chunk {digest.hex()[:16]}…{what} decompressed to "
                           f"{got}{'+' if extra else ''} bytes, expected {want}")


# -- blocked frames ----------------------------------------------------------------------------


def _block_ends(h: FrameHeader, meta: bytes | memoryview) -> list[int] | None:
    """The validated end offsets of a zstd blocked frame's blocks (None for a raw one)."""
    if h.codec == CODEC_RAW:
        return None
    n = h.n_blocks
    a = array.array("I")
    a.frombytes(bytes(meta[HEADER_SIZE:HEADER_SIZE + 4 * n]))
    if _BIG_ENDIAN:
        a.byteswap()
    ends = a.tolist()
    prev = 0
    for i, e in enumerate(ends):
        blen = min(h.block, h.raw_len - i * h.block)
        if not (prev < e <= prev + blen):
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… block {i} has a bad stored range")
        prev = e
    if prev != h.blocks_len:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… blocks end at {prev}, frame holds {h.blocks_len}")
    return ends


def _check_outboard(h: FrameHeader, meta: bytes | memoryview) -> None:
    """A whole blocked frame's outboard must merge to its digest too (else a cache would keep
    a frame whose block reads all fail). Skipped where ``casfs.blocktree`` is unavailable:
    the chunk's bytes are still verified whole."""
    if len(meta) < h.meta_len:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… is truncated inside its block table")
    if not blocktree.available():
        return
    at = HEADER_SIZE + (4 * h.n_blocks if h.codec == CODEC_ZSTD else 0)
    if blocktree.root_from_cvs(meta[at:at + CV_SIZE * h.n_blocks]) != h.digest:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}…: its block CVs do not merge to its name "
                           "(corrupted block table)")


def _blocked_into(h: FrameHeader, frame: memoryview, out: memoryview) -> None:
    """Every block of a whole blocked frame into ``out``; the outboard is checked, the bytes
    are not (the caller verifies the chunk's digest)."""
    _check_outboard(h, frame)
    base = h.meta_len
    if h.codec == CODEC_RAW:
        copy_into(out, frame, base, h.raw_len)
        return
    ends = _block_ends(h, frame)
    start = 0
    for i, end in enumerate(ends):  # type: ignore[arg-type]
        lo = i * h.block
        blen = min(h.block, h.raw_len - lo)
        stored = frame[base + start:base + end]
        if len(stored) == blen:
            out[lo:lo + blen] = stored
        else:
            _decompress_exact(h.digest, stored, out[lo:lo + blen], f" block {i}")
        start = end


@dataclass(frozen=True, slots=True)
class FrameMeta:
    """What a reader needs to fetch and verify single blocks of a blocked frame: its header,
    the blocks' stored end offsets (zstd frames) and the verified outboard (block CVs)."""

    header: FrameHeader
    ends: tuple[int, ...] | None
    outboard: bytes

    @property
    def block(self) -> int:
        return self.header.block

    @property
    def n_blocks(self) -> int:
        return self.header.n_blocks

    def block_len(self, i: int) -> int:
        """Decoded bytes of block ``i``."""
        h = self.header
        return min(h.block, h.raw_len - i * h.block)

    def block_range(self, i: int) -> tuple[int, int]:
        """(offset from the frame's start, stored length) of block ``i``."""
        h = self.header
        if not (0 <= i < h.n_blocks):
            raise ValueError(f"block {i} of a {h.n_blocks}-block chunk")
        if self.ends is None:
            return h.meta_len + i * h.block, self.block_len(i)
        start = self.ends[i - 1] if i else 0
        return h.meta_len + start, self.ends[i] - start

    def blocks_range(self, first: int, last: int) -> tuple[int, int]:
        """(offset, stored length) of blocks ``first..last`` together (they are contiguous)."""
        off, _ = self.block_range(first)
        end_off, end_len = self.block_range(last)
        return off, end_off + end_len - off


def meta_probe_len(raw_len: int, block: int = DEFAULT_BLOCK) -> int:
    """Bytes to read from a frame's start to hold its meta when its blocks are ``block`` bytes
    (the most a zstd blocked frame needs; a whole frame needs only its header)."""
    return HEADER_SIZE + -(-raw_len // block) * (CV_SIZE + 4)


def parse_meta(buf: bytes | memoryview, expect: bytes) -> FrameMeta | None:
    """The verified meta of a blocked frame from the first bytes of the frame, or None for a
    whole (version 1) frame.

    Args:
        buf: the frame's first bytes: at least its ``meta_len`` (``meta_probe_len`` of its
            length, or more after a first short read: see ``needed``).
        expect: the chunk's digest; the outboard must merge to it.

    Raises:
        CorruptChunk: a bad header, ends, or an outboard that does not merge to ``expect``;
            ``MetaTooShort`` when ``buf`` holds less than the meta (read ``e.needed`` bytes).
    """
    h = parse_header(buf)
    if h.digest != expect:
        raise CorruptChunk(f"chunk frame holds {h.digest.hex()[:16]}…, wanted {expect.hex()[:16]}…")
    if not h.block:
        return None
    if len(buf) < h.meta_len:
        raise MetaTooShort(h.meta_len)
    ends = _block_ends(h, buf)
    ob_at = HEADER_SIZE + (4 * h.n_blocks if ends is not None else 0)
    outboard = bytes(buf[ob_at:ob_at + CV_SIZE * h.n_blocks])
    if blocktree.root_from_cvs(outboard) != expect:
        raise CorruptChunk(f"chunk {expect.hex()[:16]}…: its block CVs do not merge to its name "
                           "(corrupted block table)")
    return FrameMeta(h, tuple(ends) if ends is not None else None, outboard)


class MetaTooShort(CorruptChunk):
    """``parse_meta`` needs ``needed`` bytes of the frame's start (not a corruption by itself)."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"the frame's block table needs its first {needed} bytes")
        self.needed = needed


def decode_block(meta: FrameMeta, i: int, stored: bytes | memoryview) -> bytes:
    """Decode block ``i``'s stored bytes and verify them against the chunk's name (through the
    verified outboard). Returns the block's bytes.

    Raises:
        CorruptChunk: a bad length, a block that does not decompress, or a CV mismatch.
        blocktree.BlockTreeUnavailable: no CV library here.
    """
    h = meta.header
    blen = meta.block_len(i)
    _, slen = meta.block_range(i)
    if len(stored) != slen:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… block {i} is {len(stored)} bytes, expected {slen}")
    if slen == blen:
        data = stored if isinstance(stored, bytes) else bytes(stored)
    else:
        out = bytearray(blen)
        _decompress_exact(h.digest, stored, memoryview(out), f" block {i}")
        data = bytes(out)
    if blocktree.block_cv(data, h.block, i) != meta.outboard[i * CV_SIZE:(i + 1) * CV_SIZE]:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… block {i} failed verification (corrupted bytes)")
    return data


def decode_into(frame: bytes | memoryview, buf: object, expect: bytes | None = None, *,
                hash_threads: int = 0) -> int:
    """Decode one frame into the start of ``buf`` and verify the bytes there.

    Args:
        frame: exactly one frame (trailing bytes are an error).
        buf: a writable buffer of at least the chunk's length.
        expect: the digest the caller asked for; when given, the frame must carry it.
        hash_threads: blake3 threads for the check (0: ``digest_bytes``' default; 1 is best
            when many threads decode at once).

    Returns the chunk's length; ``buf[:length]`` holds its verified bytes.

    Raises:
        CorruptChunk: a malformed, truncated or mismatching frame, or a chunk larger than
            ``buf`` (``buf``'s contents are then unspecified).
        ValueError: ``buf`` is read-only or not contiguous.
    """
    out = writable_view(buf)
    h = parse_header(frame)
    if len(frame) != h.frame_len:
        raise CorruptChunk(f"chunk frame is {len(frame)} bytes, header says {h.frame_len}")
    view = _check_fit(h, out, expect)
    if h.block:
        _blocked_into(h, memoryview(frame), view)
    elif h.codec == CODEC_RAW:
        copy_into(view, frame if isinstance(frame, bytes) else memoryview(frame), HEADER_SIZE, h.raw_len)
    else:
        _decompress_into(h, memoryview(frame)[HEADER_SIZE:], view)
    _verify_view(h, view, hash_threads)
    return h.raw_len


def _pread_exact(fd: int, view: memoryview, offset: int) -> int:
    """``os.preadv`` into all of ``view``, looping over short reads; returns bytes read."""
    got = 0
    n = len(view)
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k <= 0:
            break
        got += k
    return got


def read_frame_into(fd: int, offset: int, buf: object, expect: bytes | None = None, *,
                    frame_len: int | None = None, hash_threads: int = 0) -> FrameHeader:
    """Read the frame at ``offset`` of open file ``fd`` into ``buf`` and verify it there.

    A raw payload goes from the file into ``buf`` with ``os.preadv`` (no copy, no GIL held);
    a zstd payload is read, then decompressed into ``buf``. The blake3 check runs over ``buf``.

    Args:
        frame_len: the frame's length when it sits inside a larger file (a pack); None when
            the frame is the whole file from ``offset`` (trailing bytes are then an error).
        hash_threads: as ``decode_into``.

    Returns the frame's header; ``buf[:header.raw_len]`` holds the verified bytes.

    Raises:
        CorruptChunk: a malformed, truncated, mismatching or oversized frame (``buf``'s
            contents are then unspecified).
        OSError: the file could not be read.
        ValueError: ``buf`` is read-only or not contiguous.
    """
    out = writable_view(buf)
    head = os.pread(fd, HEADER_SIZE, offset)
    h = parse_header(head)
    if frame_len is not None and h.frame_len != frame_len:
        raise CorruptChunk(f"chunk frame is {frame_len} bytes in its pack, header says {h.frame_len}")
    view = _check_fit(h, out, expect)
    pos = offset + HEADER_SIZE
    if h.codec == CODEC_RAW:  # whole or blocked: the chunk's bytes are the frame's last raw_len
        if h.block:
            _check_outboard(h, head + os.pread(fd, h.meta_len - HEADER_SIZE, pos))
        got = _pread_exact(fd, view, offset + h.meta_len)
        if got != h.raw_len:
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… is truncated: {got} of {h.raw_len} bytes")
    else:
        payload = os.pread(fd, h.payload_len, pos)
        if len(payload) != h.payload_len:
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… is truncated: {len(payload)} of "
                               f"{h.payload_len} payload bytes")
        if h.block:
            _blocked_into(h, memoryview(head + payload), view)
        else:
            _decompress_into(h, payload, view)
    if frame_len is None and os.pread(fd, 1, pos + h.payload_len):
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… file has bytes after its {h.frame_len}-byte frame")
    # One preadv of the whole payload, then one blake3 call over it. Tried and dropped (issue
    # 13): reading and hashing 512 KiB pieces while they are still in the core's cache. On the
    # 2-core VM it read 16 MiB chunks 1.6x faster (2 threads); on the H200 machine (16 threads)
    # it was 0.57x (the weights loader 13.2 against 23.3 GB/s): each piece is two more trips
    # through the GIL, and 16 threads queue for it.
    _verify_view(h, view, hash_threads)
    return h


assert HEADER_SIZE == 16 + DIGEST_SIZE
