"""Opening stores from URLs (``file://`` / plain paths (default), ``s3://``, ``http(s)://``:
the scheme table is ``casfs.objects``), and casfs's home directory."""

from __future__ import annotations

import os

from .errors import StoreError
from .objects import open_objects
from .store import Store

__all__ = ["default_store_url", "home_dir", "open_objects", "open_store"]


def home_dir() -> str:
    """casfs's home directory: ``$CASFS_HOME``, default ``~/.local/share/casfs`` (absolute).

    The one place that default lives; the store, caches, serve's work dir and snapshot exports
    are kept under it unless configured otherwise.
    """
    return os.path.abspath(os.path.expanduser(os.environ.get("CASFS_HOME", "~/.local/share/casfs")))


def default_store_url() -> str:
    """``$CASFS_STORE``, else the embedded local store ``$CASFS_HOME/store``."""
    return os.environ.get("CASFS_STORE") or "file://" + os.path.join(home_dir(), "store")


def open_store(url: str | None = None, *, cache_dir: str | None = None, cache_bytes: int = 50 << 30,
               memory_bytes: int = 512 << 20, azcache: str | None = None, io_threads: int = 16,
               pinned_bytes: int = 0) -> Store:
    """Open the store at ``url`` (default: ``default_store_url()``).

    Args:
        cache_dir: ssd tier directory. Default: ``$CASFS_HOME/cache`` for remote stores, none
            for a local directory (it would cache a disk on the same disk). "" disables it.
        cache_bytes: ssd tier capacity in bytes.
        memory_bytes: memory tier capacity in bytes (0 disables it).
        azcache: comma-separated cache-server URLs (default ``$CASFS_AZCACHE``), when the
            azcache tier is available.
        pinned_bytes: capacity of a pinned host-memory tier (``casfs.PinnedTier``) placed
            first; 0 (default): none. Its memory is allocated as chunks arrive, through torch
            with CUDA (``casfs.PinnedTier`` with another allocator: pass ``Store(pinned=)``).

    Raises:
        StoreError: for bad URLs or unreachable backends.
    """
    url = url or default_store_url()
    objects = open_objects(url)
    local = objects.url.startswith("file://")
    if cache_dir is None:
        cache_dir = None if local else os.path.join(home_dir(), "cache")
    extra = []
    azcache = azcache if azcache is not None else os.environ.get("CASFS_AZCACHE")
    if azcache:
        try:
            from .tiers.azcache import AzCacheTier  # type: ignore[import-not-found]
        except ImportError:
            raise StoreError("this casfs has no azcache tier yet; unset CASFS_AZCACHE") from None
        extra.append(AzCacheTier([u.strip() for u in azcache.split(",") if u.strip()]))
    pinned = None
    if pinned_bytes:
        from .tiers.pinned import PinnedTier

        pinned = PinnedTier(pinned_bytes)
        pinned.close_with_store = True
    return Store(objects, cache_dir=cache_dir or None, cache_bytes=cache_bytes,
                 memory_bytes=memory_bytes, extra_tiers=extra, io_threads=io_threads, pinned=pinned)
