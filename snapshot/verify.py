"""Checking a snapshot's per-host export before CRIU restores from it: nothing unverified is
restored (issue 17: a byte flipped in ``$CASFS_HOME/snapshots/<id>/pages-*.img`` was restored
into the process).

The export is written by ``casfs.export``, which verifies every chunk it reads; what can go
wrong is what happens to the files afterwards, on this host. At export time ``record`` keeps
each file's stamp (size, inode, mtime and ctime in ns) in ``<cache dir>/<id>.stamps.json``;
before every restore ``check`` compares the stamps and hashes every file whose stamp changed
against the image's chunk digests (``casfs.Image.check_file``). A write through the
filesystem always moves ctime, which no call can set back, so a changed file is always
hashed; a file whose stamp still matches is trusted without reading it (one ``stat`` per
file: the restore path stays as fast as before).

``CASFS_SNAPSHOT_VERIFY=full`` hashes every file on every restore instead: it also catches
what never went through the filesystem (media or memory corruption below it), at the cost of
reading and hashing the export (2-2.8 GiB/s here: ~0.1 s for a 150 MB torch process, ~1 s
for the 2.2 GB of a vLLM replica). An export without stamps (written by an older casfs, or a
concurrent restore that has not recorded them yet) is hashed in full once, then stamped.

On a mismatch the caller (``snapshot.exports.materialize``) drops the export and writes it
again from the store. Kept in one module so that a restore path that reads the image in
another way keeps the same check; serve checks the model directories it exports (when FUSE is
unusable) through the same two functions (``snapshot.check_export``, ``snapshot.record_export``).
"""

from __future__ import annotations

import json
import os
import stat as statmod

import casfs

__all__ = ["VERIFY_ENV", "check", "derived_files", "record", "stamps_path"]

VERIFY_ENV = "CASFS_SNAPSHOT_VERIFY"


def stamps_path(export_dir: str) -> str:
    """Where the stamps of the export at ``export_dir`` are kept (beside it, not in it: the
    export is CRIU's image directory)."""
    return export_dir.rstrip("/") + ".stamps.json"


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]



def _files(image: casfs.Image) -> list[str]:
    return [p for p, st in image.walk("") if st.is_file]


def record(image: casfs.Image, export_dir: str) -> None:
    """Keep the stamps of every file of ``image`` in its export at ``export_dir``, and of the
    files the export derives from them (``derived_files``)."""
    stamps = {}
    for rel in [*_files(image), *derived_files(export_dir)]:
        try:
            st = os.lstat(os.path.join(export_dir, rel))
        except OSError:
            continue
        if statmod.S_ISREG(st.st_mode):
            stamps[rel] = _stamp(st)
    casfs.atomic_write(stamps_path(export_dir), json.dumps({"image": image.id, "files": stamps}))


def check(image: casfs.Image, export_dir: str, *, full: bool | None = None) -> list[str]:
    """Problems of the export at ``export_dir`` against ``image`` ([] when it may be restored).

    Files of the image are hashed against its chunk digests; files the export derives from
    them (CRIU's pages files of a window-layout snapshot, ``derived_files``) are compared with
    a fresh derivation from the image's files, after those passed.

    Args:
        full: hash every file (default: as ``$CASFS_SNAPSHOT_VERIFY`` says, "full" or not);
            otherwise only files whose stamps changed since ``record`` (all of them when there
            are no stamps).
    """
    if full is None:
        full = os.environ.get(VERIFY_ENV, "").strip().lower() == "full"
    stamps: dict = {}
    if not full:
        try:
            with open(stamps_path(export_dir)) as f:
                doc = json.load(f)
            if doc.get("image") == image.id and isinstance(doc.get("files"), dict):
                stamps = doc["files"]
        except (OSError, ValueError):
            pass

    def unchanged(rel: str) -> bool:
        if full or rel not in stamps:
            return False
        try:
            return _stamp(os.lstat(os.path.join(export_dir, rel))) == stamps[rel]
        except OSError as e:
            problems.append(f"{os.path.join(export_dir, rel)}: {e.strerror}")
            return True  # reported

    problems: list[str] = []
    hashed = 0
    for rel in _files(image):
        if unchanged(rel):
            continue
        why = image.check_file(rel, os.path.join(export_dir, rel))
        hashed += 1
        if why:
            problems.append(why)
    if not problems:
        for rel in derived_files(export_dir):
            if unchanged(rel):
                continue
            why = _check_derived(export_dir, rel)
            hashed += 1
            if why:
                problems.append(why)
    if not problems and (full or hashed):
        record(image, export_dir)  # what was just hashed is known good: stamp it
    return problems


# -- files an export derives from the image's ------------------------------------------------


def _window_layout(export_dir: str) -> dict | None:
    from .meta import META_FILE

    try:
        with open(os.path.join(export_dir, META_FILE), encoding="utf-8") as f:
            layout = json.load(f).get("layout") or {}
    except (OSError, ValueError):
        return None
    return layout if layout.get("kind") == "windows" else None


def derived_files(export_dir: str) -> list[str]:
    """Files of the export that are not files of the image: CRIU's ``pages-N.img`` of a
    window-layout snapshot (``snapshot.pagelayout``), one per task pagemap."""
    from .pagelayout import TASK_PAGEMAP, pages_id

    if _window_layout(export_dir) is None:
        return []
    return [f"pages-{pages_id(os.path.join(export_dir, n))}.img"
            for n in sorted(os.listdir(export_dir)) if TASK_PAGEMAP.match(n)]


def _check_derived(export_dir: str, rel: str) -> str | None:
    """Why the derived file ``rel`` is wrong (None when a fresh derivation gives its bytes)."""
    from .pagelayout import rebuild_from_export

    local = os.path.join(export_dir, rel)
    try:
        with open(local, "rb") as f:
            same = [True]

            def compare(data: bytes) -> None:
                if same[0] and f.read(len(data)) != data:
                    same[0] = False
            rebuild_from_export(export_dir, rel, compare)
            if not same[0] or f.read(1):
                return f"{local}: differs from the pages the snapshot holds"
    except (OSError, ValueError) as e:
        return f"{local}: {e}"
    return None


#: the public names (``snapshot.check_export`` / ``snapshot.record_export``): serve checks the
#: model directories it exports the same way
check_export = check
record_export = record
