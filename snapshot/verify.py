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
another way keeps the same check.
"""

from __future__ import annotations

import json
import os
import stat as statmod

import casfs

__all__ = ["VERIFY_ENV", "check", "file_stamp", "record", "stamps_path"]

VERIFY_ENV = "CASFS_SNAPSHOT_VERIFY"


def stamps_path(export_dir: str) -> str:
    """Where the stamps of the export at ``export_dir`` are kept (beside it, not in it: the
    export is CRIU's image directory)."""
    return export_dir.rstrip("/") + ".stamps.json"


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def file_stamp(path: str) -> list[int] | None:
    """The stamp (size, inode, mtime, ctime) of the file at ``path``, or None when it is gone
    (for files an export derives from the image, which ``record`` does not know)."""
    try:
        return _stamp(os.lstat(path))
    except OSError:
        return None


def _files(image: casfs.Image) -> list[str]:
    return [p for p, st in image.walk("") if st.is_file]


def record(image: casfs.Image, export_dir: str) -> None:
    """Keep the stamps of every file of ``image`` in its export at ``export_dir``."""
    stamps = {}
    for rel in _files(image):
        try:
            st = os.lstat(os.path.join(export_dir, rel))
        except OSError:
            continue
        if statmod.S_ISREG(st.st_mode):
            stamps[rel] = _stamp(st)
    casfs.atomic_write(stamps_path(export_dir), json.dumps({"image": image.id, "files": stamps}))


def check(image: casfs.Image, export_dir: str, *, full: bool | None = None) -> list[str]:
    """Problems of the export at ``export_dir`` against ``image`` ([] when it may be restored).

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
    problems = []
    hashed = 0
    for rel in _files(image):
        local = os.path.join(export_dir, rel)
        if not full and rel in stamps:
            try:
                if _stamp(os.lstat(local)) == stamps[rel]:
                    continue
            except OSError as e:
                problems.append(f"{local}: {e.strerror}")
                continue
        why = image.check_file(rel, local)
        hashed += 1
        if why:
            problems.append(why)
    if not problems and (full or hashed):
        record(image, export_dir)  # what was just hashed is known good: stamp it
    return problems
