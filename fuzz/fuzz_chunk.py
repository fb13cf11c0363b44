"""Fuzz target: ``casfs.chunk`` frame decoders on hostile frames: ``decode``, ``parse_header``,
``frame_digest``, and (differentially against ``decode``) ``decode_into``, ``read_frame_into``,
``verify`` and ``decode``'s ``length`` check; for blocked frames, the block path: ``parse_meta``
and ``decode_block`` of every block.

Contract under test: for any bytes, ``parse_header`` returns a header whose lengths are within
the documented limits or raises ``CorruptChunk``; ``decode(frame, expect)`` returns bytes whose
length is the header's ``raw_len`` and whose blake3 digest is the header's digest (and
``expect`` when given), or raises ``CorruptChunk``. Nothing else may escape (no ZstdError,
ValueError, MemoryError), and no input may make decode allocate more than ``MAX_RAW_LEN``
(libFuzzer's ``-rss_limit_mb`` catches that).

Two input modes (first byte): raw frame bytes, or structured: a ``FuzzedDataProvider`` picks a
valid frame (``seeds.sample_frames()``) and damages it in ways that pass the header checks so
the zstd and digest paths are reached: header fields set to boundary values, payload bytes
flipped, a zstd payload made of fuzz bytes with consistent lengths, a frame re-digested after
damage (so verification passes and the length checks are what must hold).

``decode_into`` and ``read_frame_into`` (from a memfd, the frame alone or inside a larger file
as in a pack, with and without a length hint) must accept exactly the frames ``decode`` accepts
and produce the same bytes when the destination buffer is large enough, and raise only
``CorruptChunk`` otherwise.

Run: ``.venv/bin/python fuzz/fuzz_chunk.py fuzz/corpus-chunk -max_total_time=60``.
"""

from __future__ import annotations

import inspect
import os
import struct
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

with atheris.instrument_imports(include=["casfs"]):  # before anything else imports casfs
    import casfs  # noqa: F401
    from casfs import chunk as chunkmod
    from casfs.digest import digest_bytes
    from casfs.errors import CorruptChunk

import zstandard  # noqa: E402

import seeds  # noqa: E402

BASES = seeds.sample_frames()
H = chunkmod.HEADER_SIZE
# header field offsets and struct formats: version, codec, flags, raw_len, pay_len
FIELDS = ((4, "<B"), (5, "<B"), (6, "<H"), (8, "<I"), (12, "<I"))
_ZC = zstandard.ZstdCompressor(level=1)
_ZC_NOSIZE = zstandard.ZstdCompressor(level=1, write_content_size=False)


def _boundary(fdp: atheris.FuzzedDataProvider, near: int, bits: int) -> int:
    mask = (1 << bits) - 1
    vals = (0, 1, near - 1, near, near + 1, chunkmod.MAX_RAW_LEN, chunkmod.MAX_RAW_LEN + 1, mask)
    c = fdp.ConsumeIntInRange(0, len(vals))
    return (vals[c] if c < len(vals) else fdp.ConsumeIntInRange(0, mask)) & mask


def _structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    buf = bytearray(BASES[fdp.ConsumeIntInRange(0, len(BASES) - 1)])
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        op = fdp.ConsumeIntInRange(0, 6)
        if op == 0:  # one header field (when an earlier op left a header to change)
            off, fmt = FIELDS[fdp.ConsumeIntInRange(0, len(FIELDS) - 1)]
            if len(buf) < H:
                continue
            near = struct.unpack_from(fmt, buf, off)[0]
            struct.pack_into(fmt, buf, off, _boundary(fdp, near, 8 * struct.calcsize(fmt)))
        elif op == 1:  # a payload byte
            if len(buf) > H:
                buf[fdp.ConsumeIntInRange(H, len(buf) - 1)] = fdp.ConsumeIntInRange(0, 255)
        elif op == 2:  # a zstd payload of fuzz bytes, lengths consistent with the header
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
            raw_len = _boundary(fdp, len(payload), 32)
            buf = bytearray(chunkmod.HEADER.pack(chunkmod.MAGIC, chunkmod.VERSION, chunkmod.CODEC_ZSTD,
                                                 0, raw_len, len(payload), bytes(32)) + payload)
        elif op == 3:  # a real zstd frame of fuzz bytes, with or without its content size
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048)) * fdp.ConsumeIntInRange(1, 8)
            z = (_ZC if fdp.ConsumeBool() else _ZC_NOSIZE).compress(data)
            raw_len = len(data) if fdp.ConsumeBool() else _boundary(fdp, len(data), 32)
            buf = bytearray(chunkmod.HEADER.pack(chunkmod.MAGIC, chunkmod.VERSION, chunkmod.CODEC_ZSTD,
                                                 0, raw_len, len(z), digest_bytes(data)) + z)
        elif op == 4:  # truncate or extend
            if fdp.ConsumeBool():
                del buf[fdp.ConsumeIntInRange(0, len(buf)):]
            else:
                buf += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        elif op == 5:  # re-digest a raw frame's (damaged) payload so verification passes
            if len(buf) >= H and buf[5] == chunkmod.CODEC_RAW:
                buf[16:48] = digest_bytes(bytes(buf[H:]))
        else:  # fix pay_len to the real payload length
            if len(buf) >= H:
                struct.pack_into("<I", buf, 12, len(buf) - H)
    return bytes(buf)


