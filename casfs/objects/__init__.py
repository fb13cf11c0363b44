"""Object stores (key -> bytes) and the scheme table that opens one from a URL.

``open_objects(url)`` looks the URL's scheme up in a table (fsspec's registry, in small):
each entry names the module function that parses a URL of that scheme and opens the store,
imported on first use so that a missing optional dependency (boto3) costs nothing until its
scheme is used. ``register_scheme`` adds a backend without touching this module.

    ""  / file://   casfs.objects.local   a directory (the embedded default)
    s3://           casfs.objects.s3      S3 or any S3-compatible store (boto3)
    http(s)://      casfs.objects.http    read-only: a store directory on any web server or CDN
    oci://          casfs.objects.oci     an OCI registry repository (blobs + a catalog per tag)
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Callable, Union
from urllib.parse import SplitResult, urlsplit

from ..errors import StoreError
from .base import ObjectStore

__all__ = ["ObjectStore", "Opener", "known_schemes", "open_objects", "register_scheme"]

Opener = Callable[[str, SplitResult], ObjectStore]
"""``opener(url, parts)``: the store for ``url`` (``parts = urlsplit(url)``); StoreError for a
malformed URL."""


@dataclass(frozen=True)
class _Entry:
    target: Union[str, Opener]  # "module:function" (imported on first use) or the opener itself
    needs: str = ""  # what to install when the module cannot be imported


_LOCAL = _Entry("casfs.objects.local:from_url")
_HTTP = _Entry("casfs.objects.http:from_url")
_SCHEMES: dict[str, _Entry] = {
    "": _LOCAL,
    "file": _LOCAL,
    "s3": _Entry("casfs.objects.s3:from_url", "S3 stores need boto3: pip install 'casfs[s3]'"),
    "http": _HTTP,
    "https": _HTTP,
    "oci": _Entry("casfs.objects.oci:from_url"),
}
_lock = threading.Lock()


def register_scheme(scheme: str, opener: Union[str, Opener], *, needs: str = "",
                    replace: bool = False) -> None:
    """Open URLs of ``scheme`` with ``opener`` (a callable, or ``"module:function"`` imported
    on first use; ``needs`` is the hint shown when that import fails).

    Raises:
        ValueError: ``scheme`` is taken and ``replace`` is False.
    """
    scheme = scheme.lower()
    with _lock:
        if scheme in _SCHEMES and not replace:
            raise ValueError(f"store scheme {scheme!r} is already registered (pass replace=True)")
        _SCHEMES[scheme] = _Entry(opener, needs)


def known_schemes() -> list[str]:
    """The registered schemes ("" is a plain path)."""
    with _lock:
        return sorted(_SCHEMES)


def _resolve(entry: _Entry) -> Opener:
    if callable(entry.target):
        return entry.target
    module, _, func = entry.target.partition(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ImportError as e:
        raise StoreError(f"{entry.needs or f'cannot load {module}'} ({e})") from None


def open_objects(url: str) -> ObjectStore:
    """The object store for ``url``: a plain path or ``file:///abs/path``, ``s3://bucket/prefix
    ?endpoint=...&region=...``, ``http(s)://host/path/`` (read-only), ``oci://host[:port]/repo[?insecure=1]``, or a
    registered scheme.

    Raises:
        StoreError: for an unknown scheme, a malformed URL or a missing optional dependency.
    """
    parts = urlsplit(url)
    with _lock:
        entry = _SCHEMES.get(parts.scheme.lower())
    if entry is None:
        schemes = ", ".join(f"{s}://" for s in known_schemes() if s)
        raise StoreError(f"{url}: unknown store scheme {parts.scheme!r} (use a path or one of {schemes})")
    return _resolve(entry)(url, parts)
