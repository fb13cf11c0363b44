"""Garbage collection: mark every object reachable from a tag, sweep the rest.

Never deletes an index, pack or chunk that a tagged image references. Objects younger than the
grace period are kept too, so a build that has uploaded chunks but not yet tagged its image is
not swept from under it (backends that cannot tell an object's age keep nothing back: run gc
when no build is running).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
    keep = store.referenced_objects()
    kept_ids = {k.partition("/")[2] for k in keep if k.startswith("indexes/")}
    res = GcResult(dry_run=dry_run)
    now = time.time()
    mtime = getattr(store.objects, "mtime", None)
    for key in list(store.iter_objects()):
        kind, _, name = key.partition("/")
        if key in keep or (kind == "profiles" and name in kept_ids):
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
