"""casfs: lazy, content-addressed, tiered image storage for fast cold starts.

The public API is what this module exports, and nothing else::

    import casfs
    store = casfs.open_store()                       # $CASFS_STORE or the local default
    result = casfs.build(store, "/path/to/tree", tag="demo")
    image = store.open_image("demo")                 # loads only the index
    image.listdir("usr/lib"); image.stat("etc/hosts"); image.read("etc/hosts", 0, 100)
"""

from __future__ import annotations

from .build import DEFAULT_CHUNK_SIZE, BuildResult, open_source
from .build import build_image as build
from .errors import (BuildError, CasfsError, ChunkUnavailable, CorruptChunk, CorruptIndex,
                     ImageNotFound, NotAFile, PathNotFound, StoreError)
from .fsutil import atomic_directory, atomic_open, atomic_write, fsync_dir
from .image import Image
from .fuse.mount import mount, unmount
from .index import ChunkRef, Stat
from .store import Store
from .urls import default_store_url, open_store

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "BuildResult",
    "CasfsError",
    "ChunkRef",
    "ChunkUnavailable",
    "CorruptChunk",
    "CorruptIndex",
    "DEFAULT_CHUNK_SIZE",
    "Image",
    "ImageNotFound",
    "NotAFile",
    "PathNotFound",
    "Stat",
    "Store",
    "StoreError",
    "atomic_directory",
    "atomic_open",
    "atomic_write",
    "build",
    "default_store_url",
    "fsync_dir",
    "mount",
    "open_source",
    "open_store",
    "unmount",
]
