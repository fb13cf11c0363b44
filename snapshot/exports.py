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

import json
import logging
import os
import shutil

import casfs

from . import pagelayout, verify
from .criuimg import parse_pagemap
from .meta import META_FILE

log = logging.getLogger("snapshot.exports")

__all__ = ["drop_export", "materialize", "snapshot_cache_dir"]


def snapshot_cache_dir() -> str:
    """Where exported snapshot images are kept: ``$CASFS_SNAPSHOT_CACHE``, else
    ``<casfs.home_dir()>/snapshots`` (default ``~/.local/share/casfs/snapshots``)."""
    if os.environ.get("CASFS_SNAPSHOT_CACHE"):
        return os.environ["CASFS_SNAPSHOT_CACHE"]
    return os.path.join(casfs.home_dir(), "snapshots")


def materialize(image: casfs.Image, cache_dir: str | None) -> tuple[str, bool]:
    """The image exported under the cache dir (done once per image id); (path, was it cached).

    A cached export is checked first (``snapshot.verify.check``: stamps, and the chunk digests
    of every file whose stamp changed); one that does not match the image is dropped with a
    warning naming the file and exported again. A snapshot stored in the window layout
    (``snapshot.pagelayout``) gets CRIU's ``pages-N.img`` files rebuilt in its export, and
    those are checked too (see ``_check_rebuilt``).

    Raises:
        OSError: the export failed, or a directory that is not a complete export is in the way.
        casfs.ChunkUnavailable: the image's contents cannot be fetched.
    """
    root = cache_dir or snapshot_cache_dir()
    final = os.path.join(root, image.id)
    if os.path.isfile(os.path.join(final, META_FILE)):
        problems = verify.check(image, final) or _check_rebuilt(final)
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
            rebuilt = _rebuild_criu_pages(tmp)
            os.chmod(tmp, 0o755)
    except OSError:  # FileExistsError/ENOTEMPTY: a concurrent restore exported it first
        if not os.path.isfile(os.path.join(final, META_FILE)):
            raise
        return final, False  # its writer stamps it; a restore without stamps hashes it all
    verify.record(image, final)
    _record_rebuilt(final, rebuilt)
    return final, False


# -- CRIU's pages files, rebuilt in the export of a window-layout snapshot ---------------------
# They are not files of the image, so snapshot.verify does not know them: they get stamps of
# their own (``<export>.rebuilt.json``); a file whose stamp changed (or every file, with
# CASFS_SNAPSHOT_VERIFY=full) is compared with a fresh rebuild from the export's window and
# eager pages files, which snapshot.verify checks against the image.


def _layout(path: str) -> dict:
    try:
        with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
            return json.load(f).get("layout") or {}
    except (OSError, ValueError):
        return {}


def _pagemaps(path: str):
    for name in sorted(os.listdir(path)):
        if pagelayout.TASK_PAGEMAP.match(name):
            with open(os.path.join(path, name), "rb") as f:
                yield parse_pagemap(f.read())


def _rebuild_one(path: str, pm, window: int, sink) -> None:
    win = os.path.join(path, pagelayout.WINDOW_DIR, f"pages-{pm.pages_id}.win")
    eager = os.path.join(path, pagelayout.LAZY_DIR, f"pages-{pm.pages_id}.img")
    with open(win, "rb") as w, open(eager, "rb") as e:
        pagelayout.rebuild_pages(pm, window, lambda off, n: os.pread(w.fileno(), n, off),
                                 lambda off, n: os.pread(e.fileno(), n, off), sink)


def _rebuild_criu_pages(path: str) -> list[str]:
    """Write CRIU's ``pages-N.img`` files into the export of a window-layout snapshot (the
    window files stay: snapshot.verify checks them). Returns the names written."""
    layout = _layout(path)
    if layout.get("kind") != "windows":
        return []
    names = []
    for pm in _pagemaps(path):
        name = f"pages-{pm.pages_id}.img"
        with open(os.path.join(path, name), "wb") as out:
            _rebuild_one(path, pm, int(layout["window"]), out.write)
        names.append(name)
    return names


def _record_rebuilt(path: str, names: list[str]) -> None:
    if names:
        stamps = {n: verify.file_stamp(os.path.join(path, n)) for n in names}
        casfs.atomic_write(path.rstrip("/") + ".rebuilt.json", json.dumps(stamps))


def _check_rebuilt(path: str) -> list[str]:
    """Problems of the rebuilt pages files of the export at ``path`` ([] when they match)."""
    layout = _layout(path)
    if layout.get("kind") != "windows":
        return []
    full = os.environ.get(verify.VERIFY_ENV, "").strip().lower() == "full"
    try:
        with open(path.rstrip("/") + ".rebuilt.json") as f:
            stamps = json.load(f)
    except (OSError, ValueError):
        stamps = {}
    problems, checked = [], False
    for pm in _pagemaps(path):
        name = f"pages-{pm.pages_id}.img"
        local = os.path.join(path, name)
        if not full and stamps.get(name) == verify.file_stamp(local):
            continue
        checked = True
        try:
            with open(local, "rb") as f:
                same = [True]

                def compare(data: bytes, f=f, same=same) -> None:
                    if same[0] and f.read(len(data)) != data:
                        same[0] = False
                _rebuild_one(path, pm, int(layout["window"]), compare)
                if not same[0] or f.read(1):
                    problems.append(f"{local}: differs from the pages the snapshot holds")
        except (OSError, ValueError) as e:
            problems.append(f"{local}: {e}")
    if checked and not problems:
        _record_rebuilt(path, [f"pages-{pm.pages_id}.img" for pm in _pagemaps(path)])
    return problems


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
