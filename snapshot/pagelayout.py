"""How a snapshot's memory pages are laid out in the store: by address windows, so snapshots of
the same engine share chunks.

CRIU writes a process's pages back to back (``pages-N.img``), so one page more or less early in
the address space shifts every later page against casfs's fixed chunk boundaries, and two
snapshots of one engine (another model, another host) share almost no chunk. At checkpoint,
``relayout_dump`` rewrites the dump instead:

* ``casfs-pages/pages-N.win``: the lazily restorable pages (private anonymous memory) in
  address *windows* of ``window`` bytes (the image's chunk size), one window after another in
  address order, each holding its pages at their offset inside the window and zeros where the
  process had none. A window's bytes depend only on that window of memory, so equal windows
  are equal chunks wherever they are. Measured, tiny vLLM replica, second model's snapshot
  against the first (deterministic spawn): pages in a window the first snapshot also holds,
  64 KiB windows 55%, 256 KiB 38%, 1 MiB 22%, 4 MiB 5.5%, against ~0% for CRIU's own files.
* ``casfs-lazy/pagemap-<pid>.img`` and ``casfs-lazy/pages-N.img``: what ``criu restore
  --lazy-pages`` reads itself, in the layout ``criu dump --lazy-pages`` writes (lazy entries
  not present; the few eager pages: relocated library data, stacks).
* the original ``pagemap-<pid>.img`` stays (it says where every page was); ``pages-N.img`` goes.

Restores from the store read the window files through the page server; an eager restore (the
per-host export) puts CRIU's ``pages-N.img`` back together with ``rebuild_pages`` (the export
then holds the pages twice: the window files, checked against the image, and CRIU's files,
checked against a rebuild from them: ``snapshot.exports``).
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from .criuimg import PAGE_SIZE, PE_LAZY, PE_PRESENT, Pagemap, PagemapEntry, encode_pagemap, parse_pagemap

__all__ = ["LAZY_DIR", "WINDOW_DIR", "WindowMap", "pages_id", "rebuild_from_export", "rebuild_pages",
           "relayout_dump", "split_lazy"]

WINDOW_DIR = "casfs-pages"
META_FILE_NAME = "casfs-snapshot.json"  # snapshot.meta.META_FILE (meta imports casfs only; no cycle)
LAZY_DIR = "casfs-lazy"
TASK_PAGEMAP = re.compile(r"^pagemap-(\d+)\.img$")


def split_lazy(pm: Pagemap) -> Pagemap:
    """``pm`` with its lazy entries marked not present (the eager entries unchanged)."""
    return Pagemap(pm.pages_id, [PagemapEntry(e.vaddr, e.nr_pages, (e.flags & ~PE_PRESENT) | PE_LAZY)
                                 if e.present and e.lazy else e for e in pm.entries])


@dataclass
class WindowMap:
    """Where lazy pages are in a window file: runs of adjacent windows (address start, end,
    file offset), from the process's original pagemap."""

    window: int
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    windows: int = 0

    @classmethod
    def of(cls, pm: Pagemap, window: int) -> "WindowMap":
        if window < PAGE_SIZE or window % PAGE_SIZE:
            raise ValueError(f"window {window} is not a multiple of the page size")
        bases: list[int] = []
        for e in pm.entries:
            if not (e.present and e.lazy):
                continue
            first, last = e.vaddr // window, (e.end - 1) // window
            if bases and bases[-1] >= first:
                first = bases[-1] + 1
            bases.extend(range(first, last + 1))
        out = cls(window, windows=len(bases))
        for k, b in enumerate(bases):
            if out.ends and out.ends[-1] == b * window:
                out.ends[-1] += window
            else:
                out.starts.append(b * window)
                out.ends.append((b + 1) * window)
                out.offsets.append(k * window)
        return out

    def locate(self, vaddr: int, nbytes: int) -> int | None:
        """Offset in the window file of [vaddr, vaddr+nbytes), or None if not inside one run."""
        k = bisect.bisect_right(self.starts, vaddr) - 1
        if k < 0 or vaddr + nbytes > self.ends[k]:
            return None
        return self.offsets[k] + (vaddr - self.starts[k])


