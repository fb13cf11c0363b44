"""Garbage collection: mark every object reachable from a tag, sweep the rest.

Never deletes an index, pack or chunk that a tagged image references. Objects younger than the
grace period are kept too, and so is everything a younger-than-grace index references, so a
build that has uploaded chunks (or reused old ones) but not yet tagged its image is not swept from
under it (backends that cannot tell an object's age keep nothing back: run gc
when no build is running).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import CasfsError, StoreError
from .layout import INDEXES, PROFILES, TAGS, kind_prefix, name_of, object_key
from .store import Store


@dataclass
class GcResult:
    kept: int = 0
    deleted: int = 0
    bytes_deleted: int = 0
    young: int = 0
    dry_run: bool = False
    doomed: list[str] = field(default_factory=list)


def collect(store: Store, *, dry_run: bool = False, grace_seconds: float = 3600.0) -> GcResult:
    """Delete unreferenced objects (or only list them with ``dry_run``)."""
    tag_keys = list(store.objects.list(kind_prefix(TAGS)))
    readable = store.tags()
    unreadable = [k for k in tag_keys if name_of(k) not in readable]
    if unreadable:
        # an unreadable tag still protects its image: refuse rather than sweep its chunks
        raise StoreError(f"gc refused: tag(s) {', '.join(unreadable[:5])} in {store.url} are unreadable; "
                         "repair them (casfs tag IMAGE NAME) or remove them (casfs rm NAME) first")
    keep = store.referenced_objects()
    res = GcResult(dry_run=dry_run)
    now = time.time()
    mtime = getattr(store.objects, "mtime", None)
    if mtime is not None and grace_seconds > 0:
        # a young index not tagged yet (a build or copy about to set its tag) keeps what it
        # references: it may reuse objects far older than the grace period
        for key in list(store.objects.list(kind_prefix(INDEXES))):
            if key in keep:
                continue
            try:
                if now - mtime(key) >= grace_seconds:
                    continue
                ix = store.load_index(name_of(key))
            except (KeyError, CasfsError):
                continue
            keep.add(key)
            for ref in ix.all_chunks():
                keep.add(object_key(ref))
    kept_ids = {name_of(k) for k in keep if k.startswith(kind_prefix(INDEXES))}
    for key in list(store.iter_objects()):
        kind, _, name = key.partition("/")
        if key in keep or (kind == PROFILES and name in kept_ids):
            res.kept += 1
            continue
        if mtime is not None and grace_seconds > 0:
            try:
                if now - mtime(key) < grace_seconds:
                    res.young += 1
                    continue
            except KeyError:
                continue
        try:
            size = store.objects.size(key)
        except KeyError:
            continue
        res.doomed.append(key)
        res.bytes_deleted += size
        if not dry_run:
            store.objects.delete(key)
        res.deleted += 1
    return res
