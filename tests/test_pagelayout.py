"""snapshot.pagelayout: CRIU's pages files re-laid by address window and put back together.

Synthetic dumps (a pagemap and its pages file, as CRIU writes them) go through
``relayout_dump`` and come back through ``rebuild_pages`` byte for byte; equal windows of two
dumps give equal window bytes wherever else the dumps differ (what makes their chunks dedup).
"""

from __future__ import annotations

import os
import random

from hypothesis import given, settings, strategies as st

from snapshot.criuimg import PAGE_SIZE, PE_LAZY, PE_PRESENT, Pagemap, PagemapEntry, encode_pagemap, parse_pagemap
from snapshot.pagelayout import LAZY_DIR, WINDOW_DIR, WindowMap, rebuild_pages, relayout_dump, split_lazy

WINDOW = 4 * PAGE_SIZE


@st.composite
def dumps(draw) -> tuple[Pagemap, bytes]:
    addr = draw(st.integers(16, 1 << 20)) * PAGE_SIZE
    entries = []
    for _ in range(draw(st.integers(1, 12))):
        addr += draw(st.integers(0, 9)) * PAGE_SIZE
        nr = draw(st.integers(1, 11))
        entries.append(PagemapEntry(addr, nr, draw(st.sampled_from([PE_PRESENT | PE_LAZY, PE_PRESENT, PE_LAZY]))))
        addr += nr * PAGE_SIZE
    pm = Pagemap(7, entries)
    rng = random.Random(draw(st.integers(0, 1 << 30)))
    pages = rng.randbytes(pm.present_pages * PAGE_SIZE)
    return pm, pages


def _dump(tmp, pm: Pagemap, pages: bytes) -> str:
    d = str(tmp)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "pagemap-1.img"), "wb") as f:
        f.write(encode_pagemap(pm))
    with open(os.path.join(d, f"pages-{pm.pages_id}.img"), "wb") as f:
        f.write(pages)
    return d


@settings(max_examples=60, deadline=None)
@given(dumps())
def test_relayout_then_rebuild_gives_back_crius_pages_file_byte_for_byte(tmp_path_factory, dump):
    pm, pages = dump
    d = _dump(tmp_path_factory.mktemp("dump"), pm, pages)
    stats = relayout_dump(d, WINDOW)
    assert not os.path.exists(os.path.join(d, "pages-7.img"))
    assert stats["lazy_pages"] == pm.lazy_pages and stats["eager_pages"] == pm.present_pages - pm.lazy_pages
    assert parse_pagemap(open(os.path.join(d, LAZY_DIR, "pagemap-1.img"), "rb").read()) == split_lazy(pm)
    win = open(os.path.join(d, WINDOW_DIR, "pages-7.win"), "rb").read()
    eager = open(os.path.join(d, LAZY_DIR, "pages-7.img"), "rb").read()
    assert len(win) % WINDOW == 0 and len(eager) == stats["eager_pages"] * PAGE_SIZE
    out = bytearray()
    rebuild_pages(pm, WINDOW, lambda o, n: win[o:o + n], lambda o, n: eager[o:o + n], out.extend)
    assert bytes(out) == pages


def test_a_window_holds_its_pages_at_their_offset_so_equal_windows_are_equal_bytes(tmp_path):
    base = 0x7F0000000000
    same = os.urandom(2 * PAGE_SIZE)
    # dump A: a page before the shared window; dump B: three pages before it and a hole in it
    a = Pagemap(1, [PagemapEntry(base, 1, PE_PRESENT | PE_LAZY),
                    PagemapEntry(base + 8 * PAGE_SIZE, 2, PE_PRESENT | PE_LAZY)])
    b = Pagemap(1, [PagemapEntry(base, 3, PE_PRESENT | PE_LAZY),
                    PagemapEntry(base + 8 * PAGE_SIZE, 2, PE_PRESENT | PE_LAZY)])
    wins = []
    for name, pm, head in (("a", a, os.urandom(PAGE_SIZE)), ("b", b, os.urandom(3 * PAGE_SIZE))):
        d = _dump(tmp_path / name, pm, head + same)
        relayout_dump(d, WINDOW)
        wins.append(open(os.path.join(d, WINDOW_DIR, "pages-1.win"), "rb").read())
    # the window at base + 8 pages is the second window of both files, equal byte for byte,
    # although CRIU's files put its pages at different offsets (1 vs 3 pages in)
    assert wins[0][WINDOW:2 * WINDOW] == wins[1][WINDOW:2 * WINDOW] == same + bytes(2 * PAGE_SIZE)
    assert WindowMap.of(a, WINDOW).locate(base + 9 * PAGE_SIZE, PAGE_SIZE) == WINDOW + PAGE_SIZE
