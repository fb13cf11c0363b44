"""The per-host export cache: a snapshot image written out once per host, reused by restores.

CRIU reads its images from a directory; restoring from an export of the image (rather than a
FUSE mount) is the fast default. The export of image ``ID`` lives at ``<cache dir>/ID`` and is
kept until ``drop_export`` removes it. Exports are written by ``casfs.export`` (the one
exporter: under a temporary name, renamed into place when complete, so a restore never reads
half an export, and concurrent restores of one image on a host race safely). An export is
checked against the image before every restore (``snapshot.verify``); one that does not match
is exported again from the store.
"""

from __future__ import annotations

import logging
import os
import shutil

import casfs

from . import pagelayout, verify
from .meta import META_FILE

log = logging.getLogger("snapshot.exports")

__all__ = ["drop_export", "exported", "materialize", "snapshot_cache_dir"]


def snapshot_cache_dir() -> str:
    """Where exported snapshot images are kept: ``$CASFS_SNAPSHOT_CACHE``, else
    ``<casfs.home_dir()>/snapshots`` (default ``~/.local/share/casfs/snapshots``)."""
    if os.environ.get("CASFS_SNAPSHOT_CACHE"):
        return os.environ["CASFS_SNAPSHOT_CACHE"]
    return os.path.join(casfs.home_dir(), "snapshots")


def exported(image_id: str, cache_dir: str | None = None) -> bool:
    """Whether this host holds a complete export of snapshot image ``image_id`` under
    ``cache_dir`` (default ``snapshot_cache_dir()``). Complete, not checked: ``materialize``
    checks it against the image before anyone reads it."""
    return os.path.isfile(os.path.join(cache_dir or snapshot_cache_dir(), image_id, META_FILE))


def materialize(image: casfs.Image, cache_dir: str | None) -> tuple[str, bool]:
    """The image exported under the cache dir (done once per image id); (path, was it cached).

    A cached export is checked first (``snapshot.verify.check``: stamps, and the chunk digests
    of every file whose stamp changed); one that does not match the image is dropped with a
    warning naming the file and exported again. A snapshot stored in the window layout
    (``snapshot.pagelayout``) gets CRIU's ``pages-N.img`` files rebuilt in its export, and
    ``snapshot.verify`` checks those too.

    Raises:
        OSError: the export failed, or a directory that is not a complete export is in the way.
        casfs.ChunkUnavailable: the image's contents cannot be fetched.
    """
    root = cache_dir or snapshot_cache_dir()
    final = os.path.join(root, image.id)
    if os.path.isfile(os.path.join(final, META_FILE)):
        problems = verify.check(image, final)
        if not problems:
            return final, True
        log.warning("the host's export of snapshot %s does not match the image (%s%s); exporting it again",
                    image.name, problems[0], f" and {len(problems) - 1} more" if len(problems) > 1 else "")
        _discard(final)
    os.makedirs(root, exist_ok=True)
    try:
        with casfs.atomic_directory(final) as tmp:
            os.rmdir(tmp)  # casfs.export makes its destination itself
            casfs.export(image, tmp, progress=False)
            _rebuild_criu_pages(tmp)
            os.chmod(tmp, 0o755)
    except OSError:  # FileExistsError/ENOTEMPTY: a concurrent restore exported it first
        if not os.path.isfile(os.path.join(final, META_FILE)):
            raise
        return final, False  # its writer stamps it; a restore without stamps hashes it all
    verify.record(image, final)
    return final, False


def _rebuild_criu_pages(path: str) -> None:
    """Write CRIU's ``pages-N.img`` files into the export of a window-layout snapshot (the
    window files stay, and ``snapshot.verify`` checks both: the window files against the
    image, CRIU's against a rebuild from them)."""
    for rel in verify.derived_files(path):
        with open(os.path.join(path, rel), "wb") as out:
            pagelayout.rebuild_from_export(path, rel, out.write)


def _discard(path: str) -> None:
    """Move a bad export out of the way (readers holding its files keep them), then remove it."""
    gone = f"{path}.bad-{os.getpid()}"
    try:
        os.rename(path, gone)
    except OSError:
        gone = path
    shutil.rmtree(gone, ignore_errors=True)
    try:
        os.unlink(verify.stamps_path(path))
    except OSError:
        pass


def drop_export(image_id: str, cache_dir: str | None = None) -> bool:
    """Remove the per-host export of snapshot image ``image_id`` (True if there was one).

    Exports are kept until removed (they make repeat restores fast). Do not drop one that a
    lazy restore still reads (``RestoredProcess.lazy_done()``).
    """
    path = os.path.join(cache_dir or snapshot_cache_dir(), image_id)
    if not os.path.isdir(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.unlink(verify.stamps_path(path))
    except OSError:
        pass
    return True
