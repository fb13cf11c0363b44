"""The per-host export cache: a snapshot image written out once per host, reused by restores.

CRIU reads its images from a directory; restoring from an export of the image (rather than a
FUSE mount) is the fast default. The export of image ``ID`` lives at ``<cache dir>/ID`` and is
kept until ``drop_export`` removes it.
"""

from __future__ import annotations

import os
import shutil
import stat as statmod
import tempfile

import casfs

from .meta import META_FILE

__all__ = ["drop_export", "export_image", "materialize", "snapshot_cache_dir"]


def snapshot_cache_dir() -> str:
    """Where exported snapshot images are kept: ``$CASFS_SNAPSHOT_CACHE``, else
    ``$CASFS_HOME/snapshots`` (default ``~/.local/share/casfs/snapshots``)."""
    if os.environ.get("CASFS_SNAPSHOT_CACHE"):
        return os.environ["CASFS_SNAPSHOT_CACHE"]
    home = os.environ.get("CASFS_HOME", "~/.local/share/casfs")
    return os.path.join(os.path.abspath(os.path.expanduser(home)), "snapshots")


def export_image(image: casfs.Image, dest: str, *, span_chunks: int = 8) -> int:
    """Write every file and directory of ``image`` under the new directory ``dest``.

    Large files are read in spans of ``span_chunks`` chunks with the next span prefetched.
    Returns the bytes written.
    """
    os.makedirs(dest, exist_ok=True)
    total = 0
    span = image.chunk_size * span_chunks
    for path, st in image.walk(""):
        if not path:
            continue
        target = os.path.join(dest, path)
        if st.is_dir:
            os.makedirs(target, exist_ok=True)
            continue
        if st.is_symlink:
            os.symlink(image.readlink(path), target)
            continue
        if not st.is_file:
            continue
        entry = image.lookup(path)
        image.prefetch_entry(entry, 0, span)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, statmod.S_IMODE(st.mode) or 0o600)
        try:
            off = 0
            while off < st.size:
                if off + span < st.size:
                    image.prefetch_entry(entry, off + span, span)
                data = image.read_entry(entry, off, span)
                if not data:
                    break
                mv = memoryview(data)
                while mv:
                    n = os.write(fd, mv)
                    mv = mv[n:]
                off += len(data)
                total += len(data)
        finally:
            os.close(fd)
    return total


def materialize(image: casfs.Image, cache_dir: str | None) -> tuple[str, bool]:
    """The image exported under the cache dir (done once per image id); (path, was it cached)."""
    root = cache_dir or snapshot_cache_dir()
    final = os.path.join(root, image.id)
    if os.path.isfile(os.path.join(final, META_FILE)):
        return final, True
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{image.id[:16]}.", dir=root)
    try:
        export_image(image, tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent restore exported it first
            if not os.path.isfile(os.path.join(final, META_FILE)):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final, False


def drop_export(image_id: str, cache_dir: str | None = None) -> bool:
    """Remove the per-host export of snapshot image ``image_id`` (True if there was one).

    Exports are kept until removed (they make repeat restores fast). Do not drop one that a
    lazy restore still reads (``RestoredProcess.lazy_done()``).
    """
    path = os.path.join(cache_dir or snapshot_cache_dir(), image_id)
    if not os.path.isdir(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True

