"""What a stored CPU snapshot is: a casfs image holding CRIU's images plus ``casfs-snapshot.json``.

The metadata file (``META_FILE``, format ``META_FORMAT``) holds the compatibility key, CRIU's
flags, the files the process had open, and where copies of link_remap files and /dev/shm
segments are kept in the image (under ``EXTRA_DIR``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import casfs

__all__ = ["EXTRA_DIR", "META_FILE", "META_FORMAT", "SnapshotRef", "list_snapshots", "read_meta"]

META_FILE = "casfs-snapshot.json"
META_FORMAT = 1
EXTRA_DIR = "casfs-extra"


@dataclass
class SnapshotRef:
    """A stored CPU snapshot: the casfs image holding it, its tag and its metadata."""

    image_id: str
    tag: str | None
    meta: dict = field(repr=False)
    store_url: str = ""
    timings: dict = field(default_factory=dict)


def read_meta(image: casfs.Image) -> dict:
    """The snapshot metadata of ``image``.

    Raises:
        ValueError: when the image is not a CPU snapshot (no ``casfs-snapshot.json``).
    """
    try:
        data = image.read(META_FILE)
    except casfs.PathNotFound:
        raise ValueError(f"image {image.name} is not a CPU snapshot (no {META_FILE})") from None
    meta = json.loads(data)
    if meta.get("format") != META_FORMAT or meta.get("kind") != "cpu":
        raise ValueError(f"image {image.name}: snapshot format {meta.get('format')!r} is not "
                         f"{META_FORMAT}: take the snapshot again")
    return meta


def list_snapshots(store: casfs.Store) -> list[tuple[str, str, dict]]:
    """(tag, image id, metadata) of every tagged CPU snapshot in ``store``, sorted by tag."""
    out = []
    for tag in sorted(store.tags()):
        try:
            image = store.open_image(tag)
            if not image.exists(META_FILE):
                continue
            out.append((tag, image.id, read_meta(image)))
        except (casfs.CasfsError, ValueError):
            continue
    return out

