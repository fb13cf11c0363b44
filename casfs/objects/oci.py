"""An OCI registry as a casfs store: ``oci://[user:password@]HOST[:PORT]/REPO[?insecure=1]``.

Every casfs object (index, pack, loose chunk, profile) is a blob of one registry repository,
stored byte for byte (the casfs frame), so reads are ranged blob GETs like those of the other
remote stores, behind the same tiers; a P2P proxy or pull-through cache in front of the
registry (Dragonfly, Spegel, Kraken, distribution's proxy mode) serves them like any layer.

**Names.** A registry names a blob by the sha256 of its bytes; casfs names objects by blake3
(of a chunk's uncompressed bytes, of a pack's bytes, of an index). Neither can be computed
from the other without the bytes, so the mapping casfs key -> registry digest is written into
the registry, as manifests, at two grains:

- per object: a small *pointer* manifest (config ``{}``, one layer: the object, its key in
  the ``org.casfs.key`` annotation) tagged ``_casfs.<kind>.<name>``. Any handle finds any
  object with one manifest GET, and ``list`` is the repository's tag list. casfs tags cannot
  start with ``_``, so these never collide with them;
- per image: casfs tag ``T`` is registry tag ``T``, an OCI image index (manifest list) whose
  annotations hold the tag's bytes (``org.casfs.tag-data``, base64) and which lists
  (1) a *catalog* manifest (platform ``unknown/unknown``, like BuildKit's attestation
  manifests, so container runtimes skip it) with one layer descriptor per object of the
  image, and (2) when the tag names an image, a runnable linux image for containerd
  (``casfs.oci.publish``), so ``ctr image pull HOST/REPO:T`` works with the casfs
  snapshotter. The catalog of image ``<id>`` is also tagged ``_casfs.catalog.<id>``, for
  images opened by id (what a mount daemon does). Opening an image therefore costs one or two
  manifest GETs for the whole mapping, not one per object: over a 100 ms link that is the
  difference that matters.

Why manifests rather than digests derived from content: nothing can be derived (sha256 vs
blake3); and a manifest is the registry's own way to say "these blobs belong together":
registry GC keeps them, replication and P2P tools move them, and ``skopeo``/``crane`` copy a
casfs image between registries like any other image.

**What a catalog lists.** The image objects (indexes, packs, chunks, profiles; not leases)
this store handle wrote or found (``put``, ``contains``, ``get``) since it was opened: for ``casfs copy`` that is exactly the image's
objects (the copy checks each one). Objects a catalog misses are still found through their
pointers, one GET each.

**Costs.** ``put``: HEAD blob, then (if absent) POST + PUT, then the pointer PUT (which
carries the write time: ``mtime``, so ``casfs gc`` keeps young objects here as elsewhere). ``get``/
``get_range`` of a mapped key: one blob GET. ``contains``/``size``: one HEAD (the mapping
could be stale: blobs can be deleted).

**Verification.** Whole-blob GETs are checked against their sha256 (a mismatch is retried,
then a StoreError); manifests fetched by digest likewise; ranged reads cannot be, and need not
be: every casfs frame carries its blake3 and the tiers verify it before anything is served.

Deletes need ``storage.delete.enabled`` on the registry; deleting an object removes its blob
link and its pointer (a catalog naming it then reads as missing). casfs tags must be registry
tags (letters, digits, ``_.-``: no ``:@+``). See ``casfs.oci.registry`` for the protocol
subset and auth (none or Basic; token auth is not supported yet).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from typing import Iterator
from urllib.parse import SplitResult, parse_qs, unquote

from ..errors import StoreError
from ..layout import DATA_KINDS, IMMUTABLE_KINDS, TAGS, check_key, index_key, kind_prefix, split_key
from ..oci.registry import TAG_RE, Registry, sha256_digest

__all__ = ["CATALOG_TYPE", "OBJECT_TYPE", "OciObjectStore", "catalog_tag", "from_url", "parse_catalog",
           "parse_tag_index", "pointer_tag"]

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
CATALOG_TYPE = "application/vnd.casfs.catalog.v1+json"
POINTER_TYPE = "application/vnd.casfs.pointer.v1+json"
OBJECT_TYPE = "application/vnd.casfs.object.v1"
EMPTY = b"{}"
ACCEPT = [INDEX_TYPE, MANIFEST_TYPE]

A_KEY = "org.casfs.key"
A_TAG = "org.casfs.tag"
A_TAG_DATA = "org.casfs.tag-data"
A_IMAGE = "org.casfs.image-id"
A_STORE = "org.casfs.store"
A_ROLE = "org.casfs.manifest"
A_CREATED = "org.casfs.created"  # a pointer's write time (seconds since the epoch): mtime, for gc
MAX_CATALOG = 1_000_000  # descriptors in one catalog we are willing to parse
MAX_CATALOG_BYTES = MAX_CATALOG * 256  # a catalog's manifest: descriptors of ~170-256 bytes each
INTERNAL = "_casfs."  # prefix of the registry tags casfs keeps for itself
_ID = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def catalog_tag(image_id: str) -> str:
    """The registry tag of image ``image_id``'s catalog."""
    return f"{INTERNAL}catalog.{image_id}"


