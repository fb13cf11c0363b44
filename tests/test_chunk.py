"""Chunk frames: round trips, codec choice, and rejection of every kind of damage."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casfs import chunk
from casfs.digest import digest_bytes
from casfs.errors import CorruptChunk


@given(st.binary(max_size=20000))
def test_any_bytes_round_trip_through_a_frame(data):
    digest, frame = chunk.encode(data)
    assert digest == digest_bytes(data)
    assert chunk.decode(frame, expect=digest) == data


def test_compressible_data_is_stored_with_zstd_and_random_data_raw():
    _, z = chunk.encode(b"a" * 100000)
    assert chunk.parse_header(z).codec == chunk.CODEC_ZSTD
    _, r = chunk.encode(os.urandom(100000))
    assert chunk.parse_header(r).codec == chunk.CODEC_RAW


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=5000), st.data())
def test_a_flipped_byte_anywhere_in_a_frame_is_never_returned_as_data(data, draw):
    digest, frame = chunk.encode(data)
    pos = draw.draw(st.integers(0, len(frame) - 1))
    bit = draw.draw(st.integers(0, 7))
    bad = bytearray(frame)
    bad[pos] ^= 1 << bit
    try:
        out = chunk.decode(bytes(bad), expect=digest)
    except CorruptChunk:
        return
    # the only acceptable "success" is the exact original bytes (e.g. a flip in a reserved
    # zstd bit that does not change the output)
    assert out == data


@given(st.binary(min_size=1, max_size=3000), st.data())
def test_a_truncated_frame_is_rejected(data, draw):
    _, frame = chunk.encode(data)
    cut = draw.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(CorruptChunk):
        chunk.decode(frame[:cut])


def test_a_frame_holding_another_digest_is_rejected():
    d1, f1 = chunk.encode(b"one")
    d2, _ = chunk.encode(b"two")
    with pytest.raises(CorruptChunk, match="wanted"):
        chunk.decode(f1, expect=d2)


def test_a_frame_claiming_an_absurd_length_is_rejected_before_decompressing():
    digest, frame = chunk.encode(b"x" * 1000)
    bad = bytearray(frame)
    bad[8:12] = (1 << 31).to_bytes(4, "little")
    with pytest.raises(CorruptChunk, match="over the"):
        chunk.decode(bytes(bad))


def test_a_zstd_bomb_cannot_exceed_its_declared_length():
    digest, frame = chunk.encode(b"\0" * 200000)
    hdr = bytearray(frame[:chunk.HEADER_SIZE])
    hdr[8:12] = (1000).to_bytes(4, "little")  # claims 1000 bytes, payload expands to 200000
    with pytest.raises(CorruptChunk):
        chunk.decode(bytes(hdr) + frame[chunk.HEADER_SIZE:])
