"""Object keys and where they live: the one place a chunk, pack, index or tag becomes a key,
and a key becomes a path.

Object keys (``kind/name``), the names every object store uses::

    chunks/<hex>    one chunk frame (large chunks); <hex> is the chunk's blake3 digest
    packs/<hex>     many small chunk frames back to back (read with ranged GETs); <hex> is the
                    digest of the pack's bytes
    indexes/<hex>   an image index, as a chunk frame; <hex> is the image id
    tags/<name>     a text file holding an image id
    profiles/<hex>  a startup access profile of image <hex>
    leases/<kind>-<id>  a running build, copy or gc announcing itself (``casfs.leases``)

A chunk's object is its pack when it is packed, else its own loose object (``object_key``).

Paths (relative, '/'-separated) of a key under a store's root, in one of two layouts:

- ``fanout`` (a local store directory, the same directory served over HTTP, a cache server's
  URLs, an ssd cache): ``<kind>/<name[:2]>/<name>``, so no directory holds millions of names;
- ``flat`` (S3 keys under a prefix, ``?layout=flat`` cache URLs): ``<kind>/<name>``.

An ssd cache has no kinds: a frame of digest <hex> lives at ``fanout_name(<hex>)`` =
``<hex[:2]>/<hex>`` under its root (``casfs.tiers.ssd``; a cache server in peer mode reads a
host's ssd cache through the same function). A host's cache directory holds its ssd tier at
``cache_chunks_dir(cache_dir)`` = ``<cache_dir>/chunks`` and cached indexes at
``<cache_dir>/indexes/<id>``.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .index import ChunkRef

CHUNKS, PACKS, INDEXES, TAGS, PROFILES, LEASES = "chunks", "packs", "indexes", "tags", "profiles", "leases"
KINDS = (CHUNKS, PACKS, INDEXES, TAGS, PROFILES, LEASES)
IMMUTABLE_KINDS = (CHUNKS, PACKS, INDEXES)  # named by a digest of their contents
DATA_KINDS = (INDEXES, CHUNKS, PACKS, PROFILES)  # what gc considers (tags are roots; leases its own)
FANOUT, FLAT = "fanout", "flat"

_KEY = re.compile(r"^[a-z]+/[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}$")
_PATH = re.compile(r"^/?(chunks|packs|indexes)/(?:([0-9a-f]{2})/)?([0-9a-f]{64})$")


def check_key(key: str) -> str:
    """Validate an object key ('kind/name', no path tricks); returns it.

    Raises:
        ValueError: for a key that could escape the store or is malformed.
    """
    if not _KEY.match(key) or ".." in key:
        raise ValueError(f"invalid object key {key!r}")
    return key


def split_key(key: str) -> tuple[str, str]:
    """``kind/name`` -> (kind, name), validated.

    Raises:
        ValueError: as ``check_key``.
    """
    kind, _, name = check_key(key).partition("/")
    return kind, name


def name_of(key: str) -> str:
    """The name part of ``kind/name`` (not validated: for keys a store listed)."""
    return key.partition("/")[2]


def kind_prefix(kind: str) -> str:
    """The listing prefix of a kind: ``"tags"`` -> ``"tags/"``."""
    return kind + "/"


def chunk_key(digest: bytes) -> str:
    return f"{CHUNKS}/{digest.hex()}"


def pack_key(digest: bytes) -> str:
    return f"{PACKS}/{digest.hex()}"


def index_key(image_id: str) -> str:
    return f"{INDEXES}/{image_id}"


def tag_key(name: str) -> str:
    return f"{TAGS}/{name}"


def profile_key(image_id: str) -> str:
    return f"{PROFILES}/{image_id}"


def object_key(ref: ChunkRef) -> str:
    """The object that holds chunk ``ref``: its pack when packed, else its loose object."""
    return pack_key(ref.pack) if ref.pack is not None else chunk_key(ref.digest)


def cache_chunks_dir(cache_dir: str) -> str:
    """The ssd tier's root inside a host's cache directory (``casfs.Store``); a cache server
    given the same directory (peer mode) serves the loose chunks found there."""
    return os.path.join(cache_dir, CHUNKS)


def fanout_name(name: str) -> str:
    """``<name[:2]>/<name>``: a name inside its kind's (or an ssd cache's) directory."""
    return f"{name[:2]}/{name}"


def relpath(key: str, layout: str = FANOUT) -> str:
    """The path of object ``key`` under a store root, '/'-separated, no leading '/'.

    Raises:
        ValueError: for an invalid key or an unknown layout.
    """
    kind, name = split_key(key)
    if layout == FANOUT:
        return f"{kind}/{fanout_name(name)}"
    if layout == FLAT:
        return key
    raise ValueError(f"unknown layout {layout!r} (use {FANOUT!r} or {FLAT!r})")


def parse_object_path(path: str) -> str | None:
    """The immutable object key a URL path names, in either layout, or None for a path that
    names no object.

    ``/chunks/ab/ab12…`` (fanout) and ``/chunks/ab12…`` (flat) both give ``chunks/ab12…``;
    only ``chunks``, ``packs`` and ``indexes`` with 64 hex digits are objects.

    Raises:
        ValueError: a fanout path whose two-digit directory does not match the name.
    """
    m = _PATH.match(path)
    if not m:
        return None
    kind, fan, name = m.groups()
    if fan is not None and fan != name[:2]:
        raise ValueError("fan-out directory does not match the name")
    return f"{kind}/{name}"
