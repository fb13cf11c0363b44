"""Opening stores from URLs: ``file://`` / plain paths (default), ``s3://``, ``http(s)://``."""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlparse

from .errors import StoreError
from .store import Store
from .tiers.blob import ObjectStore


def home_dir() -> str:
    """casfs's home directory: ``$CASFS_HOME``, default ``~/.local/share/casfs`` (absolute).

    The one place that default lives; the store, caches, serve's work dir and snapshot exports
    are kept under it unless configured otherwise.
    """
    return os.path.abspath(os.path.expanduser(os.environ.get("CASFS_HOME", "~/.local/share/casfs")))


def default_store_url() -> str:
    """``$CASFS_STORE``, else the embedded local store ``$CASFS_HOME/store``."""
    return os.environ.get("CASFS_STORE") or "file://" + os.path.join(home_dir(), "store")


def open_objects(url: str) -> ObjectStore:
    """The blob-store backend for ``url``.

    ``s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1`` (endpoint also from
    ``CASFS_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL``); ``http(s)://host/path`` is read-only.

    Raises:
        StoreError: for an unknown scheme or malformed URL.
    """
    u = urlparse(url)
    if u.scheme in ("", "file"):
        path = u.path if u.scheme == "file" else url
        if u.scheme == "file" and u.netloc not in ("", "localhost"):
            raise StoreError(f"{url}: file URLs name a local path (file:///abs/path)")
        if not path:
            raise StoreError(f"{url}: empty store path")
        from .tiers.blob_local import LocalObjectStore

        return LocalObjectStore(path)
    if u.scheme == "s3":
        if not u.netloc:
            raise StoreError(f"{url}: an S3 URL needs a bucket: s3://bucket/prefix")
        q = parse_qs(u.query)
        try:
            from .tiers.blob_s3 import S3ObjectStore
        except ImportError as e:
            raise StoreError(f"S3 stores need boto3: pip install 'casfs[s3]' ({e})") from None
        endpoint = (q.get("endpoint") or [None])[0] or os.environ.get("CASFS_S3_ENDPOINT") \
            or os.environ.get("AWS_ENDPOINT_URL")
        region = (q.get("region") or [None])[0]
        return S3ObjectStore(u.netloc, u.path.strip("/"), endpoint_url=endpoint, region=region)
    if u.scheme in ("http", "https"):
        from .tiers.blob_http import HttpObjectStore

        return HttpObjectStore(url)
    raise StoreError(f"{url}: unknown store scheme {u.scheme!r} (use a path, file://, s3:// or http(s)://)")


def open_store(url: str | None = None, *, cache_dir: str | None = None, cache_bytes: int = 50 << 30,
               memory_bytes: int = 512 << 20, azcache: str | None = None, io_threads: int = 16) -> Store:
    """Open the store at ``url`` (default: ``default_store_url()``).

    Args:
        cache_dir: ssd tier directory. Default: ``$CASFS_HOME/cache`` for remote stores, none
            for a local directory (it would cache a disk on the same disk). "" disables it.
        cache_bytes: ssd tier capacity in bytes.
        memory_bytes: memory tier capacity in bytes (0 disables it).
        azcache: comma-separated cache-server URLs (default ``$CASFS_AZCACHE``), when the
            azcache tier is available.

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
    return Store(objects, cache_dir=cache_dir or None, cache_bytes=cache_bytes,
                 memory_bytes=memory_bytes, extra_tiers=extra, io_threads=io_threads)
