"""Restoring straight from the store: no copy of the snapshot's pages on the host first.

``restore(..., source="store")`` (lazy) runs CRIU on a small work directory and serves the
memory pages from the casfs store as the restored processes touch them:

1. ``prepare_images`` writes the image files CRIU reads itself into the restore's work dir,
   each from a verified casfs read: the process tree's metadata (a few MB: cores, mms, files,
   sockets), every pagemap with its lazy entries not present, and per process a pages file
   holding only the pages CRIU restores eagerly (those outside private anonymous memory:
   relocated library data, stacks; ~1-3% of a Python process's pages): the layout ``criu dump
   --lazy-pages`` writes. Snapshots in the window layout (``snapshot.pagelayout``) store these
   ready; older ones are split here.
2. ``snapshot.pageserver.PageServer`` answers ``criu lazy-pages --page-server`` on a socket
   pair with the rest, from the image's window files (or CRIU's ``pages-N.img``) in the store
   (verified reads).
3. The pages the first restore faults in (in first-touch order, by chunk) are saved as the
   snapshot image's startup profile (``casfs.save_profile``), unless it has one. Later
   restores, on any host, fetch those pages first (on the store's threads) and hand their
   pages to CRIU as eager pages (``hot``): a booting Python process touches tens of thousands
   of pages (the tiny vLLM replica: ~38,000 pages, 151 MB, before its first token), and a
   lazy fault is a round trip through the daemon and this process (~0.3 ms each on the busy
   2-core VM), so the working set goes in with CRIU's own bulk copy and only the rest is lazy.

Decisions, measured on the 2-core VM (docs/benchmarks.md, "CPU snapshots"): a page server
over CRIU's own protocol instead of the pages files read through a casfs FUSE mount: the
mount costs a daemon start per restore (or a long-lived one per image), every page crosses
the kernel's page cache twice, and its faults cannot be put in first-touch order; the page
server runs in the restoring process, reads chunks through the store's memory tier, and
knows which request is a fault.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import shutil
import tempfile
import stat as statmod
from dataclasses import dataclass, field

import casfs

from .criuimg import PAGE_SIZE, PE_LAZY, PE_PRESENT, Pagemap, PagemapEntry, encode_pagemap, parse_pagemap
from .meta import EXTRA_DIR, META_FILE
from .pagelayout import LAZY_DIR, WINDOW_DIR, WindowMap, split_lazy
from .pageserver import PageServer, ProcessPages

__all__ = ["PreparedImages", "prepare_images", "save_startup_profile", "startup_profile"]

log = logging.getLogger("snapshot.cpu")

_TASK_PAGEMAP = re.compile(r"^pagemap-(\d+)\.img$")
_PAGES = re.compile(r"^pages-(\d+)\.img$")
_ANY_PAGEMAP = re.compile(r"^pagemap-.*\.img$")
MAX_META_FILE = 256 << 20  # any single non-pages image file larger than this is refused


@dataclass
class PreparedImages:
    """What ``prepare_images`` wrote: the image dir for CRIU, and where each process's lazy
    pages are in the store (pid -> ProcessPages) for the page server."""

    imgdir: str
    processes: dict[int, ProcessPages] = field(default_factory=dict)
    files: int = 0
    bytes_written: int = 0
    lazy_pages: int = 0
    eager_pages: int = 0
    hot_pages: int = 0


def _write(path: str, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)


def prepare_images(image: casfs.Image, imgdir: str, meta: dict | None = None,
                   hot: dict[tuple[int, int], int] | None = None,
                   hot_data: bytes | None = None) -> PreparedImages:
    """Write the image files CRIU reads itself (see the module docstring) under ``imgdir``.

    Snapshots stored in the window layout (``snapshot.pagelayout``, ``meta["layout"]``) carry
    their lazy-restore pagemaps and eager pages ready (``casfs-lazy/``); older ones are split
    here, reading the eager pages out of CRIU's pages files. ``hot`` (casfs entry, page number)
    are window-file pages CRIU restores eagerly (the startup profile's; window layout only),
    read from ``hot_data`` (page k at ``hot[...] == k``) or, without it, from the windows.

    Raises:
        ValueError: the image is not a CRIU image directory this can restore lazily (a pages
            file without its pagemap, an incremental dump, a malformed pagemap).
        casfs.ChunkUnavailable / casfs.CorruptChunk: the store cannot supply a file.
    """
    os.makedirs(imgdir, exist_ok=True)
    layout = (meta or {}).get("layout") or {}
    if layout.get("kind") == "windows":
        return _prepare_windows(image, imgdir, int(layout["window"]), hot, hot_data)
    return _prepare_criu_layout(image, imgdir)


def _copy_meta_file(image: casfs.Image, rel: str, dest: str, out: PreparedImages) -> bytes:
    st = image.stat(rel)
    if not statmod.S_ISREG(st.mode):
        raise ValueError(f"snapshot image entry {rel!r} is not a regular file")
    if st.size > MAX_META_FILE:
        raise ValueError(f"snapshot image file {rel!r} is {st.size} bytes: too large for a CRIU image")
    data = image.read(rel)
    _write(dest, data)
    out.files += 1
    out.bytes_written += len(data)
    return data


def _prepare_windows(image: casfs.Image, imgdir: str, window: int,
                     hot: dict[tuple[int, int], int] | None, hot_data: bytes | None) -> PreparedImages:
    out = PreparedImages(imgdir)
    own: set[str] = set()
    for name in image.listdir(""):
        if name in (META_FILE, EXTRA_DIR, WINDOW_DIR, LAZY_DIR):
            continue
        task = _TASK_PAGEMAP.match(name)
        if not task:
            _copy_meta_file(image, name, os.path.join(imgdir, name), out)  # shmem pagemaps and pages too
            continue
        try:
            pm = parse_pagemap(image.read(name))
        except ValueError as e:
            raise ValueError(f"snapshot image file {name}: {e}") from None
        win = f"{WINDOW_DIR}/pages-{pm.pages_id}.win"
        if not image.exists(win):
            raise ValueError(f"{name} names {win}, which the snapshot lacks")
        wm = WindowMap.of(pm, window)
        entry = image.lookup(win)
        out.processes[int(task.group(1))] = ProcessPages(entry, wm.starts, wm.ends, wm.offsets)
        mine = {p: k for (e, p), k in hot.items() if e == entry} if hot else {}
        if mine:
            _write_with_hot_pages(image, imgdir, name, pm, wm, entry, mine, hot_data, out)
            own.update((name, f"pages-{pm.pages_id}.img"))
        else:
            out.lazy_pages += pm.lazy_pages
            out.eager_pages += pm.present_pages - pm.lazy_pages
    for name in image.listdir(LAZY_DIR):
        if name not in own:
            _copy_meta_file(image, f"{LAZY_DIR}/{name}", os.path.join(imgdir, name), out)
    return out


def _write_with_hot_pages(image: casfs.Image, imgdir: str, name: str, pm: Pagemap, wm: WindowMap,
                          entry: int, hot: dict[int, int], hot_data: bytes | None,
                          out: PreparedImages) -> None:
    """The lazy-restore pagemap and eager pages file of one process, with its hot pages (page
    numbers in its window file: the startup profile, what its first restore faulted in)
    restored eagerly by CRIU instead of one page fault at a time: a Python process touches
    tens of thousands of pages before it answers a request, and each lazy fault is a round
    trip through the daemon."""
    window = wm.window
    per = window // PAGE_SIZE
    hot_windows = {p // per for p in hot}
    hot_sorted = sorted(hot)
    eager_src = image.lookup(f"{LAZY_DIR}/pages-{pm.pages_id}.img")
    # every chunk this needs, fetched (and verified) on the store's threads first: the reads
    # below then find them in memory, in file order
    image.prefetch_entry(eager_src)
    if hot_data is None:
        for j in sorted(hot_windows):
            image.prefetch_entry(entry, j * window, window)
    local = Pagemap(pm.pages_id)
    eager_off = 0
    cur: list = [None, b""]  # the window last read: (number, bytes)

    def hot_bytes(off: int, n: int) -> bytes:
        j = off // window
        if cur[0] != j:
            cur[0], cur[1] = j, image.read_entry(entry, j * window, window)
        return cur[1][off - j * window:off - j * window + n]

    pages = bytearray()  # written in one go: thousands of small writes to tmpfs cost ~1 s here
    hot_view = memoryview(hot_data) if hot_data is not None else None
    for e in pm.entries:
        if not e.present:
            local.entries.append(e)
            continue
        if not e.lazy:
            n = e.nr_pages * PAGE_SIZE
            data = image.read_entry(eager_src, eager_off, n)
            if len(data) != n:
                raise ValueError(f"{LAZY_DIR}/pages-{pm.pages_id}.img is shorter than {name} says")
            eager_off += n
            pages += data
            local.entries.append(e)
            out.eager_pages += e.nr_pages
            continue
        # the entry's pages lie back to back in the window file (from page p0); its hot pages
        # (sorted page numbers) cut it into hot and cold runs
        p0 = wm.locate(e.vaddr, e.nr_pages * PAGE_SIZE) // PAGE_SIZE
        runs: list[list] = []  # [start address, end address, hot]
        at = p0
        for i in range(bisect.bisect_left(hot_sorted, p0), bisect.bisect_left(hot_sorted, p0 + e.nr_pages)):
            p = hot_sorted[i]
            if p > at:
                runs.append([e.vaddr + (at - p0) * PAGE_SIZE, e.vaddr + (p - p0) * PAGE_SIZE, False])
            if runs and runs[-1][2] and runs[-1][1] == e.vaddr + (p - p0) * PAGE_SIZE:
                runs[-1][1] += PAGE_SIZE
            else:
                runs.append([e.vaddr + (p - p0) * PAGE_SIZE, e.vaddr + (p - p0 + 1) * PAGE_SIZE, True])
            at = p + 1
        if at < p0 + e.nr_pages:
            runs.append([e.vaddr + (at - p0) * PAGE_SIZE, e.end, False])
        for start, end, is_hot in runs:
            nr = (end - start) // PAGE_SIZE
            if not is_hot:
                local.entries.append(PagemapEntry(start, nr, PE_LAZY))
                out.lazy_pages += nr
                continue
            off = wm.locate(start, end - start)
            x = off
            while x < off + (end - start):  # a run never leaves its window
                if hot_data is None:
                    data = hot_bytes(x, off + (end - start) - x)
                else:  # as many pages as lie back to back in the hot file too
                    k = hot[x // PAGE_SIZE]
                    n = 1
                    while x + n * PAGE_SIZE < off + (end - start) and hot.get(x // PAGE_SIZE + n) == k + n:
                        n += 1
                    data = hot_view[k * PAGE_SIZE:(k + n) * PAGE_SIZE]
                if not data or len(data) % PAGE_SIZE:
                    raise ValueError(f"{WINDOW_DIR}/pages-{pm.pages_id}.win is shorter than {name} says")
                pages += data
                x += len(data)
            local.entries.append(PagemapEntry(start, nr, PE_PRESENT))
            out.eager_pages += nr
            out.hot_pages += nr
    _write(os.path.join(imgdir, f"pages-{pm.pages_id}.img"), pages)
    encoded = encode_pagemap(local)
    _write(os.path.join(imgdir, name), encoded)
    out.files += 2


def _prepare_criu_layout(image: casfs.Image, imgdir: str) -> PreparedImages:
    out = PreparedImages(imgdir)
    names = image.listdir("")
    pages_entries: dict[int, int] = {}
    for name in names:
        m = _PAGES.match(name)
        if m:
            pages_entries[int(m.group(1))] = image.lookup(name)
    used_pages: set[int] = set()
    for name in names:
        if name in (META_FILE, EXTRA_DIR) or _PAGES.match(name):
            continue
        if not _ANY_PAGEMAP.match(name):
            _copy_meta_file(image, name, os.path.join(imgdir, name), out)
            continue
        try:
            pm = parse_pagemap(image.read(name))
        except ValueError as e:
            raise ValueError(f"snapshot image file {name}: {e}") from None
        out.files += 1
        entry = pages_entries.get(pm.pages_id)
        if entry is None:
            raise ValueError(f"{name} names pages-{pm.pages_id}.img, which the snapshot lacks")
        used_pages.add(pm.pages_id)
        task = _TASK_PAGEMAP.match(name)
        local = split_lazy(pm) if task else pm  # CRIU's lazy-pages daemon serves task memory only
        with open(os.path.join(imgdir, f"pages-{pm.pages_id}.img"), "wb") as pages:
            for e, off in zip(local.entries, pm.file_offsets()):
                if e.present:
                    n = e.nr_pages * PAGE_SIZE
                    data_e = image.read_entry(entry, off, n)
                    if len(data_e) != n:
                        raise ValueError(f"pages-{pm.pages_id}.img is shorter than {name} says")
                    pages.write(data_e)
                    out.eager_pages += e.nr_pages
                    out.bytes_written += n
                elif e.lazy:
                    out.lazy_pages += e.nr_pages
        encoded = encode_pagemap(local)
        _write(os.path.join(imgdir, name), encoded)
        out.bytes_written += len(encoded)
        if task:
            out.processes[int(task.group(1))] = ProcessPages.from_pagemap(entry, pm)
    missing = set(pages_entries) - used_pages
    if missing:
        raise ValueError(f"pages files without a pagemap in the snapshot: {sorted(missing)}")
    return out


# -- the startup profile of a snapshot: the chunks its restores fault in first ----------------


HOT_FILE = "pages"
HOT_META = "hot.json"
HOT_CHUNK_SIZE = 1 << 20


def hot_tag(image_id: str) -> str:
    """The tag of the image holding a snapshot's hot pages (its startup profile's bytes)."""
    return f"snapshot-hot.{image_id}"


def startup_profile(image: casfs.Image) -> tuple[bool, dict[tuple[int, int], int], bytes | None]:
    """The snapshot's startup profile: (whether this restore should record one: True when the
    image has none; its hot pages: (casfs entry, page number) -> index in the hot file, in the
    order the first restore faulted them in; the hot file's bytes, or None when that image is
    missing or does not match, and the pages are read from the snapshot's windows instead).

    The profile is kept at page granularity (``Profile.chunk_size`` is the page size; each item
    names a page and the window chunk holding it); the hot pages' bytes, back to back in that
    order, are a small image of their own (``hot_tag``: 1 MiB chunks), so a restore fetches a
    few dozen chunks instead of the thousands of 64 KiB windows the pages are spread over. An
    item that no longer matches the image is dropped. A profile that cannot be read costs only
    its prefetch: logged, then (False, {}, None)."""
    try:
        prof = casfs.load_profile(image.store, image.id)
    except casfs.CasfsError as e:
        log.warning("startup profile of snapshot %s unusable: %s", image.id[:12], e)
        return False, {}, None
    if prof is None:
        return True, {}, None
    if prof.chunk_size != PAGE_SIZE:
        return False, {}, None
    hot: dict[tuple[int, int], int] = {}
    refs: dict[int, list] = {}
    pers: dict[int, int] = {}
    for k, it in enumerate(prof.items):
        if it.entry not in refs:
            try:
                refs[it.entry] = image.chunk_refs(it.entry)
                pers[it.entry] = image.file_chunk_size(it.entry) // PAGE_SIZE
            except (casfs.CasfsError, IndexError, ValueError, OSError):
                refs[it.entry] = []
                pers[it.entry] = 1
        mine, per = refs[it.entry], pers[it.entry]
        if it.chunk // per < len(mine) and mine[it.chunk // per] == it.ref:
            hot.setdefault((it.entry, it.chunk), k)
    return False, hot, _hot_bytes(image, [(it.entry, it.chunk) for it in prof.items])


def _hot_bytes(image: casfs.Image, pages: list[tuple[int, int]]) -> bytes | None:
    """The hot file of ``image`` when its image exists and names exactly these pages."""
    try:
        hot = image.store.open_image(hot_tag(image.id))
        doc = json.loads(hot.read(HOT_META))
        if doc.get("snapshot") != image.id or [tuple(p) for p in doc.get("pages", [])] != pages:
            log.warning("hot pages of snapshot %s do not match its profile: reading its windows", image.id[:12])
            return None
        data = hot.read(HOT_FILE)
    except casfs.ImageNotFound:
        return None
    except (casfs.CasfsError, ValueError, TypeError) as e:
        log.warning("hot pages of snapshot %s unusable (%s): reading its windows", image.id[:12], e)
        return None
    return data if len(data) == len(pages) * PAGE_SIZE else None


def save_startup_profile(image: casfs.Image, server: PageServer) -> dict | None:
    """Store the pages ``server``'s faults touched, in order, as the image's startup profile,
    and their bytes as its hot-pages image (``hot_tag``); nothing when the restore failed or
    touched nothing. Returns {"key", "pages", "hot_image"} or None.

    Runs after the restore handed the process all its pages (in the background of a serving
    replica): the bytes are read again from the store (verified), window by window."""
    if server.error or not server.touched:
        return None
    items = [casfs.ProfileItem(e, p, image.chunk_refs(e, p * PAGE_SIZE, 1)[0]) for e, p in server.touched]
    data = bytearray(len(items) * PAGE_SIZE)
    window = image.chunk_size
    per = window // PAGE_SIZE
    by_window: dict[tuple[int, int], list[int]] = {}
    for k, (e, p) in enumerate(server.touched):
        by_window.setdefault((e, p // per), []).append(k)
    for (e, j), ks in sorted(by_window.items()):
        chunk = image.read_entry(e, j * window, window)
        for k in ks:
            at = (server.touched[k][1] - j * per) * PAGE_SIZE
            data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE] = chunk[at:at + PAGE_SIZE]
    tmp = tempfile.mkdtemp(prefix="casfs-hot-")
    try:
        with open(os.path.join(tmp, HOT_FILE), "wb") as f:
            f.write(data)
        with open(os.path.join(tmp, HOT_META), "w", encoding="utf-8") as f:
            json.dump({"snapshot": image.id, "pages": server.touched}, f)
        # raw: a restore reads all of it before CRIU starts, and zstd decompression (~0.6 GiB/s a
        # core) was most of that read on the 2-core VM; raw it is a verified copy
        res = casfs.build(image.store, tmp, tag=hot_tag(image.id), chunk_size=HOT_CHUNK_SIZE,
                          progress=False, compress="never")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    key = casfs.save_profile(image.store, casfs.Profile(image.id, PAGE_SIZE, items))
    log.info("startup profile of snapshot %s saved: %d pages (hot pages image %s)", image.id[:12],
             len(items), res.image_id[:12])
    return {"key": key, "pages": len(items), "hot_image": res.image_id}
