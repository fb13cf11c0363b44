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
   snapshot image's startup profile (``casfs.save_profile``), unless it has one; later
   restores, on any host, fetch those chunks first (``casfs.ProfileReplayer``) while CRIU runs.

Decisions, measured on the 2-core VM (docs/benchmarks.md, "CPU snapshots"): a page server
over CRIU's own protocol instead of the pages files read through a casfs FUSE mount: the
mount costs a daemon start per restore (or a long-lived one per image), every page crosses
the kernel's page cache twice, and its faults cannot be put in first-touch order; the page
server runs in the restoring process, reads chunks through the store's memory tier, and
knows which request is a fault.
"""

from __future__ import annotations

import logging
import os
import re
import stat as statmod
from dataclasses import dataclass, field

import casfs

from .criuimg import PAGE_SIZE, encode_pagemap, parse_pagemap
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


def _write(path: str, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)


def prepare_images(image: casfs.Image, imgdir: str, meta: dict | None = None) -> PreparedImages:
    """Write the image files CRIU reads itself (see the module docstring) under ``imgdir``.

    Snapshots stored in the window layout (``snapshot.pagelayout``, ``meta["layout"]``) carry
    their lazy-restore pagemaps and eager pages ready (``casfs-lazy/``); older ones are split
    here, reading the eager pages out of CRIU's pages files.

    Raises:
        ValueError: the image is not a CRIU image directory this can restore lazily (a pages
            file without its pagemap, an incremental dump, a malformed pagemap).
        casfs.ChunkUnavailable / casfs.CorruptChunk: the store cannot supply a file.
    """
    os.makedirs(imgdir, exist_ok=True)
    layout = (meta or {}).get("layout") or {}
    if layout.get("kind") == "windows":
        return _prepare_windows(image, imgdir, int(layout["window"]))
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


def _prepare_windows(image: casfs.Image, imgdir: str, window: int) -> PreparedImages:
    out = PreparedImages(imgdir)
    for name in image.listdir(""):
        if name in (META_FILE, EXTRA_DIR, WINDOW_DIR, LAZY_DIR):
            continue
        if _TASK_PAGEMAP.match(name):
            try:
                pm = parse_pagemap(image.read(name))
            except ValueError as e:
                raise ValueError(f"snapshot image file {name}: {e}") from None
            win = f"{WINDOW_DIR}/pages-{pm.pages_id}.win"
            if not image.exists(win):
                raise ValueError(f"{name} names {win}, which the snapshot lacks")
            wm = WindowMap.of(pm, window)
            out.processes[int(_TASK_PAGEMAP.match(name).group(1))] = ProcessPages(
                image.lookup(win), wm.starts, wm.ends, wm.offsets)
            out.lazy_pages += pm.lazy_pages
            out.eager_pages += pm.present_pages - pm.lazy_pages
            continue
        _copy_meta_file(image, name, os.path.join(imgdir, name), out)  # shmem pagemaps and pages too
    for name in image.listdir(LAZY_DIR):
        _copy_meta_file(image, f"{LAZY_DIR}/{name}", os.path.join(imgdir, name), out)
    return out


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


def startup_profile(image: casfs.Image, *, concurrency: int = 8) -> tuple[casfs.ProfileReplayer | None, bool]:
    """Start fetching the snapshot's stored startup profile into the store's memory tier, in
    first-touch order, on background threads. Returns (the replayer or None, whether this
    restore should record a profile: True when the image has none).

    A profile that cannot be read costs only its prefetch: logged, then (None, False)."""
    try:
        prof = casfs.load_profile(image.store, image.id)
    except casfs.CasfsError as e:
        log.warning("startup profile of snapshot %s unusable: %s", image.id[:12], e)
        return None, False
    if prof is None:
        return None, True
    refs = []
    seen: set[bytes] = set()
    for it in casfs.check_profile(prof, image):
        if it.ref.digest not in seen:
            seen.add(it.ref.digest)
            refs.append(it.ref)
    rep = casfs.ProfileReplayer(image.store, refs, image.index.pack_members, concurrency=concurrency)
    return rep.start(), False


def save_startup_profile(image: casfs.Image, server: PageServer) -> dict | None:
    """Store the chunks ``server``'s faults touched, in order, as the image's startup profile
    (nothing when the restore failed or touched nothing). Returns {"key", "chunks"} or None."""
    if server.error or not server.touched:
        return None
    cs = image.chunk_size
    items = [casfs.ProfileItem(e, j, image.chunk_refs(e, j * cs, 1)[0]) for e, j in server.touched]
    key = casfs.save_profile(image.store, casfs.Profile(image.id, cs, items))
    log.info("startup profile of snapshot %s saved: %d chunks", image.id[:12], len(items))
    return {"key": key, "chunks": len(items)}
