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

import ctypes
import os
import struct
import threading
from dataclasses import dataclass

import blake3
import zstandard

from .digest import DIGEST_SIZE, digest_bytes
from .errors import CorruptChunk

MAGIC = b"CSC1"
VERSION = 1
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

    @property
    def frame_len(self) -> int:
        return HEADER_SIZE + self.payload_len


def encode(data: bytes | memoryview, digest: bytes | None = None, *, compress: bool = True,
           min_saving: float | None = None) -> tuple[bytes, bytes]:
    """Encode ``data`` as a frame.

    Returns ``(digest, frame)``. With ``compress``, zstd is used only when it saves at least
    ``min_saving`` of the bytes (default ``MIN_SAVING``; 0 keeps zstd whenever it is smaller).

    Raises:
        ValueError: when ``data`` is larger than ``MAX_RAW_LEN``.
    """
    n = len(data)
    if n > MAX_RAW_LEN:
        raise ValueError(f"chunk of {n} bytes exceeds the {MAX_RAW_LEN}-byte limit")
    if digest is None:
        digest = digest_bytes(data)
    payload: bytes | memoryview = data
    codec = CODEC_RAW
    if compress and n >= 64:
        z = _compressor().compress(data)
        keep = MIN_SAVING if min_saving is None else min_saving
        if len(z) < n and len(z) <= n * (1.0 - keep):
            payload, codec = z, CODEC_ZSTD
    header = HEADER.pack(MAGIC, VERSION, codec, 0, n, len(payload), digest)
    return digest, header + bytes(payload)


def parse_header(buf: bytes | memoryview) -> FrameHeader:
    """Parse and bound-check a frame header.

    Raises:
        CorruptChunk: bad magic/version/codec, or lengths beyond limits or the buffer.
    """
    if len(buf) < HEADER_SIZE:
        raise CorruptChunk(f"chunk frame truncated: {len(buf)} bytes, header needs {HEADER_SIZE}")
    magic, version, codec, flags, raw_len, pay_len, digest = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptChunk(f"not a casfs chunk frame (magic {bytes(magic)!r})")
    if version != VERSION:
        raise CorruptChunk(f"chunk frame version {version} is not supported (this casfs reads {VERSION})")
    if codec not in (CODEC_RAW, CODEC_ZSTD) or flags != 0:
        raise CorruptChunk(f"chunk frame has unknown codec {codec} or flags {flags:#x}")
    if raw_len > MAX_RAW_LEN:
        raise CorruptChunk(f"chunk frame claims {raw_len} bytes, over the {MAX_RAW_LEN} limit")
    if codec == CODEC_RAW and pay_len != raw_len:
        raise CorruptChunk(f"raw chunk frame payload {pay_len} != length {raw_len}")
    if pay_len > zstd_bound(raw_len):
        raise CorruptChunk(f"chunk frame payload of {pay_len} bytes is more than {raw_len} bytes compress to")
    return FrameHeader(codec, raw_len, pay_len, bytes(digest))


def zstd_bound(raw_len: int) -> int:
    """The most bytes a zstd payload of a ``raw_len``-byte chunk may take: zstd's own
    ``ZSTD_compressBound`` is ``n + n/256 + 64`` at most, and ``encode`` keeps zstd only when
    it is smaller than the raw bytes, so a longer payload is forged or damaged."""
    return raw_len + (raw_len >> 7) + 512


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
    """Decode a frame and verify its bytes.

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
    if h.codec == CODEC_RAW:
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
    if h.codec == CODEC_RAW:
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
    try:
        declared = zstandard.frame_content_size(payload)
        if declared not in (-1, h.raw_len):
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… zstd frame declares {declared} bytes, "
                               f"its header {h.raw_len}")
        reader = _decompressor().stream_reader(payload)
        got = 0
        while got < h.raw_len:
            n = reader.readinto(view[got:])
            if not n:
                break
            got += n
        extra = reader.read(1) if got == h.raw_len else b""
    except zstandard.ZstdError as e:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… does not decompress: {e}") from None
    if got != h.raw_len or extra:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… decompressed to "
                           f"{got}{'+' if extra else ''} bytes, expected {h.raw_len}")


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
    if h.codec == CODEC_RAW:
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
    if h.codec == CODEC_RAW:
        got = _pread_exact(fd, view, pos)
        if got != h.raw_len:
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… is truncated: {got} of {h.raw_len} bytes")
    else:
        payload = os.pread(fd, h.payload_len, pos)
        if len(payload) != h.payload_len:
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… is truncated: {len(payload)} of "
                               f"{h.payload_len} payload bytes")
        _decompress_into(h, payload, view)
    if frame_len is None and os.pread(fd, 1, pos + h.payload_len):
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… file has bytes after its {h.frame_len}-byte frame")
    _verify_view(h, view, hash_threads)
    return h


assert HEADER_SIZE == 16 + DIGEST_SIZE
