"""snapshot.criuimg: CRIU pagemap images parsed as untrusted bytes, and rewritten for lazy restores."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from snapshot.criuimg import (IMG_COMMON_MAGIC, PAGE_SIZE, PAGEMAP_MAGIC, PE_LAZY, PE_PRESENT, CorruptImage,
                              Pagemap, PagemapEntry, encode_pagemap, parse_pagemap)


@st.composite
def pagemaps(draw) -> Pagemap:
    n = draw(st.integers(0, 40))
    addr = draw(st.integers(1, 1 << 20)) * PAGE_SIZE
    entries = []
    for _ in range(n):
        addr += draw(st.integers(0, 64)) * PAGE_SIZE
        nr = draw(st.integers(1, 1 << 18))
        entries.append(PagemapEntry(addr, nr, draw(st.sampled_from([PE_PRESENT, PE_PRESENT | PE_LAZY, PE_LAZY, 0]))))
        addr += nr * PAGE_SIZE
    return Pagemap(draw(st.integers(0, (1 << 32) - 1)), entries)


@settings(deadline=None)
@given(pagemaps())
def test_a_pagemap_survives_encoding_and_parsing(pm):
    assert parse_pagemap(encode_pagemap(pm)) == pm


@settings(deadline=None)
@given(pagemaps())
def test_file_offsets_count_only_present_pages(pm):
    offs = pm.file_offsets()
    total = 0
    for e, off in zip(pm.entries, offs):
        assert off == total
        total += e.nr_pages * PAGE_SIZE if e.present else 0
    assert total == pm.present_pages * PAGE_SIZE


@settings(max_examples=300, deadline=None)
@given(pagemaps(), st.data())
def test_damaged_pagemaps_raise_only_corrupt_image(pm, data):
    raw = bytearray(encode_pagemap(pm))
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.integers(0, 2))
        if how == 0 and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif how == 1:
            del raw[data.draw(st.integers(0, len(raw))):]
        else:
            raw += data.draw(st.binary(max_size=16))
    try:
        out = parse_pagemap(bytes(raw))
    except CorruptImage:
        return
    prev = 0
    for e in out.entries:                       # what parses is still a sane pagemap
        assert e.vaddr % PAGE_SIZE == 0 and e.nr_pages > 0 and e.vaddr >= prev
        prev = e.end


def test_overlapping_entries_and_parent_pages_are_refused():
    head = struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC)

    def msg(*fields: tuple[int, int]) -> bytes:
        body = b"".join(bytes([num << 3]) + _varint(v) for num, v in fields)
        return struct.pack("<I", len(body)) + body

    ok = head + msg((1, 3)) + msg((1, 0x10000), (2, 2), (4, PE_PRESENT))
    assert parse_pagemap(ok).entries == [PagemapEntry(0x10000, 2, PE_PRESENT)]
    with pytest.raises(CorruptImage, match="overlaps"):
        parse_pagemap(ok + msg((1, 0x11000), (2, 1), (4, PE_PRESENT)))
    with pytest.raises(CorruptImage, match="parent"):
        parse_pagemap(head + msg((1, 3)) + msg((1, 0x10000), (2, 1), (3, 1)))
    with pytest.raises(CorruptImage, match="magic"):
        parse_pagemap(struct.pack("<II", IMG_COMMON_MAGIC, 0x1234) + msg((1, 3)))


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)
