"""casfs: lazy, content-addressed, tiered image storage for fast cold starts.

The public API is what this module exports, and nothing else::

    import casfs
    store = casfs.open_store()                       # $CASFS_STORE or the local default
    result = casfs.build(store, "/path/to/tree", tag="demo")
    image = store.open_image("demo")                 # loads only the index
    image.listdir("usr/lib"); image.stat("etc/hosts"); image.read("etc/hosts", 0, 100)
    casfs.mount(image, "/mnt/demo")                  # lazy, read-only FUSE mount
    casfs.export(image, "/tmp/demo-tree")            # or a full copy as a directory

``snapshot/`` and ``serve/`` use casfs only through these names (``tests/test_layers.py``
checks it); everything in casfs's submodules is an implementation detail.
"""

from __future__ import annotations

from .build import CODE_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, WEIGHT_CHUNK_SIZE, BuildResult, chunk_size_for, open_source
from .build import build_image as build
from .errors import (BuildError, CasfsError, ChunkUnavailable, CorruptChunk, CorruptIndex,
                     ImageNotFound, NotAFile, PathNotFound, StoreError)
from .export import ExportResult, export
from .fsutil import atomic_directory, atomic_open, atomic_write, fsync_dir
from .fuse.mount import MountError, MountInfo, MountOptions, is_mounted, mount, runtime_dir, unmount
from .image import Image
from .index import ChunkRef, Stat
from .lifeline import Lifeline, sweep_leftovers
from .listen import parse_listen
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Counter, Gauge, Histogram, MetricRegistry
from .profiles import Profile, ProfileItem, load_profile, save_profile
from .safetensors_header import DTYPES as SAFETENSORS_DTYPES
from .safetensors_header import InvalidSafetensors, SafetensorsHeader, TensorInfo
from .safetensors_header import header_length as safetensors_header_length
from .safetensors_header import parse_header as parse_safetensors_header
from .safetensors_header import parse_shard_index as parse_safetensors_index
from .sizes import format_size
from .stats import TierStats, tier_stats
from .store import Store
from .tiers.pinned import PinnedChunk, PinnedTier, cuda_pinned, plain_memory
from .tiers.shared import SharedChunks
from .urls import default_store_url, home_dir, open_store

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "BuildResult",
    "CODE_CHUNK_SIZE",
    "CasfsError",
    "ChunkRef",
    "ChunkUnavailable",
    "CorruptChunk",
    "Counter",
    "CorruptIndex",
    "DEFAULT_CHUNK_SIZE",
    "ExportResult",
    "Gauge",
    "Histogram",
    "Image",
    "ImageNotFound",
    "InvalidSafetensors",
    "Lifeline",
    "METRICS_CONTENT_TYPE",
    "MetricRegistry",
    "MountError",
    "MountInfo",
    "MountOptions",
    "NotAFile",
    "PathNotFound",
    "Profile",
    "ProfileItem",
    "PinnedChunk",
    "PinnedTier",
    "SharedChunks",
    "SAFETENSORS_DTYPES",
    "SafetensorsHeader",
    "Stat",
    "Store",
    "StoreError",
    "TensorInfo",
    "TierStats",
    "WEIGHT_CHUNK_SIZE",
    "atomic_directory",
    "atomic_open",
    "atomic_write",
    "build",
    "cuda_pinned",
    "chunk_size_for",
    "default_store_url",
    "export",
    "format_size",
    "fsync_dir",
    "home_dir",
    "is_mounted",
    "load_profile",
    "mount",
    "open_source",
    "open_store",
    "parse_listen",
    "plain_memory",
    "parse_safetensors_header",
    "parse_safetensors_index",
    "runtime_dir",
    "safetensors_header_length",
    "save_profile",
    "sweep_leftovers",
    "tier_stats",
    "unmount",
]
