"""Fuzz target: ``snapshot.criuimg.parse_pagemap`` on hostile CRIU pagemap images.

Contract under test: for any bytes, ``parse_pagemap`` returns a pagemap whose entries are
page-aligned, non-empty, in address order and not overlapping, or raises ``CorruptImage``;
nothing else escapes. What it returns encodes and parses back to the same pagemap.

Two input modes (first byte): raw image bytes, or structured: a ``FuzzedDataProvider`` builds a
valid pagemap (boundary addresses, sizes and flags), encodes it, and damages the encoding
(bytes set, lengths cut or inflated), so most inputs get past the head and into the entries.

Run: ``.venv/bin/python fuzz/fuzz_criuimg.py fuzz/corpus-criuimg -max_total_time=60``.
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

with atheris.instrument_imports(include=["snapshot.criuimg"]):
    from snapshot.criuimg import (PAGE_SIZE, CorruptImage, Pagemap, PagemapEntry, encode_pagemap,
                                  parse_pagemap)


def _structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    entries = []
    addr = fdp.ConsumeIntInRange(0, 1 << 45) * PAGE_SIZE
    for _ in range(fdp.ConsumeIntInRange(0, 12)):
        addr += fdp.ConsumeIntInRange(0, 3) * PAGE_SIZE
        nr = fdp.PickValueInList([1, 2, 1 << 18, (1 << 32) - 1, 1 << 32, fdp.ConsumeIntInRange(1, 1 << 40)])
        entries.append(PagemapEntry(addr, nr, fdp.ConsumeIntInRange(0, 7)))
        addr += nr * PAGE_SIZE
    raw = bytearray(encode_pagemap(Pagemap(fdp.ConsumeIntInRange(0, (1 << 33)), entries)))
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        if not raw:
            break
        at = fdp.ConsumeIntInRange(0, len(raw) - 1)
        how = fdp.ConsumeIntInRange(0, 3)
        if how == 0:
            raw[at] = fdp.ConsumeIntInRange(0, 255)
        elif how == 1:
            del raw[at:]
        elif how == 2 and at + 4 <= len(raw):
            raw[at:at + 4] = struct.pack("<I", fdp.PickValueInList([0, 1, 0x7FFFFFFF, 0xFFFFFFFF]))
        else:
            raw[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12))
    return bytes(raw)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    image = data[1:] if data[0] & 1 == 0 else _structured(atheris.FuzzedDataProvider(data[1:]))
    try:
        pm = parse_pagemap(image)
    except CorruptImage:
        return
    prev = 0
    for e in pm.entries:
        assert e.vaddr % PAGE_SIZE == 0 and e.nr_pages > 0 and e.vaddr >= prev, e
        prev = e.end
    assert parse_pagemap(encode_pagemap(pm)) == pm


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