def check(frame: bytes, expect_mode: int) -> None:
    try:
        h = chunkmod.parse_header(frame)
    except CorruptChunk:
        h = None
    if h is not None:
        if not (0 <= h.raw_len <= chunkmod.MAX_RAW_LEN) or len(h.digest) != 32:
            raise AssertionError(f"parse_header accepted raw_len={h.raw_len} digest of {len(h.digest)} bytes")
        if chunkmod.frame_digest(frame) != h.digest:
            raise AssertionError("frame_digest disagrees with parse_header")
    expect = None
    if expect_mode == 1 and h is not None:
        expect = h.digest
    elif expect_mode == 2:
        expect = b"\x07" * 32
    accepted = False
    for view in (frame, memoryview(frame)):
        try:
            data = chunkmod.decode(view, expect=expect)
        except CorruptChunk:
            continue
        accepted = True
        if chunkmod.decode(view, expect=expect, length=len(data)) != data:
            raise AssertionError("decode with the right length disagrees with decode")
        try:
            chunkmod.decode(view, expect=expect, length=len(data) + 1)
            raise AssertionError("decode accepted a frame whose length is not the index's")
        except CorruptChunk:
            pass
        if h is None:
            raise AssertionError("decode accepted a frame whose header parse_header rejects")
        if len(data) != h.raw_len or digest_bytes(data) != h.digest:
            raise AssertionError("decode returned bytes that do not match the frame's header")
        if expect is not None and h.digest != expect:
            raise AssertionError("decode ignored the expected digest")
        digest, again = chunkmod.encode(data)
        if digest != h.digest or chunkmod.decode(again, expect=digest) != data:
            raise AssertionError("re-encoding decoded bytes does not round-trip")
    # verify (bounded memory, streaming) accepts what decode accepts; it may also accept the
    # zstd framing leniency of the streaming decoders (see _framing_leniency), nothing else
    try:
        vh = chunkmod.verify(frame, expect=expect)
    except CorruptChunk:
        vh = None
    if accepted and vh is None:
        raise AssertionError("verify rejected a frame that decode accepts")
    if vh is not None and not accepted and vh.codec != chunkmod.CODEC_ZSTD:
        raise AssertionError("verify accepted a raw frame that decode rejects")


def check_blocks(frame: bytes) -> None:
    """The block path: ``parse_meta`` (with the header's own digest as the name) and
    ``decode_block`` of every block raise only ``CorruptChunk``; a block they return is the
    slice ``decode`` returns for that frame (when ``decode`` accepts it)."""
    try:
        h = chunkmod.parse_header(frame)
    except CorruptChunk:
        return
    try:
        whole: bytes | None = chunkmod.decode(frame, expect=h.digest)
    except CorruptChunk:
        whole = None
    try:
        meta = chunkmod.parse_meta(frame, h.digest)
    except CorruptChunk:
        if whole is not None and h.block:
            raise AssertionError("parse_meta rejected a blocked frame that decode accepts") from None
        return
    if meta is None:
        return
    for i in range(min(meta.n_blocks, 64)):
        off, ln = meta.block_range(i)
        try:
            block = chunkmod.decode_block(meta, i, frame[off:off + ln])
        except CorruptChunk:
            if whole is not None:
                raise AssertionError(f"decode_block rejected block {i} of a frame decode accepts") from None
            continue
        if len(block) != meta.block_len(i):
            raise AssertionError(f"decode_block returned {len(block)} bytes for block {i}")
        if whole is not None and block != whole[i * meta.block:i * meta.block + len(block)]:
            raise AssertionError(f"decode_block returned other bytes than decode for block {i}")


