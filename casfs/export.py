"""Full extraction of an image to a directory: the "pull + extract" baseline.

The tree is written under a temporary sibling of the destination and renamed into place at the
end, so a failure (or Ctrl-C) leaves no half-written destination. Chunks of upcoming files are
prefetched concurrently while earlier files are written: a window of ``PREFETCH_BYTES`` ahead
of the writer, issued in spans of ``PREFETCH_SPAN_CHUNKS`` chunks, so a file larger than the
memory tier (a CPU snapshot's pages, gigabytes) is not fetched whole at once only to be evicted
before it is written. This is the one exporter: snapshot restores export through it too.
"""

from __future__ import annotations

import logging
import os
import stat as statmod
import sys
import time
from collections import deque
from dataclasses import dataclass

from .fsutil import atomic_directory
from .image import Image

log = logging.getLogger("casfs.export")
PREFETCH_BYTES = 256 << 20
PREFETCH_SPAN_CHUNKS = 8


@dataclass
class ExportResult:
    """What an export wrote."""

    entries: int
    files: int
    bytes: int
    seconds: float
    warnings: list[str]


def export(image: Image, dest: str, *, progress: bool | None = None) -> ExportResult:
    """Write every entry of ``image`` under the new directory ``dest``.

    Ownership is restored when running as root; times, modes, symlinks, hard links, device
    nodes (root), fifos and xattrs are restored. Sockets are skipped with a warning.

    Raises:
        FileExistsError: when ``dest`` exists.
        ChunkUnavailable: when file contents cannot be fetched (nothing is left behind).
    """
    dest = os.path.abspath(dest)
    if os.path.lexists(dest):
        raise FileExistsError(17, "export destination already exists (choose a new path)", dest)
    t0 = time.perf_counter()
    with atomic_directory(dest) as tmp:
        res = _write_tree(image, tmp, progress)
    res.seconds = time.perf_counter() - t0
    return res


def _write_tree(image: Image, root: str, progress: bool | None) -> ExportResult:
    ix = image.index
    is_root = os.geteuid() == 0
    warnings: list[str] = []
    order = list(ix.walk())
    files = [i for i in order if statmod.S_ISREG(ix.mode(i)) and ix.size(i)]
    total = sum(ix.size(i) for i in files)
    show = sys.stderr.isatty() if progress is None else progress
    bar = task = None
    if show:
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                       TransferSpeedColumn())
        bar.start()
        task = bar.add_task(f"exporting {image.name}", total=total)

    # prefetch window over upcoming file spans (each hard-linked file once)
    span = ix.chunk_size * PREFETCH_SPAN_CHUNKS
    pending: deque[tuple[int, int, int]] = deque()
    inodes: set[int] = set()
    for i in files:
        st = ix.stat(i)
        if st.nlink > 1:
            if st.ino in inodes:
                continue
            inodes.add(st.ino)
        pending.extend((i, off, min(span, st.size - off)) for off in range(0, st.size, span))
    ahead = 0

    def pump(done_bytes: int = 0) -> None:
        nonlocal ahead
        ahead -= done_bytes
        while pending and ahead < PREFETCH_BYTES:
            i, off, n = pending.popleft()
            image.prefetch_entry(i, off, n)
            ahead += n

    pump()
    first_path: dict[int, str] = {}  # inode -> first path written (hard links)
    nbytes = nfiles = 0
    dirs: list[tuple[str, int]] = []
    try:
        for i in order:
            st = ix.stat(i)
            rel = ix.path(i)
            p = os.path.join(root, rel) if rel else root
            mode = st.mode
            if statmod.S_ISDIR(mode):
                if rel:
                    os.mkdir(p, 0o700)
                dirs.append((p, i))
                continue
            if statmod.S_ISREG(mode):
                if st.nlink > 1 and st.ino in first_path:
                    os.link(first_path[st.ino], p)
                    continue
                with open(p, "wb") as f:
                    size = st.size
                    off = 0
                    cs = ix.chunk_size
                    while off < size:
                        n = min(cs, size - off)
                        f.write(image.read_entry(i, off, n))
                        off += n
                        pump(n)
                        if bar is not None:
                            bar.advance(task, n)
                    nbytes += size
                nfiles += 1
                first_path[st.ino] = p
            elif statmod.S_ISLNK(mode):
                os.symlink(ix.readlink(i), p)
            elif statmod.S_ISFIFO(mode):
                os.mkfifo(p, 0o600)
            elif statmod.S_ISCHR(mode) or statmod.S_ISBLK(mode):
                if not is_root:
                    warnings.append(f"{rel}: device node skipped (needs root)")
                    continue
                os.mknod(p, mode, st.rdev)
            else:
                warnings.append(f"{rel}: socket skipped")
                continue
            _set_meta(p, i, ix, is_root, warnings)
        for p, i in reversed(dirs):
            _set_meta(p, i, ix, is_root, warnings)
    finally:
        if bar is not None:
            bar.stop()
    for w in warnings[:20]:
        log.warning("%s", w)
    return ExportResult(len(order), nfiles, nbytes, 0.0, warnings)


def _set_meta(p: str, i: int, ix, is_root: bool, warnings: list[str]) -> None:
    st = ix.stat(i)
    link = statmod.S_ISLNK(st.mode)
    for k, v in ix.xattrs(i).items():
        try:
            os.setxattr(p, k, v, follow_symlinks=False)
        except OSError as e:
            warnings.append(f"{ix.path(i)}: xattr {k!r} not set ({e.strerror})")
    if is_root:
        try:
            os.chown(p, st.uid, st.gid, follow_symlinks=False)
        except OSError as e:
            warnings.append(f"{ix.path(i)}: owner not set ({e.strerror})")
    if not link:
        os.chmod(p, statmod.S_IMODE(st.mode))
    try:
        os.utime(p, ns=(st.mtime_ns, st.mtime_ns), follow_symlinks=False)
    except OSError as e:
        warnings.append(f"{ix.path(i)}: times not set ({e.strerror})")


__all__ = ["ExportResult", "export"]
