"""Full extraction of an image to a directory: the "pull + extract" baseline.

The tree is written under a temporary sibling of the destination and renamed into place at the
end, so a failure (or Ctrl-C) leaves no half-written destination. Chunks of upcoming files are
prefetched concurrently while earlier files are written: a window of ``PREFETCH_BYTES`` ahead
of the writer, issued in spans of ``PREFETCH_SPAN_CHUNKS`` chunks, so a file larger than the
memory tier (a CPU snapshot's pages, gigabytes) is not fetched whole at once only to be evicted
before it is written. This is the one exporter: snapshot restores (the per-host export cache)
and serve's model materialisation export through it too.

Hostile images: an index is untrusted input. ``Index.parse`` refuses entry names that are not
one path component (``/``, ``.``, ``..``, empty, NUL) and names used twice in a directory; as
a second line of defence this writer never resolves a path. Every entry is created relative to
an open descriptor of its parent directory (``dir_fd``), each directory opened from its own
parent with ``O_NOFOLLOW | O_DIRECTORY``, files created with ``O_CREAT | O_EXCL |
O_NOFOLLOW``, and metadata set on the open file or with ``follow_symlinks=False``. So a name
that is already taken (a symlink pointing outside, put there by an earlier entry) makes the
export fail with ``CorruptIndex`` instead of writing through it, and nothing can be written
outside the destination (tests/test_export_hostile.py, fuzz/fuzz_export.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat as statmod
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from .errors import CorruptIndex
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
        CorruptIndex: the image names an entry twice or with a name that is not one path
            component (nothing is left behind, nothing is written outside ``dest``).
        ChunkUnavailable: when file contents cannot be fetched (nothing is left behind).
        OSError: when writing fails (a full disk: the message names ``dest``; nothing is left
            behind).
    """
    dest = os.path.abspath(dest)
    if os.path.lexists(dest):
        raise FileExistsError(17, "export destination already exists (choose a new path)", dest)
    t0 = time.perf_counter()
    try:
        with atomic_directory(dest) as tmp:
            res = _write_tree(image, tmp, progress)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # the final rename: someone got there first
            raise FileExistsError(e.errno, "export destination appeared while exporting (another export "
                                           "there?); nothing of this one was left: choose a new path",
                                  dest) from None
        if e.filename is not None or not e.strerror:
            raise
        # a write that failed (a full disk, a quota) names no file: name the destination
        raise OSError(e.errno, f"export to {dest} failed ({e.strerror}); nothing was left there") from None
    res.seconds = time.perf_counter() - t0
    return res


def _write_tree(image: Image, root: str, progress: bool | None) -> ExportResult:
    ix = image.index
    is_root = os.geteuid() == 0
    warnings: list[str] = []
    order = list(ix.walk())
    files = [i for i in order if statmod.S_ISREG(ix.mode(i)) and ix.size(i)]
    total = image.logical_bytes()  # (each hard-linked file once: the bar ends at 100%)
    show = sys.stderr.isatty() if progress is None else progress
    bar = task = None
    if show:
        from .progress import byte_bar

        bar, task = byte_bar(f"exporting {image.name}", total)

    # prefetch window over upcoming file spans (each hard-linked file once)
    pending: deque[tuple[int, int, int]] = deque()
    inodes: set[int] = set()
    for i in files:
        st = ix.stat(i)
        if st.nlink > 1:
            if st.ino in inodes:
                continue
            inodes.add(st.ino)
        span = ix.file_chunk_size(i) * PREFETCH_SPAN_CHUNKS
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
    first_link: dict[int, tuple[int, bytes]] = {}  # inode -> (parent entry, name) written first (hard links)
    nbytes = nfiles = 0
    dirs: list[int] = []
    tree = _DirFds(ix, root)
    try:
        for i in order:
            st = ix.stat(i)
            mode = st.mode
            if i == 0:
                dirs.append(i)
                continue
            name = _component(ix, i)
            dfd = tree.fd(ix.parent(i))
            rel = ix.path(i)
            try:
                if statmod.S_ISDIR(mode):
                    os.mkdir(name, 0o700, dir_fd=dfd)
                    dirs.append(i)
                    continue
                if statmod.S_ISREG(mode):
                    if st.nlink > 1 and st.ino in first_link:
                        src_parent, src_name = first_link[st.ino]
                        src_fd = os.dup(tree.fd(src_parent))  # (the next fd() may close a cached one)
                        try:
                            os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=tree.fd(ix.parent(i)),
                                    follow_symlinks=False)
                        finally:
                            os.close(src_fd)
                        continue
                    fd = os.open(name, _CREATE, 0o600, dir_fd=dfd)
                    with open(fd, "wb") as f:
                        size = st.size
                        off = 0
                        cs = ix.file_chunk_size(i)
                        while off < size:
                            n = min(cs, size - off)
                            f.write(image.read_entry(i, off, n))
                            off += n
                            pump(n)
                            if bar is not None:
                                bar.advance(task, n)
                        f.flush()
                        _set_meta(f.fileno(), None, i, ix, is_root, warnings)
                    nbytes += size
                    nfiles += 1
                    first_link[st.ino] = (ix.parent(i), name)
                    continue
                if statmod.S_ISLNK(mode):
                    os.symlink(ix.readlink(i), name, dir_fd=dfd)
                elif statmod.S_ISFIFO(mode):
                    os.mkfifo(name, 0o600, dir_fd=dfd)
                elif statmod.S_ISCHR(mode) or statmod.S_ISBLK(mode):
                    if not is_root:
                        warnings.append(f"{rel}: device node skipped (needs root)")
                        continue
                    os.mknod(name, mode, st.rdev, dir_fd=dfd)
                else:
                    warnings.append(f"{rel}: socket skipped")
                    continue
            except FileExistsError:
                raise CorruptIndex(f"image {image.name} names {rel!r} twice: refusing to export it") from None
            _set_meta(dfd, name, i, ix, is_root, warnings)
        for i in reversed(dirs):
            fd = tree.fd(i)
            _set_meta(fd, None, i, ix, is_root, warnings)
    finally:
        tree.close()
        if bar is not None:
            bar.stop()
    for w in warnings[:20]:
        log.warning("%s", w)
    return ExportResult(len(order), nfiles, nbytes, 0.0, warnings)


