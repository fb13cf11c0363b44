"""Restoring straight from the store: no copy of the snapshot's pages on the host first.

``restore(..., source="store")`` (lazy) runs CRIU on a small work directory and serves the
memory pages from the casfs store as the restored processes touch them:

1. ``prepare_images`` writes the image files CRIU reads itself into the restore's work dir,
   each from a verified casfs read: the process tree's metadata (a few MB: cores, mms, files,
   sockets), every pagemap rewritten so that its lazy entries are not present, and per process
   a pages file holding only the pages CRIU restores eagerly (those outside private anonymous
   memory: relocated library data, stacks; ~1-3% of a Python process's pages). That is the
   layout ``criu dump --lazy-pages`` writes; the stored snapshot is left as it was dumped.
2. ``snapshot.pageserver.PageServer`` answers ``criu lazy-pages --page-server`` on a socket
   pair with the rest, from the image's ``pages-N.img`` files in the store (verified reads).
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

from .criuimg import PE_LAZY, PE_PRESENT, Pagemap, PagemapEntry, encode_pagemap, parse_pagemap
from .meta import EXTRA_DIR, META_FILE
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


def prepare_images(image: casfs.Image, imgdir: str) -> PreparedImages:
    """Write the image files CRIU reads itself (see the module docstring) under ``imgdir``.

    Raises:
        ValueError: the image is not a CRIU image directory this can restore lazily (a pages
            file without its pagemap, an incremental dump, a malformed pagemap).
        casfs.ChunkUnavailable / casfs.CorruptChunk: the store cannot supply a file.
    """
    os.makedirs(imgdir, exist_ok=True)
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
        st = image.stat(name)
        if not statmod.S_ISREG(st.mode):
            raise ValueError(f"snapshot image entry {name!r} is not a regular file")
        if st.size > MAX_META_FILE:
            raise ValueError(f"snapshot image file {name!r} is {st.size} bytes: too large for a CRIU "
                             "metadata image")
        data = image.read(name)
        out.files += 1
        if not _ANY_PAGEMAP.match(name):
            _write(os.path.join(imgdir, name), data)
            out.bytes_written += len(data)
            continue
        try:
            pm = parse_pagemap(data)
        except ValueError as e:
            raise ValueError(f"snapshot image file {name}: {e}") from None
        entry = pages_entries.get(pm.pages_id)
        if entry is None:
            raise ValueError(f"{name} names pages-{pm.pages_id}.img, which the snapshot lacks")
        used_pages.add(pm.pages_id)
        task = _TASK_PAGEMAP.match(name)
        lazy = task is not None  # CRIU's lazy-pages daemon serves task memory only
        local = Pagemap(pm.pages_id)
        offsets = pm.file_offsets()
        with open(os.path.join(imgdir, f"pages-{pm.pages_id}.img"), "wb") as pages:
            for e, off in zip(pm.entries, offsets):
                if lazy and e.present and e.lazy:
                    local.entries.append(PagemapEntry(e.vaddr, e.nr_pages, (e.flags & ~PE_PRESENT) | PE_LAZY))
                    out.lazy_pages += e.nr_pages
                    continue
                local.entries.append(e)
                if e.present:
                    n = e.nr_pages * 4096
                    data_e = image.read_entry(entry, off, n)
                    if len(data_e) != n:
                        raise ValueError(f"pages-{pm.pages_id}.img is shorter than {name} says")
                    pages.write(data_e)
                    out.eager_pages += e.nr_pages
                    out.bytes_written += n
        encoded = encode_pagemap(local)
        _write(os.path.join(imgdir, name), encoded)
        out.bytes_written += len(encoded)
        if lazy:
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
