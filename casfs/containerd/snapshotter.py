"""The casfs snapshotter's logic: containerd's snapshot model over overlayfs, where a snapshot
whose contents are a casfs image is a lazy casfs mount instead of an unpacked directory.

Layout under ``root``::

    metadata.db                 the snapshots (``casfs.containerd.metadata``)
    snapshots/<id>/fs           an ordinary snapshot's files (an overlay upper dir when active)
    snapshots/<id>/work         overlayfs's work dir
    snapshots/<id>/casfs        a casfs snapshot's lazy mount (read-only, FUSE)
    cache/                      the casfs ssd cache tier of every image read (default)

Mounts handed to containerd (it performs them): an active snapshot without parents is a
``bind`` of its ``fs``; with parents, ``overlay`` with ``lowerdir`` = the parents' dirs (a
casfs parent contributes its mount), ``upperdir`` = its ``fs``; a view is a read-only bind of
its one parent, or an overlay without upper dir.

How a layer becomes a casfs snapshot (``casfs.oci.publish`` writes such images):

- **pull without download** (CRI, nerdctl, the Go client's pull-and-unpack): ``Prepare`` gets
  the labels ``containerd.io/snapshot.ref`` (the chain id the snapshot will be committed as)
  and ``containerd.io/snapshot/casfs.image-id``/``casfs.store`` (inherited from the layer's
  annotations). The snapshotter mounts the image and commits it under that chain id itself,
  then answers "already exists": containerd finds the committed snapshot by its
  ``snapshot.ref`` label and skips fetching and applying the layer;
- **fetch and apply** (``ctr image pull`` in containerd 1.6 downloads every layer, then
  applies it into an ordinary prepared snapshot): the reference layer is a few hundred bytes
  holding ``/.casfs-ref.json``; at ``Commit`` the snapshotter finds that file alone in the
  snapshot and mounts the image it names. An ordinary layer never has it: ordinary images
  get ordinary overlay snapshots.

An image's mount is made when its snapshot is committed and again whenever a child needs it
and it is gone (after a reboot); mount daemons outlive the snapshotter, so a restarted
snapshotter finds its mounts where it left them. ``Remove`` unmounts and deletes at once;
``Cleanup`` removes directories (and mounts) that no snapshot owns.

Stores: an image is read from the store its reference names (``oci://...`` of the registry
it was pushed to), unless the snapshotter was given one ``store`` for everything (a zone's
mirror, or a local store). Local paths and ``file://`` stores named by an image are refused
(an image must not make the snapshotter read arbitrary host directories).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass

from ..errors import CasfsError
from ..oci.publish import LABEL_IMAGE, LABEL_STORE, REF_FILE, parse_reference
from .metadata import ACTIVE, COMMITTED, VIEW, Metadata, Snapshot

__all__ = ["AlreadyExists", "FailedPrecondition", "InvalidArgument", "Mount", "NotFound", "REF_LABEL",
           "Snapshotter", "SnapshotterError"]

log = logging.getLogger("casfs.snapshotter")

REF_LABEL = "containerd.io/snapshot.ref"
REMOTE_SCHEMES = ("oci://", "http://", "https://", "s3://")


class SnapshotterError(CasfsError):
    """Base of the errors the gRPC service maps to status codes."""


class NotFound(SnapshotterError):
    pass


class AlreadyExists(SnapshotterError):
    pass


class FailedPrecondition(SnapshotterError):
    pass


class InvalidArgument(SnapshotterError):
    pass


@dataclass(frozen=True)
class Mount:
    """One mount for containerd to perform (``containerd.types.Mount``)."""

    type: str
    source: str
    options: tuple[str, ...]


class Snapshotter:
    """containerd snapshots under ``root``. Thread-safe.

    Args:
        root: the snapshotter's directory (created).
        store: read every casfs image from this store URL instead of the one its reference
            names.
        cache_dir: the ssd cache tier for image reads (default ``<root>/cache``; "" for none).
        mount_options: keyword options for ``casfs.mount`` (``read_ahead_kb``...).
        mounter: a ``casfs.containerd.mounter.Mounter`` that makes the mounts from a warm
            single-threaded helper (None: this process mounts, through casfs.mount's spawn).
    """

    def __init__(self, root: str, *, store: str | None = None, cache_dir: str | None = None,
                 mount_options: dict | None = None, mounter=None) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(os.path.join(self.root, "snapshots"), exist_ok=True)
        self.meta = Metadata(os.path.join(self.root, "metadata.db"))
        self.store_override = store
        self.cache_dir = os.path.join(self.root, "cache") if cache_dir is None else cache_dir
        self.mount_options = {"allow_other": True, **(mount_options or {})}
        self.mounter = mounter
        self._stores: dict[str, object] = {}
        self._lock = threading.RLock()  # one change at a time (RPCs are short; mounts are lazy)

    def close(self) -> None:
        """Close the stores and the database (mounts stay: they outlive the snapshotter)."""
        with self._lock:
            for s in self._stores.values():
                s.close()  # type: ignore[attr-defined]
            self._stores.clear()
            self.meta.close()

    # -- paths and mounts ------------------------------------------------------------------

    def _dir(self, sid: int) -> str:
        return os.path.join(self.root, "snapshots", str(sid))

    def _lower(self, s: Snapshot) -> str:
        if s.is_casfs:
            self._ensure_mounted(s)
            return os.path.join(self._dir(s.id), "casfs")
        return os.path.join(self._dir(s.id), "fs")

    def _chain(self, parent: str) -> list[Snapshot]:
        out = []
        seen = set()
        while parent:
            p = self.meta.get(parent)
            if p is None:
                raise NotFound(f"parent snapshot {parent!r} does not exist")
            if p.key in seen:
                raise FailedPrecondition(f"snapshot {parent!r} is its own ancestor")
            seen.add(p.key)
            out.append(p)
            parent = p.parent
        return out

    def mounts_of(self, s: Snapshot) -> list[Mount]:
        """The mounts that make snapshot ``s`` (active or view)."""
        if s.kind == COMMITTED:
            raise FailedPrecondition(f"snapshot {s.key!r} is committed: prepare or view a child of it")
        lowers = [self._lower(p) for p in self._chain(s.parent)]
        d = self._dir(s.id)
        if s.kind == ACTIVE:
            if not lowers:
                return [Mount("bind", os.path.join(d, "fs"), ("rw", "rbind"))]
            return [Mount("overlay", "overlay", ("index=off", f"workdir={d}/work", f"upperdir={d}/fs",
                                                 "lowerdir=" + ":".join(lowers)))]
        if not lowers:
            return [Mount("bind", os.path.join(d, "fs"), ("ro", "rbind"))]
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        return [Mount("overlay", "overlay", ("index=off", "lowerdir=" + ":".join(lowers)))]

    # -- casfs images ----------------------------------------------------------------------

    def _store_url(self, named: str) -> str:
        if self.store_override:
            return self.store_override
        if not named.startswith(REMOTE_SCHEMES):
            raise InvalidArgument(f"image names store {named!r}: only remote stores "
                                  f"({', '.join(REMOTE_SCHEMES)}) are read unless the snapshotter "
                                  "is started with --store")
        return named

    def _open_store(self, url: str):
        import casfs

        with self._lock:
            store = self._stores.get(url)
            if store is None:
                store = self._stores[url] = casfs.open_store(url, cache_dir=self.cache_dir)
            return store

    def _ensure_mounted(self, s: Snapshot) -> None:
        """Mount casfs snapshot ``s`` unless it is mounted.

        Raises:
            FailedPrecondition: when the image cannot be mounted (the message says why).
        """
        import casfs

        mp = os.path.join(self._dir(s.id), "casfs")
        if casfs.is_mounted(mp):
            return
        os.makedirs(mp, exist_ok=True)
        try:
            if self.mounter is not None:
                from .mounter import MounterGone

                try:
                    self.mounter.mount(s.image, s.store, self.cache_dir, mp, self.mount_options)
                    log.info("mounted casfs image %s from %s at %s", s.image[:12], s.store, mp)
                    return
                except MounterGone as e:
                    log.warning("%s: mounting from the snapshotter itself", e)
                    self.mounter = None
            image = self._open_store(s.store).open_image(s.image)
            casfs.mount(image, mp, casfs.MountOptions(**self.mount_options))
        except CasfsError as e:
            raise FailedPrecondition(f"cannot mount casfs image {s.image[:12]} from {s.store}: {e}") from None
        log.info("mounted casfs image %s from %s at %s", s.image[:12], s.store, mp)

    def _unmount(self, sid: int) -> None:
        import casfs

        mp = os.path.join(self._dir(sid), "casfs")
        if not os.path.isdir(mp) or not casfs.is_mounted(mp):
            return
        try:
            casfs.unmount(mp)
        except CasfsError as e:
            log.warning("unmounting %s: %s; detaching it", mp, e)
            subprocess.run(["umount", "-l", mp], capture_output=True)

    def _reference(self, fs: str) -> tuple[str, str] | None:
        """(image, store) when snapshot dir ``fs`` holds a casfs reference layer and nothing else."""
        try:
            names = os.listdir(fs)
        except OSError:
            return None
        if names != [REF_FILE]:
            return None
        path = os.path.join(fs, REF_FILE)
        if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > 65536:
            return None
        with open(path, "rb") as f:
            data = f.read()
        try:
            return parse_reference(data)
        except ValueError as e:
            log.warning("%s looks like a casfs reference but is not one (%s): an ordinary layer", path, e)
            return None

    # -- the snapshot operations -----------------------------------------------------------

    def _new(self, key: str, parent: str, kind: int, labels: dict[str, str], *, image: str = "",
             store: str = "") -> Snapshot:
        sid = self.meta.next_id()
        d = self._dir(sid)
        shutil.rmtree(d, ignore_errors=True)
        for sub in ("fs", "work"):
            os.makedirs(os.path.join(d, sub), mode=0o755)
        return self.meta.insert(key, parent, kind, labels, sid=sid, image=image, store=store)

    def prepare(self, key: str, parent: str, labels: dict[str, str], *, view: bool = False) -> list[Mount]:
        """Create active (or view) snapshot ``key`` on ``parent``; return its mounts.

        With the labels of a casfs reference layer (``containerd.io/snapshot.ref`` and
        ``containerd.io/snapshot/casfs.image-id``) the image is mounted and committed as the
        ref, and AlreadyExists raised: containerd then skips the layer.

        Raises:
            AlreadyExists, NotFound (parent), InvalidArgument (parent not committed),
            FailedPrecondition.
        """
        if not key:
            raise InvalidArgument("empty snapshot key")
        with self._lock:
            if self.meta.get(key) is not None:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            if parent:
                p = self.meta.get(parent)
                if p is None:
                    raise NotFound(f"parent snapshot {parent!r} does not exist")
                if p.kind != COMMITTED:
                    raise InvalidArgument(f"parent snapshot {parent!r} is not committed")
            target, image = labels.get(REF_LABEL), labels.get(LABEL_IMAGE)
            if target and image and not view:
                self._prepare_remote(target, parent, image, labels)  # raises AlreadyExists
            s = self._new(key, parent, VIEW if view else ACTIVE, labels)
            try:
                return self.mounts_of(s)
            except SnapshotterError:
                self._remove(s)
                raise

    def _prepare_remote(self, target: str, parent: str, image: str, labels: dict[str, str]) -> None:
        existing = self.meta.get(target)
        if existing is not None:
            if existing.kind == COMMITTED:
                raise AlreadyExists(f"target snapshot {target!r} already exists")
            return  # the name is taken by an active snapshot: let containerd unpack as usual
        try:
            store = self._store_url(labels.get(LABEL_STORE, ""))
            if not re.fullmatch(r"[0-9a-f]{64}", image):
                raise ValueError("not a casfs image id")
        except (SnapshotterError, ValueError) as e:
            log.warning("layer for %s names casfs image %r but cannot use it (%s): pulling it instead",
                        target, image, e)
            return
        s = self._new(target, parent, COMMITTED, dict(labels), image=image, store=store)
        try:
            self._ensure_mounted(s)
        except FailedPrecondition as e:
            log.warning("%s; pulling the layer instead", e)
            self._remove(s)
            return
        raise AlreadyExists(f"target snapshot {target!r} already exists (casfs image {image[:12]})")

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of active or view snapshot ``key``. Raises NotFound, FailedPrecondition."""
        with self._lock:
            s = self.meta.get(key)
            if s is None:
                raise NotFound(f"snapshot {key!r} does not exist")
            return self.mounts_of(s)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        """Commit active snapshot ``key`` as ``name``. A snapshot holding only a casfs reference
        becomes a casfs snapshot (its image mounted now).

        Raises:
            NotFound, AlreadyExists (name taken), FailedPrecondition (not active, or the image
            it names cannot be mounted).
        """
        with self._lock:
            s = self.meta.get(key)
            if s is None:
                raise NotFound(f"snapshot {key!r} does not exist")
            if s.kind != ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active")
            if self.meta.get(name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            merged = {**s.labels, **labels}
            ref = self._reference(os.path.join(self._dir(s.id), "fs"))
            if ref is None:
                return self.meta.commit(key, name, merged)
            image, named = ref
            try:
                store = self._store_url(named)
            except InvalidArgument as e:
                raise FailedPrecondition(str(e)) from None
            merged[LABEL_IMAGE] = image
            candidate = Snapshot(s.id, name, s.parent, COMMITTED, merged, image=image, store=store)
            self._ensure_mounted(candidate)  # raises FailedPrecondition: nothing changed yet
            return self.meta.commit(key, name, merged, image=image, store=store)

    def stat(self, key: str) -> Snapshot:
        s = self.meta.get(key)
        if s is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return s

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """Set snapshot ``key``'s labels: all of them (``paths`` empty or ``["labels"]``) or
        those named ``labels.<name>`` (absent from ``labels``: removed).

        Raises:
            NotFound, InvalidArgument (a path other than labels).
        """
        with self._lock:
            s = self.stat(key)
            if not paths or "labels" in paths:
                new = dict(labels)
            else:
                new = dict(s.labels)
                for p in paths:
                    if not p.startswith("labels."):
                        raise InvalidArgument(f"cannot update {p!r}: only labels are mutable")
                    name = p[len("labels."):]
                    if name in labels:
                        new[name] = labels[name]
                    else:
                        new.pop(name, None)
            return self.meta.update_labels(key, new)

    def list(self) -> list[Snapshot]:
        return list(self.meta.all())

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes) used by snapshot ``key``'s own files (a casfs image's are remote)."""
        s = self.stat(key)
        size = inodes = 0
        for dirpath, dirs, files in os.walk(os.path.join(self._dir(s.id), "fs")):
            for name in dirs + files:
                inodes += 1
                try:
                    size += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
                except OSError:
                    pass
        return size, inodes

    def remove(self, key: str) -> None:
        """Remove snapshot ``key``: unmount its image, delete its files.

        Raises:
            NotFound, FailedPrecondition (it has children).
        """
        with self._lock:
            s = self.stat(key)
            kids = self.meta.children(key)
            if kids:
                raise FailedPrecondition(f"snapshot {key!r} has children ({', '.join(kids[:3])})")
            self._remove(s)

    def _remove(self, s: Snapshot) -> None:
        self.meta.delete(s.key)
        self._unmount(s.id)
        shutil.rmtree(self._dir(s.id), ignore_errors=True)

    def cleanup(self) -> list[str]:
        """Remove the directories (unmounting their images) that no snapshot owns; returns them."""
        with self._lock:
            owned = {str(s.id) for s in self.meta.all()}
            base = os.path.join(self.root, "snapshots")
            gone = []
            for name in sorted(os.listdir(base)):
                if name in owned:
                    continue
                if name.isdigit():
                    self._unmount(int(name))
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
                gone.append(os.path.join(base, name))
            return gone

    def remount_all(self) -> int:
        """Mount every casfs snapshot whose mount is gone (after a reboot); returns how many.
        Failures are logged, not raised: a child's ``Prepare`` tries again."""
        n = 0
        for s in self.meta.all():
            if s.is_casfs:
                try:
                    import casfs

                    if not casfs.is_mounted(os.path.join(self._dir(s.id), "casfs")):
                        self._ensure_mounted(s)
                        n += 1
                except SnapshotterError as e:
                    log.warning("%s", e)
        return n