# O_NOFOLLOW and O_EXCL: a name that is already taken (a symlink put there by a hostile
# index, say) is never opened or followed; creating the file fails instead.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _component(ix, i: int) -> bytes:
    """Entry ``i``'s name, checked to be one path component (the second line of defence:
    ``Index.parse`` already refuses other names)."""
    name = ix.name(i)
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise CorruptIndex(f"index entry {i} is named {name!r}, not one path component: refusing to export it")
    return name


class _DirFds:
    """Open file descriptors of the exported directories, each opened relative to its parent's
    descriptor with O_NOFOLLOW (never through a path that a symlink could redirect). A small
    LRU: the export walks depth first, so the current directory's ancestors stay cached."""

    LIMIT = 64

    def __init__(self, ix, root: str) -> None:
        self.ix = ix
        self.root_fd = os.open(root, _OPEN_DIR)
        self._fds: OrderedDict[int, int] = OrderedDict()

    def fd(self, entry: int) -> int:
        """A descriptor of directory ``entry``, valid until the next call."""
        if entry == 0:
            return self.root_fd
        fd = self._fds.get(entry)
        if fd is not None:
            self._fds.move_to_end(entry)
            return fd
        chain = []  # entry and its ancestors up to one that is open (bounded: path() is)
        e = entry
        while e != 0 and e not in self._fds:
            chain.append(e)
            e = self.ix.parent(e)
            if len(chain) > 4096:
                raise CorruptIndex("index parent chain is too deep or cyclic")
        fd = self.root_fd if e == 0 else self._fds[e]
        for e in reversed(chain):
            fd = os.open(_component(self.ix, e), _OPEN_DIR, dir_fd=fd)
            self._fds[e] = fd
            while len(self._fds) > self.LIMIT:
                _, old = self._fds.popitem(last=False)
                os.close(old)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.root_fd)


def _set_meta(dfd: int, name: bytes | None, i: int, ix, is_root: bool, warnings: list[str]) -> None:
    """Set xattrs, owner, mode and times of entry ``i``: on the open file ``dfd`` itself when
    ``name`` is None, else on ``name`` in directory ``dfd`` (never following a symlink)."""
    st = ix.stat(i)
    link = statmod.S_ISLNK(st.mode)
    for k, v in ix.xattrs(i).items():
        try:
            if name is None:
                os.setxattr(dfd, k, v)
            else:  # no setxattrat: the directory's fd as a path, then l(setxattr) on the name
                os.setxattr(f"/proc/self/fd/{dfd}/".encode() + name, k, v, follow_symlinks=False)
        except (OSError, ValueError) as e:  # (ValueError: a NUL in the key)
            warnings.append(f"{ix.path(i)}: xattr {k!r} not set ({getattr(e, 'strerror', None) or e})")
    if name is None:
        where: dict = {}
        path: int | bytes = dfd
    else:
        where = {"dir_fd": dfd, "follow_symlinks": False}
        path = name
    if is_root:
        try:
            os.chown(path, st.uid, st.gid, **where)
        except OSError as e:
            warnings.append(f"{ix.path(i)}: owner not set ({e.strerror})")
    if not link:
        # (a fifo or device node made just now by mkfifo/mknod, which fail on a taken name:
        # chmod cannot refuse to follow on Linux, and needs not here)
        os.chmod(path, statmod.S_IMODE(st.mode), **({"dir_fd": dfd} if name is not None else {}))
    try:
        os.utime(path, ns=(st.mtime_ns, st.mtime_ns), **where)
    except OSError as e:
        warnings.append(f"{ix.path(i)}: times not set ({e.strerror})")


__all__ = ["ExportResult", "export"]
