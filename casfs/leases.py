"""Leases: how a running build, copy or gc tells the others on one store what it is doing, so
that gc never deletes an object that a writer references but has not yet written into an index.

The race they close (issue 17): a build reads the tagged images' chunk lists to reuse their
objects; the tag of one of those images is removed, and gc runs before the build has written
its index. Without leases gc sweeps the reused objects (they are old, and no tag reaches them),
and the build tags an image whose chunks are gone.

A lease is a small JSON object ``leases/<kind>-<id>`` in the store itself, so the protection
holds on every writable store kind (a local directory, S3); read-only stores (HTTP) take no
writers. It names its holder (host, pid, command), the images it pinned, the objects it
recorded, when it began and when it expires; a thread renews it every ``ttl/5`` seconds, so
the lease of a crashed process lapses after ``ttl`` and gc removes it.

The protocol, for a writer (``begin_writer``) and for gc (``hold_gc``)::

    writer (build, copy)                          gc
    1. read the tags                              1. put its gc lease
    2. put its lease pinning those images         2. read the tags, list the leases
    3. list the leases: while a gc lease is       3. keep what the tags reach, and for every
       live, wait, then start again at 1             live writer lease: its pinned images,
    4. read the tags again: reuse only images        its recorded objects, and every object
       pinned in 2 and still tagged                  no older than the lease (new uploads)
    5. upload new objects                         4. sweep the rest; delete lapsed leases;
    6. record every object the index will            drop its own lease
       reference (``record``; waits for gc),
       check that each one exists (re-upload
       what is missing), write the index, tag
    7. drop the lease

Why it holds: a writer and a gc each put their lease before they read the other's, so on a
linearizable store (a local filesystem; S3, which is strongly consistent) the one that puts
second sees the first. A gc that sees a writer keeps what the writer pinned or recorded and
everything it uploaded; a writer that sees a gc waits for it to finish before it trusts what
it read (step 3, and again in step 6). Step 4 covers a gc that finished between 1 and 3: an
image still tagged after 3 was still tagged when any such gc read the tags. The existence
check of step 6 is the backstop for what no lease covered: a lease that lapsed because its
holder was suspended, or a chunk a build found by name (``contains``) rather than through a
tagged image.

Clocks: expiry and "no older than the lease" compare times written by different hosts (and,
on S3, the server's object times); ``SKEW`` seconds of disagreement are tolerated.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .errors import CasfsError
from .layout import LEASES, kind_prefix, name_of
from .objects.base import ObjectStore

log = logging.getLogger("casfs.leases")

WRITER_TTL = 300.0  # seconds a writer's lease lives without renewal
GC_TTL = 60.0  # a crashed gc blocks writers for at most this long
SKEW = 30.0  # seconds of clock disagreement between hosts (and the store) tolerated
POLL = 0.5  # seconds between looks while waiting for a gc to finish
WRITER_KINDS = ("build", "copy")
GC = "gc"


@dataclass
class LeaseInfo:
    """A lease as read from the store."""

    key: str
    kind: str
    created: float
    expires: float
    holder: str = ""
    pins: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)

    def live(self, now: float | None = None) -> bool:
        """Not expired (with ``SKEW`` seconds of grace for the holder's clock)."""
        return (time.time() if now is None else now) < self.expires + SKEW


def read_leases(objects: ObjectStore) -> list[LeaseInfo]:
    """Every lease in the store. A malformed one (torn, foreign) counts as a writer's lease
    that protects only young objects, from its object's time for one ``WRITER_TTL`` (lapsed at
    once on a store that cannot tell an object's time)."""
    out = []
    for key in list(objects.list(kind_prefix(LEASES))):
        try:
            data = objects.get(key)
        except KeyError:
            continue  # released meanwhile
        info = _parse(key, data)
        if info is None:
            mtime = getattr(objects, "mtime", None)
            try:
                born = float(mtime(key)) if mtime is not None else 0.0
            except KeyError:
                continue
            info = LeaseInfo(key=key, kind="unknown", created=born, expires=born + WRITER_TTL if born else 0.0)
        out.append(info)
    return out


def _parse(key: str, data: bytes) -> LeaseInfo | None:
    try:
        d = json.loads(data)
        return LeaseInfo(key=key, kind=str(d["kind"]), created=float(d["created"]),
                         expires=float(d["expires"]), holder=str(d.get("holder", "")),
                         pins=[str(p) for p in d.get("pins") or []],
                         objects=[str(o) for o in d.get("objects") or []])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def live_writers(leases: Iterable[LeaseInfo], now: float | None = None) -> list[LeaseInfo]:
    return [lease for lease in leases if lease.kind != GC and lease.live(now)]


def live_gcs(leases: Iterable[LeaseInfo], now: float | None = None, *, exclude: str = "") -> list[LeaseInfo]:
    return [lease for lease in leases if lease.kind == GC and lease.live(now) and lease.key != exclude]


def _holder() -> str:
    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{socket.gethostname()} pid {os.getpid()} ({argv0})"


class Lease:
    """One lease held by this process, renewed by a background thread until ``release()``.

    Use ``begin_writer`` or ``hold_gc`` rather than the constructor.
    """

    def __init__(self, objects: ObjectStore, kind: str, ttl: float) -> None:
        self.objects = objects
        self.kind = kind
        self.ttl = ttl
        self.key = f"{LEASES}/{kind}-{uuid.uuid4().hex}"
        self.created = time.time()
        self.holder = _holder()
        self.pins: list[str] = []
        self.recorded: list[str] = []
        self.lapsed = False  # a renewal came too late: the protection may have had a gap
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewed = 0.0
        self._thread: threading.Thread | None = None

    # -- writing it ---------------------------------------------------------------------------

    def _body(self) -> bytes:
        return json.dumps({"kind": self.kind, "holder": self.holder, "created": self.created,
                           "expires": time.time() + self.ttl, "pins": self.pins,
                           "objects": self.recorded}, separators=(",", ":")).encode()

    def put(self) -> None:
        """Write (or renew) the lease. Raises StoreError when the store refuses it."""
        with self._lock:
            now = time.time()
            if self._renewed and now > self._renewed + self.ttl:
                self.lapsed = True
            self.objects.put(self.key, self._body())
            self._renewed = now

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 5):
            try:
                self.put()
            except CasfsError as e:  # keep trying; a lapse is caught by the final check
                log.warning("renewing lease %s failed: %s", self.key, e)

    def start(self) -> "Lease":
        self.put()
        self._thread = threading.Thread(target=self._renew_loop, name="casfs-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and delete the lease (a failure to delete only leaves it to expire)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        try:
            self.objects.delete(self.key)
        except CasfsError as e:
            log.warning("could not remove lease %s (it expires on its own): %s", self.key, e)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- a writer's steps -----------------------------------------------------------------------

    def wait_for_gc(self, on_wait: Callable[[str], None] | None = None) -> bool:
        """Block while a live gc lease exists; True if there was one to wait for."""
        waited = False
        while True:
            gcs = live_gcs(read_leases(self.objects), exclude=self.key)
            if not gcs:
                return waited
            if not waited and on_wait is not None:
                g = gcs[0]
                on_wait(f"waiting for gc on {self.objects.url} to finish ({g.holder or g.key}; "
                        f"its lease lapses in {max(0.0, g.expires + SKEW - time.time()):.0f} s)")
            waited = True
            time.sleep(POLL)

    def record(self, keys: Iterable[str], on_wait: Callable[[str], None] | None = None) -> None:
        """Step 6: add ``keys`` (object keys the index will reference) to the lease, then wait
        for any gc that may have started before they were recorded."""
        with self._lock:
            self.recorded = sorted(set(self.recorded) | set(keys))
        self.put()
        self.wait_for_gc(on_wait)


def begin_writer(store, kind: str, *, pin_tags: bool = False, record: Iterable[str] = (),
                 ttl: float = WRITER_TTL, on_wait: Callable[[str], None] | None = None) -> Lease | None:
    """Take a writer's lease on ``store`` (a ``casfs.Store``); steps 1-4 of the protocol.

    With ``pin_tags`` the lease pins the images of the current tags; ``lease.pins`` is then the
    list of image ids whose objects may be reused (tagged before and after the lease was seen
    by every gc). ``record`` puts object keys in the lease at once (a copy knows them all).
    Returns None for a read-only store (nothing to protect there: no writer can write).

    Raises:
        StoreError: when the lease cannot be written.
    """
    if kind not in WRITER_KINDS:
        raise ValueError(f"unknown writer kind {kind!r}")
    objects = store.objects
    if getattr(objects, "read_only", False):
        return None
    lease = Lease(objects, kind, ttl)
    lease.recorded = sorted(set(record))
    started = False
    try:
        while True:
            before = dict(store.tags()) if pin_tags else {}
            lease.pins = sorted(set(before.values()))
            if started:
                lease.put()
            else:
                lease.start()
                started = True
            if not lease.wait_for_gc(on_wait):
                break
        if pin_tags:
            after = store.tags()
            lease.pins = sorted(set(before.values()) & set(after.values()))
        return lease
    except BaseException:
        if started:
            lease.release()
        raise


def hold_gc(objects: ObjectStore, ttl: float = GC_TTL) -> Lease:
    """Take gc's lease (step 1 of gc's side). Raises StoreError when it cannot be written."""
    return Lease(objects, GC, ttl).start()


def missing_objects(objects: ObjectStore, keys: Iterable[str], threads: int = 16) -> list[str]:
    """The keys among ``keys`` that ``objects`` does not hold (checked in parallel: on S3 each
    check is a HEAD request).

    Raises:
        StoreError: when the store cannot answer.
    """
    keys = sorted(set(keys))
    if not keys:
        return []
    if len(keys) < 8 or threads <= 1:
        return [k for k in keys if not objects.contains(k)]
    with ThreadPoolExecutor(max_workers=min(threads, len(keys)), thread_name_prefix="casfs-check") as pool:
        have = list(pool.map(objects.contains, keys))
    return [k for k, h in zip(keys, have) if not h]


def lease_holder_summary(leases: Iterable[LeaseInfo]) -> str:
    """``build (host pid 12 (casfs)), copy (...)``: for messages."""
    return ", ".join(f"{lease.kind} ({lease.holder or name_of(lease.key)})" for lease in leases)


__all__ = ["GC_TTL", "Lease", "LeaseInfo", "SKEW", "WRITER_TTL", "begin_writer", "hold_gc",
           "live_gcs", "live_writers", "missing_objects", "read_leases"]