INTO_CAP = 1 << 20  # largest destination buffer the differential check allocates
# optional keyword of read_frame_into (present in some versions): pass it only when accepted
_HINT = hasattr(chunkmod, "read_frame_into") and "raw_len_hint" in inspect.signature(
    chunkmod.read_frame_into).parameters


def _memfd(content: bytes, at: int = 0) -> int:
    fd = os.memfd_create("casfs-fuzz-frame")
    os.pwrite(fd, content, at)
    return fd


def _framing_leniency(frame: bytes, out: bytes, expect: bytes | None) -> bool:
    """True when the only way ``out`` can differ from ``decode``'s verdict is zstd framing.

    ``decode`` (one-shot, ``allow_extra_data=False``) refuses a zstd payload that has bytes
    after its frame or whose frame never ends (no last block, a missing checksum). The
    streaming decoders (``decode_into``, ``read_frame_into``) read exactly ``raw_len`` bytes
    and python-zstandard's stream reader reports neither unconsumed input nor an unfinished
    frame, so they accept such payloads. They still return only bytes whose length and blake3
    digest match the chunk header (and ``expect``): no integrity is lost, so the differential
    check allows this one asymmetry and nothing else."""
    try:
        h = chunkmod.parse_header(frame)
    except CorruptChunk:
        return False
    return (h.codec == chunkmod.CODEC_ZSTD and len(frame) == h.frame_len and len(out) == h.raw_len
            and digest_bytes(out) == h.digest and (expect is None or expect == h.digest))


def check_into(frame: bytes, expect: bytes | None, slack: int, hint_mode: int) -> None:
    """Differential check: ``decode_into`` and ``read_frame_into`` (whole file, and as a frame
    inside a larger file) accept exactly the frames ``decode`` accepts, with the same bytes,
    whenever the buffer is large enough; otherwise they raise ``CorruptChunk`` only."""
    if not hasattr(chunkmod, "decode_into"):
        return
    try:
        want: bytes | None = chunkmod.decode(frame, expect=expect)
    except CorruptChunk:
        want = None
    try:
        raw_len = chunkmod.parse_header(frame).raw_len
    except CorruptChunk:
        raw_len = 64
    size = min(raw_len, INTO_CAP) + slack
    fits = want is not None and len(want) <= size
    hint = {"raw_len_hint": (None, raw_len, raw_len + 1, max(0, raw_len - 1))[hint_mode % 4]} if _HINT else {}

    def agree(name: str, call) -> None:
        buf = bytearray(size)
        try:
            n = call(buf)
        except CorruptChunk:
            if fits:
                raise AssertionError(f"{name} rejected a frame that decode accepts") from None
            return
        if want is None:
            if _framing_leniency(frame, bytes(buf[:n]), expect):
                return  # a known, harmless leniency of the streaming decoders (see above)
            raise AssertionError(f"{name} accepted a frame that decode rejects")
        if bytes(buf[:n]) != want:
            raise AssertionError(f"{name} produced other bytes than decode")

    agree("decode_into", lambda b: chunkmod.decode_into(frame, b, expect=expect))
    if hasattr(chunkmod, "read_frame_into"):
        fd = _memfd(frame)
        try:
            agree("read_frame_into", lambda b: chunkmod.read_frame_into(
                fd, 0, b, expect, **hint).raw_len)
        finally:
            os.close(fd)
        fd = _memfd(b"\xaa" * 7 + frame + b"junk after the frame", 0)
        try:
            agree("read_frame_into (in a pack)", lambda b: chunkmod.read_frame_into(
                fd, 7, b, expect, frame_len=len(frame), **hint).raw_len)
        finally:
            os.close(fd)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1 == 0:
        frame, mode, slack, hint = data[1:], data[0] >> 1 & 3, data[0] >> 3 & 3, data[0] >> 5
    else:
        fdp = atheris.FuzzedDataProvider(data[1:])
        frame = _structured(fdp)
        mode, slack, hint = fdp.ConsumeIntInRange(0, 2), fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 3)
    check(frame, mode)
    check_blocks(frame)
    expect = None
    if mode == 1 and len(frame) >= 48:
        expect = frame[16:48]
    elif mode == 2:
        expect = b"\x07" * 32
    check_into(frame, expect, slack, hint)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
