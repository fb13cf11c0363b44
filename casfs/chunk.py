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
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

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


def encode(data: bytes | memoryview, digest: bytes | None = None, *, compress: bool = True) -> tuple[bytes, bytes]:
    """Encode ``data`` as a frame.

    Returns ``(digest, frame)``. zstd is used only when it saves at least ``MIN_SAVING``.

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
        if len(z) <= n * (1.0 - MIN_SAVING):
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
    if pay_len > MAX_RAW_LEN + (MAX_RAW_LEN >> 6) + 1024:
        raise CorruptChunk(f"chunk frame payload {pay_len} is over the limit")
    return FrameHeader(codec, raw_len, pay_len, bytes(digest))


def decode(frame: bytes | memoryview, expect: bytes | None = None) -> bytes:
    """Decode a frame and verify its bytes.

    Args:
        frame: exactly one frame (trailing bytes are an error).
        expect: the digest the caller asked for; when given, the frame must carry it.

    Returns the decompressed bytes, whose blake3 digest has been checked.

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
        data = bytes(payload)
    else:
        try:
            # python-zstandard allocates the size a zstd frame declares, whatever
            # max_output_size says: refuse a declaration that disagrees with raw_len first
            declared = zstandard.frame_content_size(payload)
            if declared not in (-1, h.raw_len):
                raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… zstd frame declares {declared} bytes, "
                                   f"its header {h.raw_len}")
            data = _decompressor().decompress(payload, max_output_size=h.raw_len)
        except zstandard.ZstdError as e:
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… does not decompress: {e}") from None
        if len(data) != h.raw_len:
            raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… decompressed to {len(data)} bytes, expected {h.raw_len}")
    if digest_bytes(data) != h.digest:
        raise CorruptChunk(f"chunk {h.digest.hex()[:16]}… failed digest verification (corrupted bytes)")
    return data


def frame_digest(frame: bytes | memoryview) -> bytes:
    """The digest a frame claims (unverified: use ``decode`` to verify)."""
    return parse_header(frame).digest


assert HEADER_SIZE == 16 + DIGEST_SIZE
