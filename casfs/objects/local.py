"""Local-directory object store: the embedded default (``file:///path`` or a plain path)."""

from __future__ import annotations

import os
import shutil
import time
from typing import Iterator
from urllib.parse import SplitResult

from ..errors import StoreError
from ..fsutil import atomic_write, remove_stale_temps
from ..layout import FANOUT, kind_prefix, relpath


def from_url(url: str, parts: SplitResult) -> "LocalObjectStore":
    """The store for a plain path or ``file:///abs/path`` (``casfs.objects``'s scheme table).

    Raises:
        StoreError: for a file URL with a host, or an empty path.
    """
    path = parts.path if parts.scheme else url
    if parts.scheme and parts.netloc not in ("", "localhost"):
        raise StoreError(f"{url}: file URLs name a local path (file:///abs/path)")
    if not path:
        raise StoreError(f"{url}: empty store path")
    return LocalObjectStore(path)


class LocalObjectStore:
    """Objects as files: ``<root>/<kind>/<name[:2]>/<name>``.

    A missing file is a KeyError; any other failure of the filesystem (EIO, a directory in the
    way) is a ``StoreError`` naming the file, as the ``ObjectStore`` contract asks.

    Writes are atomic (``casfs.fsutil.atomic_write``: a temporary file in ``<root>/tmp``, then a
    rename); with ``fsync`` (the default) the file is flushed before the rename and its
    directory after it, so an object that ``put`` returned for survives a power loss.
    """

    read_only = False

    def __init__(self, root: str, *, create: bool = True, fsync: bool = True) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = "file://" + self.root
        self.fsync = fsync
        if create:
            try:
                os.makedirs(os.path.join(self.root, "tmp"), exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store directory {self.root}: {e.strerror}") from None
        elif not os.path.isdir(self.root):
            raise StoreError(f"store directory {self.root} does not exist")
        # what a killed writer left (its pid gone, the file a minute old) goes now, not at gc
        remove_stale_temps(os.path.join(self.root, "tmp"))

    def _path(self, key: str) -> str:
        return os.path.join(self.root, relpath(key, FANOUT))

    def local_path(self, key: str) -> str:
        """The file that holds object ``key`` (it may not exist). Lets readers ``pread`` an
        object's bytes straight into their own buffers (``BlobTier.read_into``).

        Raises:
            ValueError: for an invalid key.
        """
        return self._path(key)

    def _failed(self, op: str, key: str, e: OSError) -> StoreError:
        return StoreError(f"cannot {op} {key} in {self.root}: {e.strerror or e}")

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as e:
            raise self._failed("read", key, e) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative range")
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as e:
            raise self._failed("read", key, e) from None
        try:
            return os.pread(fd, length, offset)
        except OSError as e:
            raise self._failed("read", key, e) from None
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes) -> None:
        try:
            atomic_write(self._path(key), data, fsync=self.fsync, tmp_dir=os.path.join(self.root, "tmp"),
                         makedirs=True)
        except OSError as e:
            raise StoreError(f"cannot write {key} to {self.root}: {e.strerror}") from None

    def contains(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def list(self, prefix: str) -> Iterator[str]:
        kind = prefix.rstrip("/")
        base = os.path.join(self.root, kind)
        if not os.path.isdir(base):
            return
        for sub in sorted(os.scandir(base), key=lambda e: e.name):
            if sub.is_dir():
                for f in sorted(os.listdir(sub.path)):
                    yield kind_prefix(kind) + f

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as e:
            raise self._failed("stat", key, e) from None

    def clean_tmp(self, older_than: float) -> tuple[int, int]:
        """Remove files in ``<root>/tmp`` last modified more than ``older_than`` seconds ago:
        the leftovers of writers killed between writing a temporary file and renaming it (a
        running write renews its file's time with every write). Returns (files, bytes) removed.
        """
        tmp = os.path.join(self.root, "tmp")
        now = time.time()
        files = nbytes = 0
        try:
            entries = list(os.scandir(tmp))
        except FileNotFoundError:
            return 0, 0
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
                if now - st.st_mtime <= older_than:
                    continue
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)
                else:
                    os.unlink(e.path)
            except OSError:
                continue
            files += 1
            nbytes += st.st_size
        return files, nbytes

    def mtime(self, key: str) -> float:
        """Last modification time (seconds since the epoch); KeyError when missing."""
        try:
            return os.stat(self._path(key)).st_mtime
        except FileNotFoundError:
            raise KeyError(key) from None