def pointer_tag(key: str) -> str:
    """The registry tag of object ``key``'s pointer manifest.

    Raises:
        ValueError: for an invalid key. StoreError: for a key no registry tag can hold.
    """
    kind, name = split_key(key)
    tag = f"{INTERNAL}{kind}.{name}"
    if not TAG_RE.match(tag):
        raise StoreError(f"object {key!r} cannot be named in a registry (tags allow 128 of letters, "
                         "digits and _.-)")
    return tag


def from_url(url: str, parts: SplitResult) -> "OciObjectStore":
    """The store for ``oci://[user:pw@]host[:port]/repo[?insecure=1]`` (``casfs.objects``'s table).

    Raises:
        StoreError: for a URL without host or repository, or an unknown query parameter.
    """
    try:
        parts.port
    except ValueError:
        raise StoreError(f"{url}: invalid port") from None
    if not parts.hostname or not parts.path.strip("/"):
        raise StoreError(f"{url}: an OCI store URL looks like oci://host[:port]/repository")
    q = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(q) - {"insecure"}
    if unknown:
        raise StoreError(f"{url}: unknown parameter(s) {', '.join(sorted(unknown))} (known: insecure)")
    insecure = (q.get("insecure") or ["0"])[-1].lower() in ("", "1", "true", "yes")
    host = parts.netloc.rpartition("@")[2]
    return OciObjectStore(host, parts.path.strip("/"), insecure=insecure,
                          username=unquote(parts.username) if parts.username else None,
                          password=unquote(parts.password) if parts.password else None)


def _descriptors(doc: dict, what: str) -> dict[str, tuple[str, int]]:
    """key -> (digest, size) from the layers of a catalog or pointer manifest (untrusted)."""
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_CATALOG:
        raise StoreError(f"{what} is malformed (no layer list)")
    found: dict[str, tuple[str, int]] = {}
    for d in layers:
        try:
            key = check_key(d["annotations"][A_KEY])
            digest, size = d["digest"], d["size"]
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{what} has a malformed entry") from None
        if not isinstance(digest, str) or not _DIGEST.match(digest) or not isinstance(size, int) \
                or isinstance(size, bool) or size < 0 or key.startswith(kind_prefix(TAGS)):
            raise StoreError(f"{what} has a malformed entry")
        found[key] = (digest, size)
    return found


