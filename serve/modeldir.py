"""The model image made readable as a directory: a lazy FUSE mount, or a full export."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import casfs

from .errors import BootError
from .preflight import WEIGHT_SUFFIXES

__all__ = ["fuse_usable", "materialize", "materialize_metadata"]

log = logging.getLogger("serve.modeldir")


def fuse_usable() -> str | None:
    """None if a FUSE mount can be made here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed in this environment (pip install 'casfs[fuse]')"
    return None


def materialize(image: Any, how: str, workdir: str) -> tuple[str, str, dict]:
    """Make ``image`` readable as a directory; returns (path, "mount"|"export", detail).

    The path depends only on the image id, so a snapshot taken on one boot finds the model
    files at the same path on the next.

    Raises:
        BootError: when ``how`` is "mount" and FUSE is unusable, or mounting/exporting fails.
    """
    if how not in ("auto", "mount", "export"):
        raise BootError(f"materialize must be auto, mount or export, not {how!r}")
    why_not = fuse_usable()
    if how == "mount" and why_not:
        raise BootError(f"cannot mount the model image: {why_not}")
    if how == "mount" or (how == "auto" and why_not is None):
        mp = os.path.join(workdir, "models", image.id[:24])
        if casfs.is_mounted(mp):
            return mp, "mount", {"reused": True}
        os.makedirs(mp, exist_ok=True)
        try:
            info = casfs.mount(image, mp)
        except casfs.CasfsError as e:
            raise BootError(f"mount phase: {e}") from None
        return mp, "mount", {"reused": False, "daemon_pid": info.pid, "daemon_start": info.pid_start,
                             "log": info.log}
    import snapshot

    dest = os.path.join(workdir, "exports", image.id)
    if os.path.isdir(dest):
        # a model exported by an earlier boot is checked first, as snapshot exports are (stamps,
        # and the chunk digests of any file that changed since): nothing unverified is served
        problems = snapshot.check_export(image, dest)
        if not problems:
            return dest, "export", {"reused": True, "fuse_unusable": why_not}
        log.warning("the exported model %s does not match its image (%s); exporting it again", dest, problems[0])
        shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        res = casfs.export(image, dest, progress=False)
    except FileExistsError:  # another replica exported it meanwhile
        return dest, "export", {"reused": True, "fuse_unusable": why_not}
    except casfs.CasfsError as e:
        raise BootError(f"export phase: {e}") from None
    snapshot.record_export(image, dest)
    return dest, "export", {"reused": False, "bytes": res.bytes, "files": res.files, "fuse_unusable": why_not}


def materialize_metadata(image: Any, workdir: str) -> tuple[str, str, dict]:
    """Write the model image's files except its weights (config, tokenizer, templates) into a
    directory; returns (path, "metadata", detail). For the transformers engine, which streams
    the weights from casfs itself: no FUSE, and no copy of gigabytes of weights.

    The path depends only on the image id (a snapshot finds the files where it left them).
    Written into a temporary directory and renamed, so a reader never sees half of it.

    Raises:
        BootError: a file cannot be read from the store or written.
    """
    dest = os.path.join(workdir, "metadata", image.id)
    if os.path.isdir(dest):
        return dest, "metadata", {"reused": True}
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    written = nbytes = 0
    try:
        with casfs.atomic_directory(dest) as tmp:
            for name in image.listdir(""):
                st = image.stat(name)
                if not st.is_file or name.endswith(WEIGHT_SUFFIXES):
                    continue
                data = image.read_entry(image.lookup(name))
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
                written += 1
                nbytes += len(data)
    except (casfs.CasfsError, OSError) as e:
        if os.path.isdir(dest):  # another replica wrote it meanwhile (the rename lost the race)
            return dest, "metadata", {"reused": True}
        raise BootError(f"writing the model's config and tokenizer failed: {e}") from None
    return dest, "metadata", {"reused": False, "files": written, "bytes": nbytes}
