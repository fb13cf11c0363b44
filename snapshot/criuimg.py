"""The few CRIU image files casfs reads and rewrites: pagemaps (which pages a process had, and
where in its pages file they are), with a minimal protobuf codec for them.

A CRIU image file is a head (``IMG_COMMON_MAGIC``, then the image's own magic) followed by
entries, each a little-endian u32 length and that many bytes of one protobuf message. A
pagemap image (``pagemap-<pid>.img``) holds a ``pagemap_head`` (the id N of its
``pages-N.img``) and then ``pagemap_entry`` messages in address order: ``vaddr``, ``nr_pages``,
``flags`` (``PE_PARENT`` 1, ``PE_LAZY`` 2, ``PE_PRESENT`` 4). The pages file holds the pages
of the entries flagged ``PE_PRESENT``, back to back in entry order, so an entry's place in it
is the sum of the present entries before it (``Pagemap.file_offsets``).

Restoring from the store (``snapshot.lazyrestore``) rewrites a pagemap so that its lazy
entries are not present (CRIU's lazy-pages daemon then asks the page server for them) and a
small local pages file holds only the pages CRIU restores eagerly: the layout ``criu dump
--lazy-pages`` itself writes.

Images come out of a store and are checked against their digests there, but they are parsed
as untrusted bytes all the same: sizes are bounded, every field is checked, and a malformed
image is a ``CorruptImage`` error, never an exception of another kind (``fuzz/fuzz_criuimg.py``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = ["CorruptImage", "IMG_COMMON_MAGIC", "MAX_ENTRIES", "PAGEMAP_MAGIC", "PAGE_SIZE",
           "PE_LAZY", "PE_PARENT", "PE_PRESENT", "Pagemap", "PagemapEntry", "encode_pagemap",
           "parse_pagemap"]

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
PAGE_SIZE = 4096
PE_PARENT = 1
PE_LAZY = 2
PE_PRESENT = 4
MAX_ENTRIES = 1 << 22          # pagemap entries in one image (a 2 GB process has ~10k)
MAX_PAGES = 1 << 36            # pages one entry may claim (256 TiB of address space)
_VADDR_LIMIT = 1 << 57         # 5-level paging's user address space


class CorruptImage(ValueError):
    """A CRIU image file is malformed (truncated, bad magic, a field out of range)."""


@dataclass(frozen=True, slots=True)
class PagemapEntry:
    """A run of ``nr_pages`` pages at ``vaddr`` with CRIU's ``PE_*`` ``flags``."""

    vaddr: int
    nr_pages: int
    flags: int

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY)

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * PAGE_SIZE


@dataclass
class Pagemap:
    """A parsed ``pagemap-<pid>.img``: the id of its pages file and its entries in address order."""

    pages_id: int
    entries: list[PagemapEntry] = field(default_factory=list)

    def file_offsets(self) -> list[int]:
        """Byte offset in ``pages-<pages_id>.img`` of each entry (meaningful for present ones)."""
        out, off = [], 0
        for e in self.entries:
            out.append(off)
            if e.present:
                off += e.nr_pages * PAGE_SIZE
        return out

    @property
    def present_pages(self) -> int:
        return sum(e.nr_pages for e in self.entries if e.present)

    @property
    def lazy_pages(self) -> int:
        return sum(e.nr_pages for e in self.entries if e.present and e.lazy)


# -- protobuf (the subset pagemaps use: varints, and skipping other wire types) --------------


def _varint(buf: bytes | memoryview, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end:
            raise CorruptImage("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise CorruptImage("varint longer than 10 bytes")


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _fields(buf: bytes | memoryview) -> dict[int, int]:
    """Varint fields of one message (field number -> last value); other wire types skipped."""
    out: dict[int, int] = {}
    i, end = 0, len(buf)
    while i < end:
        key, i = _varint(buf, i, end)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise CorruptImage("protobuf field number 0")
        if wire == 0:
            out[num], i = _varint(buf, i, end)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            i += n
        else:
            raise CorruptImage(f"protobuf wire type {wire} is not supported")
        if i > end:
            raise CorruptImage("protobuf field runs past its message")
    return out


def _entries(data: bytes | memoryview, magic: int) -> list[memoryview]:
    mv = memoryview(data)
    if len(mv) < 8:
        raise CorruptImage(f"image of {len(mv)} bytes has no head")
    head, own = struct.unpack_from("<II", mv, 0)
    if head != IMG_COMMON_MAGIC or own != magic:
        raise CorruptImage(f"image magic {head:#x}/{own:#x} is not {IMG_COMMON_MAGIC:#x}/{magic:#x}")
    out, i = [], 8
    while i < len(mv):
        if i + 4 > len(mv):
            raise CorruptImage("truncated entry length")
        (n,) = struct.unpack_from("<I", mv, i)
        i += 4
        if i + n > len(mv):
            raise CorruptImage(f"entry of {n} bytes runs past the image's end")
        out.append(mv[i:i + n])
        i += n
        if len(out) > MAX_ENTRIES + 1:
            raise CorruptImage(f"more than {MAX_ENTRIES} entries")
    return out


def parse_pagemap(data: bytes | memoryview) -> Pagemap:
    """Parse a ``pagemap-<pid>.img``.

    Raises:
        CorruptImage: bad magic, truncation, a missing required field, entries out of address
            order or overlapping, an ``in_parent`` entry (incremental dumps are not used here).
    """
    ents = _entries(data, PAGEMAP_MAGIC)
    if not ents:
        raise CorruptImage("pagemap has no head")
    head = _fields(ents[0])
    if 1 not in head or head[1] >= 1 << 32:
        raise CorruptImage("pagemap head has no pages id")
    pm = Pagemap(head[1])
    prev_end = 0
    for k, raw in enumerate(ents[1:]):
        f = _fields(raw)
        if 1 not in f or (2 not in f and 5 not in f):
            raise CorruptImage(f"pagemap entry {k} lacks vaddr or nr_pages")
        vaddr = f[1]
        nr = f.get(5, f.get(2, 0))
        flags = f.get(4, PE_PRESENT)  # images older than flags: present
        if f.get(3):
            raise CorruptImage(f"pagemap entry {k} is in a parent image (incremental dump)")
        if vaddr % PAGE_SIZE or vaddr >= _VADDR_LIMIT or not 0 < nr <= MAX_PAGES \
                or vaddr + nr * PAGE_SIZE > _VADDR_LIMIT or flags >= 1 << 8:
            raise CorruptImage(f"pagemap entry {k} is out of range")
        if vaddr < prev_end:
            raise CorruptImage(f"pagemap entry {k} overlaps or precedes the one before it")
        prev_end = vaddr + nr * PAGE_SIZE
        pm.entries.append(PagemapEntry(vaddr, nr, flags))
    return pm


def encode_pagemap(pm: Pagemap) -> bytes:
    """The image bytes of ``pm`` (as CRIU writes them: ``nr_pages`` in both its fields)."""
    out = bytearray(struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC))

    def put(msg: bytearray) -> None:
        out.extend(struct.pack("<I", len(msg)))
        out.extend(msg)

    head = bytearray()
    _put_varint(head, 1 << 3)
    _put_varint(head, pm.pages_id)
    put(head)
    for e in pm.entries:
        m = bytearray()
        for num, value in ((1, e.vaddr), (2, e.nr_pages & 0xFFFFFFFF), (4, e.flags), (5, e.nr_pages)):
            _put_varint(m, num << 3)
            _put_varint(m, value)
        put(m)
    return bytes(out)