def relayout_dump(dumpdir: str, window: int) -> dict:
    """Rewrite a CRIU dump directory into the window layout (see the module docstring).

    Returns counts: ``lazy_pages``, ``eager_pages``, ``window_bytes``.

    Raises:
        ValueError: a malformed pagemap or a missing pages file.
    """
    os.makedirs(os.path.join(dumpdir, WINDOW_DIR), exist_ok=True)
    os.makedirs(os.path.join(dumpdir, LAZY_DIR), exist_ok=True)
    stats = {"lazy_pages": 0, "eager_pages": 0, "window_bytes": 0}
    for name in sorted(os.listdir(dumpdir)):
        if not TASK_PAGEMAP.match(name):
            continue
        with open(os.path.join(dumpdir, name), "rb") as f:
            pm = parse_pagemap(f.read())
        src_path = os.path.join(dumpdir, f"pages-{pm.pages_id}.img")
        wm = WindowMap.of(pm, window)
        win_path = os.path.join(dumpdir, WINDOW_DIR, f"pages-{pm.pages_id}.win")
        eager_path = os.path.join(dumpdir, LAZY_DIR, f"pages-{pm.pages_id}.img")
        with open(src_path, "rb") as src, open(win_path, "wb") as win, open(eager_path, "wb") as eager:
            win.truncate(wm.windows * window)  # holes: zeros where no page was
            for e, off in zip(pm.entries, pm.file_offsets()):
                if not e.present:
                    continue
                data = os.pread(src.fileno(), e.nr_pages * PAGE_SIZE, off)
                if len(data) != e.nr_pages * PAGE_SIZE:
                    raise ValueError(f"pages-{pm.pages_id}.img is shorter than {name} says")
                if e.lazy:
                    at = wm.locate(e.vaddr, len(data))
                    assert at is not None
                    os.pwrite(win.fileno(), data, at)
                    stats["lazy_pages"] += e.nr_pages
                else:
                    eager.write(data)
                    stats["eager_pages"] += e.nr_pages
        with open(os.path.join(dumpdir, LAZY_DIR, name), "wb") as f:
            f.write(encode_pagemap(split_lazy(pm)))
        os.unlink(src_path)
        stats["window_bytes"] += wm.windows * window
    return stats


def rebuild_pages(pm: Pagemap, window: int, read_window: Callable[[int, int], bytes],
                  read_eager: Callable[[int, int], bytes], out: Callable[[bytes], object]) -> int:
    """CRIU's ``pages-N.img`` for ``pm``, from a window file and an eager pages file
    (``read_*(offset, n)``), handed to ``out`` piece by piece in file order. Returns the bytes.

    Raises:
        ValueError: a source is shorter than the pagemap says.
    """
    wm = WindowMap.of(pm, window)
    eager_off = written = 0
    for e in pm.entries:
        if not e.present:
            continue
        n = e.nr_pages * PAGE_SIZE
        if e.lazy:
            at = wm.locate(e.vaddr, n)
            data = read_window(at, n) if at is not None else b""
        else:
            data = read_eager(eager_off, n)
            eager_off += n
        if len(data) != n:
            raise ValueError(f"pages-{pm.pages_id}.img cannot be rebuilt: a source is short")
        out(data)
        written += n
    return written


def pages_id(pagemap_path: str) -> int:
    """The pages file id a pagemap image names."""
    with open(pagemap_path, "rb") as f:
        return parse_pagemap(f.read()).pages_id


def rebuild_from_export(export_dir: str, rel: str, out: Callable[[bytes], object]) -> int:
    """CRIU's ``rel`` (``pages-N.img``) of a window-layout snapshot's export, rebuilt from the
    export's window and eager pages files and handed to ``out``. Returns the bytes.

    Raises:
        ValueError: no task pagemap names ``rel``, or a source is short.
    """
    with open(os.path.join(export_dir, META_FILE_NAME), encoding="utf-8") as f:
        import json

        window = int(json.load(f)["layout"]["window"])
    for name in sorted(os.listdir(export_dir)):
        if not TASK_PAGEMAP.match(name):
            continue
        with open(os.path.join(export_dir, name), "rb") as f:
            pm = parse_pagemap(f.read())
        if f"pages-{pm.pages_id}.img" != rel:
            continue
        win = os.path.join(export_dir, WINDOW_DIR, f"pages-{pm.pages_id}.win")
        eager = os.path.join(export_dir, LAZY_DIR, f"pages-{pm.pages_id}.img")
        with open(win, "rb") as w, open(eager, "rb") as e:
            return rebuild_pages(pm, window, lambda off, n: os.pread(w.fileno(), n, off),
                                 lambda off, n: os.pread(e.fileno(), n, off), out)
    raise ValueError(f"no pagemap of {export_dir} names {rel}")
