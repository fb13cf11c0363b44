"""Garbage collection: mark every object reachable from a tag, sweep the rest.

Never deletes an index, pack or chunk that a tagged image references, nor one that a running
build or copy may still reference: gc takes a lease of its own and honours the writers' leases
(``casfs.leases``: the images they pinned, the objects they recorded, and everything written
since they began). Objects younger than the grace period are kept too, and so is everything a
younger-than-grace index references (a writer that lost its lease, e.g. one from an older casfs).

Where the store cannot tell an object's age and a writer is running, gc deletes nothing
unreferenced (it cannot tell the writer's new uploads from old garbage) and says so.

Also removed: leases that lapsed (their holder crashed) and, in a local store, temporary files
in ``<store>/tmp`` older than the grace period (left by writers killed mid-write; never one
younger than ``TMP_MIN_AGE`` or than a running writer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import CasfsError, StoreError
from .layout import INDEXES, PROFILES, index_key, kind_prefix, name_of, object_key
from .leases import SKEW, hold_gc, live_writers, read_leases
from .store import Store

TMP_MIN_AGE = 600.0  # seconds: never remove a younger temporary file, whatever the grace


@dataclass
class GcResult:
    """What gc did. ``leased``: unreferenced objects kept for running writers; ``writers``:
    the live writer leases it honoured (their holders)."""

    kept: int = 0
    deleted: int = 0
    bytes_deleted: int = 0
    young: int = 0
    leased: int = 0
    writers: list[str] = field(default_factory=list)
    leases_removed: int = 0
    tmp_removed: int = 0
    tmp_bytes: int = 0
    dry_run: bool = False
    doomed: list[str] = field(default_factory=list)


def collect(store: Store, *, dry_run: bool = False, grace_seconds: float = 3600.0) -> GcResult:
    """Delete unreferenced objects (or only list them with ``dry_run``).

    Raises:
        ValueError: for a negative or NaN ``grace_seconds`` (NaN compared as "not young" would
            delete every unreferenced object at once).
        StoreError: when a tag is unreadable (its image would lose its chunks), the store is
            read-only (an HTTP store; ``dry_run`` works there), or the store fails.
    """
    if not grace_seconds >= 0:
        raise ValueError(f"--grace {grace_seconds}: use 0 or more seconds (0: no grace period)")
    objects = store.objects
    if getattr(objects, "read_only", False) and not dry_run:
        raise StoreError(f"gc cannot delete through {store.url} (a read-only store): run it on the store "
                         "this one publishes (its directory or bucket); --dry-run lists what it would delete")
    own = None if dry_run else hold_gc(objects)
    try:
        return _collect(store, dry_run, grace_seconds, own.key if own else "")
    finally:
        if own is not None:
            own.release()


def _collect(store: Store, dry_run: bool, grace_seconds: float, own_key: str) -> GcResult:
    objects = store.objects
    unreadable = store.unreadable_tags()
    if unreadable:
        # an unreadable tag still protects its image: refuse rather than sweep its chunks
        shown = "; ".join(f"'{name}': {why}" for name, why in unreadable[:3])
        more = f" (and {len(unreadable) - 3} more: casfs images lists them)" if len(unreadable) > 3 else ""
        raise StoreError(f"gc refused: {len(unreadable)} unreadable tag(s) in {store.url} (the objects of "
                         f"the image each names cannot be kept); fix or remove them first: {shown}{more}")
    keep = store.referenced_objects()
    res = GcResult(dry_run=dry_run)
    now = time.time()
    leases = [lease for lease in read_leases(objects) if lease.key != own_key]
    writers = live_writers(leases, now)
    res.writers = [f"{w.kind} ({w.holder})" if w.holder else w.key for w in writers]
    protect_since = min(w.created for w in writers) - SKEW if writers else None
    for w in writers:
        keep.update(w.objects)
        for image_id in w.pins:
            _keep_image(store, image_id, keep)
    mtime = getattr(objects, "mtime", None)
    if mtime is not None and grace_seconds > 0:
        # a young index not tagged yet (a build or copy about to set its tag) keeps what it
        # references: it may reuse objects far older than the grace period
        for key in list(objects.list(kind_prefix(INDEXES))):
            if key in keep:
                continue
            try:
                if now - mtime(key) >= grace_seconds:
                    continue
            except KeyError:
                continue
            _keep_image(store, name_of(key), keep)
    kept_ids = {name_of(k) for k in keep if k.startswith(kind_prefix(INDEXES))}
    for key in list(store.iter_objects()):
        kind, _, name = key.partition("/")
        if key in keep or (kind == PROFILES and name in kept_ids):
            res.kept += 1
            continue
        if mtime is not None and (grace_seconds > 0 or protect_since is not None):
            try:
                t = mtime(key)
            except KeyError:
                continue
            if grace_seconds > 0 and now - t < grace_seconds:
                res.young += 1
                continue
            if protect_since is not None and t >= protect_since:
                res.leased += 1  # written since a running writer began: maybe its upload
                continue
        elif protect_since is not None:
            res.leased += 1  # no object times here: a writer's uploads cannot be told apart
            continue
        try:
            size = objects.size(key)
        except KeyError:
            continue
        res.doomed.append(key)
        res.bytes_deleted += size
        if not dry_run:
            objects.delete(key)
        res.deleted += 1
    if not dry_run:
        for lease in leases:
            if not lease.live(now):
                objects.delete(lease.key)  # its holder crashed
                res.leases_removed += 1
        clean_tmp = getattr(objects, "clean_tmp", None)
        if clean_tmp is not None:
            # a temporary file lives for one put (seconds): one older than this is a leftover
            older = max(grace_seconds, TMP_MIN_AGE)
            if protect_since is not None:
                older = max(older, now - protect_since)
            res.tmp_removed, res.tmp_bytes = clean_tmp(older)
    return res


def _keep_image(store: Store, image_id: str, keep: set[str]) -> None:
    """Add image ``image_id``'s index and objects to ``keep`` (nothing when it is gone)."""
    try:
        ix = store.load_index(image_id)
    except (KeyError, CasfsError):
        return
    keep.add(index_key(image_id))
    for ref in ix.all_chunks():
        keep.add(object_key(ref))
