"""Build source: an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``).

This is what ``skopeo copy docker-archive:x.tar oci:dir`` or ``docker buildx --output
type=oci`` write. ``index.json`` leads to one image manifest: the only one, the one whose
``org.opencontainers.image.ref.name`` annotation is ``ref`` when given, or (through an image
index, nested at most 4 deep) the one for the requested platform (default linux/amd64). Its
layers (media types ``tar``, ``tar+gzip``, ``tar+zstd``, OCI or Docker flavoured) are applied in
order with whiteouts, by the same rules as a ``docker save`` archive (:mod:`casfs.build.tar`,
:mod:`casfs.build.tree`).

Every blob used (index, manifest, layers) is checked against its descriptor before it is
used: the digest must be ``sha256:<64 hex>`` or ``sha512:<128 hex>`` (so it cannot name a path
outside ``blobs/``), the size must match, and the content must hash to the digest. Layer blobs
are read once to verify and then again to list and read members; the verified file handle is
the one read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat as statmod
from typing import BinaryIO, Iterator

from ..errors import BuildError
from .source import SourceEntry
from .tar import apply_members, open_tar, read_members
from .tree import MAX_LAYERS, Tree, close_all

MAX_JSON_BYTES = 16 << 20
MAX_INDEX_DEPTH = 4
_DIGEST = re.compile(r"(sha256):([0-9a-f]{64})|(sha512):([0-9a-f]{128})")
_INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json"}
_MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json"}
_LAYER_TYPES = {
    f"application/vnd.oci.image.layer.{kind}v1.tar{comp}"
    for kind in ("", "nondistributable.") for comp in ("", "+gzip", "+zstd")
} | {"application/vnd.docker.image.rootfs.diff.tar.gzip",
     "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
     "application/vnd.docker.image.rootfs.diff.tar.zstd"}
_REF_KEYS = ("org.opencontainers.image.ref.name", "io.containerd.image.name")


class OciSource:
    """An OCI image layout as a build source.

    Args:
        path: the layout directory (it holds the ``oci-layout`` file).
        ref: pick the manifest whose ref-name annotation equals this (``skopeo copy ... oci:dir:ref``).
        platform: ``os/architecture`` wanted from an image index.

    Raises:
        BuildError: when ``path`` is not an OCI layout (at once), or, from :meth:`entries`, when
            a blob is missing, fails verification, or the image is ambiguous or hostile.
    """

    def __init__(self, path: str, ref: str | None = None, platform: str = "linux/amd64") -> None:
        self.root = os.path.abspath(path)
        if not os.path.isfile(os.path.join(self.root, "oci-layout")):
            raise BuildError(f"{path}: not an OCI image layout (no oci-layout file)")
        self.description = f"OCI layout {self.root}"
        self.ref = ref
        self.platform = platform
        self._keep: list = []

    # -- JSON documents -----------------------------------------------------------------------

    def _read_json_file(self, name: str) -> dict:
        p = os.path.join(self.root, name)
        try:
            with open(p, "rb") as f:
                data = f.read(MAX_JSON_BYTES + 1)
        except OSError as e:
            raise BuildError(f"{self.description}: cannot read {name}: {e.strerror}") from None
        return self._parse_json(data, name)

    def _parse_json(self, data: bytes, what: str) -> dict:
        if len(data) > MAX_JSON_BYTES:
            raise BuildError(f"{self.description}: {what} is over {MAX_JSON_BYTES} bytes")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise BuildError(f"{self.description}: {what} is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise BuildError(f"{self.description}: {what} is not a JSON object")
        return doc

    # -- blobs --------------------------------------------------------------------------------

    def _open_blob(self, desc: object, what: str, max_size: int | None = None) -> BinaryIO:
        """Open the blob ``desc`` names, after checking its size and digest.

        Raises:
            BuildError: on a malformed descriptor or digest, a missing blob, or a mismatch.
        """
        if not isinstance(desc, dict):
            raise BuildError(f"{self.description}: {what}: a descriptor must be a JSON object")
        digest, size = desc.get("digest"), desc.get("size")
        m = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
        if m is None:
            raise BuildError(f"{self.description}: {what} has a malformed or unsupported digest "
                             f"{str(digest)[:100]!r} (want sha256:<64 lowercase hex>)")
        alg, hexd = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BuildError(f"{self.description}: {what} has no valid size in its descriptor")
        if max_size is not None and size > max_size:
            raise BuildError(f"{self.description}: {what} claims {size} bytes, over the {max_size}-byte limit")
        path = os.path.join(self.root, "blobs", alg, hexd)
        try:
            f = open(path, "rb")
        except OSError as e:
            raise BuildError(f"{self.description}: {what} blob {digest} is missing or unreadable "
                             f"({e.strerror}); the layout is incomplete") from None
        try:
            st = os.fstat(f.fileno())
            if not statmod.S_ISREG(st.st_mode):
                raise BuildError(f"{self.description}: {what} blob {digest} is not a regular file")
            if st.st_size != size:
                raise BuildError(f"{self.description}: {what} blob {digest} is {st.st_size} bytes, its "
                                 f"descriptor says {size}; the layout is corrupt or was tampered with")
            h = hashlib.new(alg)
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
            if h.hexdigest() != hexd:
                raise BuildError(f"{self.description}: {what} blob {digest} fails verification: its content "
                                 f"hashes to {alg}:{h.hexdigest()}; the layout is corrupt or was tampered with")
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

    def _json_blob(self, desc: object, what: str) -> dict:
        with self._open_blob(desc, what, MAX_JSON_BYTES) as f:
            return self._parse_json(f.read(), what)

    # -- choosing the manifest ----------------------------------------------------------------

    @staticmethod
    def _ref(desc: dict) -> str | None:
        ann = desc.get("annotations")
        if isinstance(ann, dict):
            for k in _REF_KEYS:
                if isinstance(ann.get(k), str):
                    return ann[k]
        return None

    def _platform(self, desc: dict) -> str | None:
        p = desc.get("platform")
        if isinstance(p, dict):
            return f"{p.get('os')}/{p.get('architecture')}"
        return None

    def _pick(self, index: dict, what: str, depth: int, use_ref: bool) -> dict:
        """The image manifest an index (index.json or a nested image index) leads to."""
        if depth > MAX_INDEX_DEPTH:
            raise BuildError(f"{self.description}: image indexes nest more than {MAX_INDEX_DEPTH} deep")
        cands = index.get("manifests")
        if not isinstance(cands, list) or not all(isinstance(d, dict) for d in cands):
            raise BuildError(f"{self.description}: {what} has no 'manifests' list")
        if use_ref and self.ref is not None:
            named = [d for d in cands if self._ref(d) == self.ref]
            if not named:
                refs = sorted({r for d in cands if (r := self._ref(d))})
                raise BuildError(f"{self.description}: no manifest named {self.ref!r} "
                                 f"(names here: {', '.join(refs) or 'none'})")
            cands = named
        if len(cands) > 1:
            fit = [d for d in cands if self._platform(d) == self.platform]
            if len(fit) != 1:
                names = sorted({f"{self._ref(d) or '-'} ({self._platform(d) or 'no platform'})" for d in cands})
                raise BuildError(f"{self.description}: {what} lists {len(cands)} manifests and "
                                 f"{len(fit)} match {self.platform}; pick one by ref name: {', '.join(names)}")
            cands = fit
        if not cands:
            raise BuildError(f"{self.description}: {what} lists no manifest")
        desc = cands[0]
        doc = self._json_blob(desc, f"manifest {desc.get('digest')}")
        if "manifests" in doc or desc.get("mediaType") in _INDEX_TYPES:
            return self._pick(doc, f"image index {desc.get('digest')}", depth + 1, False)
        mt = doc.get("mediaType", desc.get("mediaType"))
        if mt is not None and mt not in _MANIFEST_TYPES:
            raise BuildError(f"{self.description}: manifest {desc.get('digest')} has media type {mt!r}, "
                             "not an image manifest")
        return doc

    # -- the Source protocol ------------------------------------------------------------------

    def entries(self) -> Iterator[SourceEntry]:
        """Every entry of the image (directories first, then files in layer order).

        Raises:
            BuildError: see the class docstring.
        """
        layout = self._read_json_file("oci-layout")
        if not isinstance(layout.get("imageLayoutVersion"), str):
            raise BuildError(f"{self.description}: oci-layout has no imageLayoutVersion")
        manifest = self._pick(self._read_json_file("index.json"), "index.json", 0, True)
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise BuildError(f"{self.description}: the image manifest has no 'layers' list")
        if len(layers) > MAX_LAYERS:
            raise BuildError(f"{self.description}: {len(layers)} layers exceed the limit of {MAX_LAYERS}")
        tree = Tree(self.description)
        for i, desc in enumerate(layers, 1):
            what = f"layer {i}"
            mt = desc.get("mediaType") if isinstance(desc, dict) else None
            if mt not in _LAYER_TYPES:
                raise BuildError(f"{self.description}: {what} has media type {mt!r}, not a tar layer "
                                 "(tar, tar+gzip or tar+zstd)")
            f = self._open_blob(desc, what)
            self._keep.append(f)
            lwhere = f"{self.description}, {what} ({desc['digest']})"
            tf, size = open_tar(f, lwhere, desc["size"], self._keep)
            if tf is None:
                continue
            apply_members(tree, tf, read_members(tf, lwhere, size), lwhere, i, layer=True)
        yield from tree.entries()

    def close(self) -> None:
        """Close every blob and layer stream (content openers stop working)."""
        close_all(self._keep)