def _json_object(body: bytes, what: str) -> dict:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: hostile nesting
        raise StoreError(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{what} is not a JSON object")
    return doc


def parse_catalog(body: bytes, what: str = "catalog") -> dict[str, tuple[str, int]]:
    """The mapping key -> (registry digest, size) of a catalog or pointer manifest's bytes.

    Raises:
        StoreError: for anything but a manifest whose layers each name a valid casfs key
            (not a tag), a sha256 digest and a size.
    """
    return _descriptors(_json_object(body, what), what)


def parse_tag_index(body: bytes, what: str = "tag") -> tuple[bytes, list[str]] | None:
    """(the tag's bytes, the catalog manifests' digests) of a casfs tag's image index; None
    for a manifest that is not a casfs tag (another tool's image).

    Raises:
        StoreError: for a casfs tag whose data or catalog entries are malformed.
    """
    try:
        doc = _json_object(body, what)
    except StoreError:
        return None
    ann = doc.get("annotations")
    if not isinstance(ann, dict) or A_TAG_DATA not in ann:
        return None
    try:
        data = base64.b64decode(ann[A_TAG_DATA], validate=True)
    except (ValueError, TypeError):
        raise StoreError(f"{what} is corrupt (bad {A_TAG_DATA})") from None
    catalogs = []
    manifests = doc.get("manifests")
    for d in manifests if isinstance(manifests, list) else []:
        if isinstance(d, dict) and isinstance(d.get("annotations"), dict) \
                and d["annotations"].get(A_ROLE) == "catalog":
            digest = d.get("digest")
            if not isinstance(digest, str) or not _DIGEST.match(digest):
                raise StoreError(f"{what} names a malformed catalog digest")
            catalogs.append(digest)
    return data, catalogs


class OciObjectStore:
    """casfs objects as blobs of registry repository ``repo`` at ``host``. Thread-safe.

    Args:
        host: ``host[:port]`` of the registry.
        repo: the repository (``casfs/images``).
        insecure: plain http for a non-local host (local hosts always use http).
        username, password: Basic auth (default from ``CASFS_OCI_USERNAME``/``_PASSWORD``).
        registry_options: passed to ``casfs.oci.registry.Registry`` (timeout, attempts,
            backoff, chunk_threshold).

    Attributes:
        image_config: the ``casfs.oci.publish.ImageConfig`` of the runnable images written
            with tags (None: its defaults, ``/bin/sh`` on this machine's platform).

    Raises:
        StoreError: for a malformed host or repository.
    """

    read_only = False

    def __init__(self, host: str, repo: str, *, insecure: bool = False, username: str | None = None,
                 password: str | None = None, **registry_options) -> None:
        self.registry = Registry(host, repo, insecure=insecure, username=username, password=password,
                                 **registry_options)
        self.insecure = insecure
        self.url = f"oci://{host}/{repo}" + ("?insecure=1" if insecure else "")
        self.image_config = None
        self._map: dict[str, tuple[str, int]] = {}  # key -> (registry digest, size)
        self._touched: dict[str, None] = {}  # keys this handle wrote or found (ordered)
        self._catalogs: set[str] = set()  # catalog manifest digests merged into _map
        self._empty_pushed = False
        self._empty_lock = threading.Lock()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<OciObjectStore {self.url}>"

    def close(self) -> None:
        """Close idle connections (the store stays usable)."""
        self.registry.close()

    # -- the mapping -----------------------------------------------------------------------

    def _remember(self, key: str, digest: str, size: int) -> None:
        with self._lock:
            self._map[key] = (digest, size)
            if key.partition("/")[0] in DATA_KINDS:
                self._touched[key] = None

    def _touch(self, key: str) -> None:
        if key.partition("/")[0] in DATA_KINDS:  # leases and the like are no image's objects
            with self._lock:
                self._touched[key] = None

    def _merge_catalog(self, digest: str) -> None:
        """Load catalog manifest ``digest`` (verified against it) into the mapping, once."""
        with self._lock:
            if digest in self._catalogs:
                return
        m = self.registry.get_manifest(digest, [MANIFEST_TYPE], MAX_CATALOG_BYTES)
        if m is None:
            return
        self._merge(digest, parse_catalog(m.body, f"catalog {digest[:19]} in {self.url}"))

    def _merge(self, digest: str, found: dict[str, tuple[str, int]]) -> None:
        with self._lock:
            for key, v in found.items():
                self._map.setdefault(key, v)
            self._catalogs.add(digest)

    def _lookup(self, key: str) -> tuple[str, int] | None:
        with self._lock:
            return self._map.get(key)

    def _locate(self, key: str) -> tuple[str, int] | None:
        """(digest, size) of object ``key``: from the catalogs loaded, else its image's catalog
        (an index), else its pointer. None when the registry names no such object. Objects of
        mutable kinds (leases) are looked up through their pointer every time."""
        kind, name = split_key(key)
        hit = self._lookup(key) if kind in IMMUTABLE_KINDS else None
        if hit is not None:
            return hit
        if kind == "indexes" and _ID.match(name):
            m = self.registry.get_manifest(catalog_tag(name), [MANIFEST_TYPE], MAX_CATALOG_BYTES)  # one round trip
            if m is not None:
                self._merge(m.digest, parse_catalog(m.body, f"catalog {m.digest[:19]} in {self.url}"))
                hit = self._lookup(key)
                if hit is not None:
                    return hit
        m = self.registry.get_manifest(pointer_tag(key), [MANIFEST_TYPE])
        if m is None:
            return None
        found = parse_catalog(m.body, f"pointer of {key} in {self.url}").get(key)
        if found is None:
            raise StoreError(f"pointer of {key} in {self.url} names another object")
        with self._lock:
            self._map[key] = found
        return found

    # -- tags ------------------------------------------------------------------------------

    def _read_tag(self, tag: str) -> bytes | None:
        """The bytes of casfs tag ``tag`` (merging its catalog), None when absent or not casfs."""
        m = self.registry.get_manifest(tag, ACCEPT)
        if m is None:
            return None
        parsed = parse_tag_index(m.body, f"tag {tag!r} in {self.url}")
        if parsed is None:
            return None  # another tool's image, not a casfs tag
        data, catalogs = parsed
        for digest in catalogs:
            self._merge_catalog(digest)
        return data

    def _tag_name(self, key: str) -> str:
        name = split_key(key)[1]
        if not TAG_RE.match(name) or name.startswith(INTERNAL):
            raise StoreError(f"tag {name!r} cannot be a registry tag (use letters, digits and _.- "
                             "only, at most 128)")
        return name

    def _empty(self) -> dict:
        with self._empty_lock:
            if not self._empty_pushed:
                self.registry.push_blob(EMPTY)
                self._empty_pushed = True
        return {"mediaType": EMPTY_TYPE, "digest": sha256_digest(EMPTY), "size": len(EMPTY)}

    def _manifest(self, artifact: str, entries: list[tuple[str, tuple[str, int]]],
                  annotations: dict[str, str]) -> bytes:
        layers = [{"mediaType": OBJECT_TYPE, "digest": d, "size": size, "annotations": {A_KEY: k}}
                  for k, (d, size) in entries]
        doc = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "artifactType": artifact,
               "config": self._empty(), "layers": layers, "annotations": annotations}
        return json.dumps(doc, separators=(",", ":")).encode()

    def _push_catalog(self, image_id: str | None) -> dict:
        """Write a catalog of the objects this handle touched; returns its descriptor."""
        with self._lock:
            entries = sorted((k, self._map[k]) for k in self._touched if k in self._map)
        body = self._manifest(CATALOG_TYPE, entries,
                              {A_STORE: self.url} | ({A_IMAGE: image_id} if image_id else {}))
        ref = catalog_tag(image_id) if image_id else sha256_digest(body)
        digest = self.registry.put_manifest(ref, body, MANIFEST_TYPE)
        with self._lock:
            self._catalogs.add(digest)
        return {"mediaType": MANIFEST_TYPE, "digest": digest, "size": len(body),
                "platform": {"os": "unknown", "architecture": "unknown"},
                "annotations": {A_ROLE: "catalog"}}

    def _put_tag(self, tag: str, data: bytes) -> None:
        text = data.decode("ascii", "replace").strip()
        image_id = text if _ID.match(text) and self._lookup(index_key(text)) else None
        manifests = [self._push_catalog(image_id)]
        if image_id:
            from ..oci.publish import runnable_manifest

            manifests.insert(0, runnable_manifest(self.registry, image_id, self.url, self.image_config))
        doc = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": manifests,
               "annotations": {A_TAG: tag, A_TAG_DATA: base64.b64encode(data).decode(), A_STORE: self.url}
               | ({A_IMAGE: image_id} if image_id else {})}
        self.registry.put_manifest(tag, json.dumps(doc, separators=(",", ":")).encode(), INDEX_TYPE)

    # -- the ObjectStore protocol ----------------------------------------------------------

    def get(self, key: str) -> bytes:
        """The whole object (a blob, checked against its sha256).

        Raises:
            KeyError: missing. StoreError: on failure.
        """
        kind, _ = split_key(key)
        if kind == TAGS:
            data = self._read_tag(self._tag_name(key))
            if data is None:
                raise KeyError(key)
            return data
        hit = self._locate(key)
        if hit is None:
            raise KeyError(key)
        data = self.registry.get_blob(hit[0], hit[1])
        self._touch(key)
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end, b"" past it): one ranged GET.

        Raises:
            ValueError: negative range. KeyError: missing. StoreError: on failure.
        """
        if offset < 0 or length < 0:
            raise ValueError("negative range")
        kind, _ = split_key(key)
        if kind == TAGS:
            return self.get(key)[offset:offset + length]
        hit = self._locate(key)
        if hit is None:
            raise KeyError(key)
        digest, size = hit
        length = min(length, size - offset)
        if length <= 0:  # nothing to read (a range past the end upsets distribution 2.8)
            if self.registry.blob_size(digest) is None:
                raise KeyError(key)
            return b""
        return self.registry.get_blob_range(digest, offset, length)

    def put(self, key: str, data: bytes) -> None:
        """Upload object ``key`` (a blob, skipped when the registry has those bytes, and its
        pointer), or write tag ``tags/T`` (registry tag ``T``: an index naming the catalog and,
        for an image, a runnable manifest).

        Raises:
            ValueError: an invalid key. StoreError: on failure, or a name a registry cannot hold.
        """
        kind, _ = split_key(key)
        if kind == TAGS:
            self._put_tag(self._tag_name(key), bytes(data))
            return
        ptag = pointer_tag(key)
        digest = self.registry.push_blob(data)
        body = self._manifest(POINTER_TYPE, [(key, (digest, len(data)))], {A_CREATED: f"{time.time():.3f}"})
        self.registry.put_manifest(ptag, body, MANIFEST_TYPE)
        self._remember(key, digest, len(data))

    def contains(self, key: str) -> bool:
        """Whether ``key`` exists: it is mapped and the registry has its blob (HEAD)."""
        kind, _ = split_key(key)
        if kind == TAGS:
            return self._read_tag(self._tag_name(key)) is not None
        hit = self._locate(key)
        if hit is None or self.registry.blob_size(hit[0]) is None:
            return False
        self._touch(key)
        return True

    def delete(self, key: str) -> None:
        """Remove ``key``: a blob and its pointer, or a tag's index; a missing key is fine."""
        kind, _ = split_key(key)
        if kind == TAGS:
            tag = self._tag_name(key)
            digest = self.registry.manifest_digest(tag, ACCEPT)
            if digest is not None and self._read_tag(tag) is not None:
                self.registry.delete_manifest(digest)
            return
        hit = self._locate(key)
        if hit is not None:
            self.registry.delete_blob(hit[0])
        pointer = self.registry.manifest_digest(pointer_tag(key), [MANIFEST_TYPE])
        if pointer is not None:
            self.registry.delete_manifest(pointer)
        with self._lock:
            self._map.pop(key, None)
            self._touched.pop(key, None)

    def list(self, prefix: str) -> Iterator[str]:
        """Keys of one kind (``"tags/"``, ``"chunks/"`` ...), sorted, from the repository's
        tag list (casfs tags: those whose manifest is a casfs tag index)."""
        kind = prefix.rstrip("/")
        check_key(f"{kind}/x")
        tags = sorted(self.registry.tags())
        if kind == TAGS:
            for tag in tags:
                if not tag.startswith(INTERNAL) and self._read_tag(tag) is not None:
                    yield f"{TAGS}/{tag}"
            return
        head = f"{INTERNAL}{kind}."
        yield from sorted(f"{kind}/{t[len(head):]}" for t in tags if t.startswith(head))

    def mtime(self, key: str) -> float:
        """When object ``key`` was last written (seconds since the epoch, from its pointer), so
        that gc honours its grace period here too; 0.0 for a pointer without a time.

        Raises:
            KeyError: missing (tags have no time here either). StoreError: on failure.
        """
        if split_key(key)[0] == TAGS:
            raise KeyError(key)
        m = self.registry.get_manifest(pointer_tag(key), [MANIFEST_TYPE])
        if m is None:
            raise KeyError(key)
        ann = _json_object(m.body, f"pointer of {key} in {self.url}").get("annotations")
        try:
            return float(ann[A_CREATED]) if isinstance(ann, dict) and A_CREATED in ann else 0.0
        except (TypeError, ValueError):
            return 0.0

    def size(self, key: str) -> int:
        """Bytes in object ``key``. Raises KeyError if missing, StoreError on failure."""
        kind, _ = split_key(key)
        if kind == TAGS:
            return len(self.get(key))
        hit = self._locate(key)
        if hit is None or self.registry.blob_size(hit[0]) is None:
            raise KeyError(key)
        return hit[1]
