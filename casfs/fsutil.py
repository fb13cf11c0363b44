"""Atomic file and directory writes: the one home of write-to-a-temp-then-rename.

A reader of ``path`` sees either the old file or the whole new one, never a half-written one:
the bytes go to a temporary file in the same directory (or in ``tmp_dir``, which must be on the
same filesystem), which is then renamed over ``path``. On any failure the temporary file is
removed and the error raised; ``path`` is left as it was.

Durability is a separate, opt-in promise (``fsync=True``): the file's data is flushed to the
disk before the rename, and the directory that holds the new name is flushed after it (also
every directory this call had to create, so a new fan-out directory survives a power loss with
the file in it). Without ``fsync`` a crash can leave ``path`` absent, old, or (on filesystems
that reorder) present but short: right for caches whose entries verify themselves (the ssd
tier, the index cache), wrong for the blob store, which fsyncs.

Temporary names start with ``.`` and end with ``.tmp`` and carry the pid, the thread and a
nanosecond clock, so concurrent writers of one ``path`` never share a temporary file (the last
rename wins; each writer's file was complete).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from typing import IO, Iterator

__all__ = ["atomic_write", "atomic_open", "atomic_directory", "fsync_dir", "remove_stale_temps", "temp_name"]

# A temporary file whose writer is gone is removed by ``remove_stale_temps`` once it is this old
# (seconds): the pid in its name must be dead here, and the age covers a writer in another pid
# namespace sharing the directory (its pid means nothing here; its writes renew the mtime).
STALE_TEMP_SECONDS = 60.0


def temp_name(path: str, tmp_dir: str | None = None) -> str:
    """A fresh temporary path for a write of ``path`` (in ``tmp_dir``, else beside ``path``)."""
    base = os.path.basename(path) or "file"
    where = tmp_dir if tmp_dir is not None else os.path.dirname(os.path.abspath(path))
    return os.path.join(where, f".{base}.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}.tmp")


def _writer_pid(name: str) -> int | None:
    """The pid in a ``temp_name`` file name (``.<base>.<pid>.<thread>.<ns>.tmp``), else None."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[:-4].rsplit(".", 3)
    if len(parts) != 4 or not (parts[1].isdigit() and parts[2].isdigit() and parts[3].isdigit()):
        return None
    return int(parts[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: str, min_age: float = STALE_TEMP_SECONDS) -> int:
    """Remove the temporary files (``temp_name``) in ``directory`` that a killed writer left:
    those whose writer pid is not running and that are older than ``min_age`` seconds. Other
    files, and temporaries of live writers, are left alone. Returns how many were removed; a
    missing directory or a file that vanishes meanwhile is not an error."""
    now = time.time()
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for e in entries:
        pid = _writer_pid(e.name)
        if pid is None or _alive(pid):
            continue
        try:
            if not e.is_file(follow_symlinks=False) or now - e.stat(follow_symlinks=False).st_mtime < min_age:
                continue
            os.unlink(e.path)
            removed += 1
        except OSError:
            continue
    return removed


def fsync_dir(path: str) -> None:
    """Flush directory ``path``'s entries to the disk (after a rename or a create in it).

    Raises:
        OSError: when the directory cannot be opened or flushed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(d: str, fsync: bool) -> None:
    """``os.makedirs(d, exist_ok=True)``; with ``fsync``, also flush the parent of every
    directory created here, so the new directories themselves survive a crash."""
    if not fsync:
        os.makedirs(d, exist_ok=True)
        return
    missing = []
    p = os.path.abspath(d)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if not missing:
        return
    os.makedirs(d, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(os.path.dirname(created))


def _finish(tmp: str, path: str, fsync: bool) -> None:
    os.replace(tmp, path)
    if fsync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: str, data: bytes | bytearray | memoryview | str, *, fsync: bool = False,
                 tmp_dir: str | None = None, makedirs: bool = False, mode: int = 0o666) -> None:
    """Replace ``path`` with ``data`` atomically (see the module doc).

    Args:
        data: the new contents; a ``str`` is written as UTF-8.
        fsync: flush the file before the rename and its directory after it (durable).
        tmp_dir: an existing directory for the temporary file, on the same filesystem as
            ``path`` (a store's ``tmp/``, which its owner can sweep); default: beside ``path``.
        makedirs: create ``path``'s directory when missing.
        mode: permission bits of a new file, before the umask.

    Raises:
        OSError: the write, flush or rename failed (nothing is left behind; ``path`` is as
            it was).
    """
    if isinstance(data, str):
        data = data.encode()
    if makedirs:
        _makedirs(os.path.dirname(os.path.abspath(path)), fsync)
    tmp = temp_name(path, tmp_dir)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        try:
            mv = memoryview(data).cast("B")
            while mv:
                mv = mv[os.write(fd, mv):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        _finish(tmp, path, fsync)
    except BaseException:
        _unlink_quietly(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", *, fsync: bool = False, tmp_dir: str | None = None,
                makedirs: bool = False, encoding: str | None = "utf-8") -> Iterator[IO]:
    """A file object whose contents replace ``path`` atomically when the block ends without
    an exception (for writers that stream: ``json.dump``). An exception inside the block
    removes the temporary file and leaves ``path`` as it was.

    Args:
        mode: ``"w"`` (text, ``encoding``) or ``"wb"``.
        fsync, tmp_dir, makedirs: as ``atomic_write``.

    Raises:
        ValueError: for a mode other than "w" or "wb".
        OSError: as ``atomic_write``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    if makedirs:
        _makedirs(os.path.dirname(os.path.abspath(path)), fsync)
    tmp = temp_name(path, tmp_dir)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with open(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        _finish(tmp, path, fsync)
    except BaseException:
        _unlink_quietly(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(dest: str, *, fsync: bool = False) -> Iterator[str]:
    """A fresh temporary sibling directory of ``dest``, renamed to ``dest`` when the block ends
    without an exception; removed (with everything in it) otherwise.

    The rename fails when ``dest`` exists and is not an empty directory (another writer got
    there first: ``OSError`` with errno ENOTEMPTY or EEXIST; the temporary tree is removed).
    ``fsync`` flushes only the parent directory after the rename, not the tree's files.

    Raises:
        OSError: the temporary directory could not be made, or the rename failed.
    """
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        _finish(tmp, dest, fsync)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
