"""A casfs image as a runnable OCI image for containerd: config + one small *reference layer*.

The reference layer is a gzip'd tar holding one file, ``/.casfs-ref.json``
(``{"casfs": 1, "image": "<id>", "store": "<url>"}``): a few hundred bytes. Its descriptor
carries the same facts as annotations under ``containerd.io/snapshot/``, the prefix containerd
hands to a snapshotter as labels when it unpacks through its pull-and-unpack path (CRI,
nerdctl, the Go client's ``WithPullUnpack``): the casfs snapshotter then answers ``Prepare``
with "already exists" and nothing is downloaded. Clients that fetch and apply every layer
(``ctr image pull`` in containerd 1.6) download the reference layer and apply it into a plain
directory; the snapshotter finds the file when that snapshot is committed and swaps in a lazy
casfs mount. Either way the container's root is the casfs image, read lazily.

Under any other snapshotter the image unpacks to a root that holds only that file: it runs
only with the casfs snapshotter (the ``org.casfs.image-id`` label says so).
"""

from __future__ import annotations

import gzip
import io
import json
import platform as _platform
import tarfile
from dataclasses import dataclass, field

from .registry import Registry, sha256_digest

__all__ = ["ImageConfig", "REF_FILE", "LABEL_IMAGE", "LABEL_STORE", "reference_layer", "runnable_manifest",
           "parse_reference"]

REF_FILE = ".casfs-ref.json"
LABEL_IMAGE = "containerd.io/snapshot/casfs.image-id"
LABEL_STORE = "containerd.io/snapshot/casfs.store"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def host_arch() -> str:
    """The OCI architecture name of this machine (``amd64``, ``arm64``)."""
    m = _platform.machine().lower()
    return _ARCH.get(m, m)


@dataclass
class ImageConfig:
    """What the runnable image's config says (OCI image config ``config`` fields).

    Attributes:
        cmd: default command (``ctr run REF ID`` without a command runs it).
        entrypoint: entrypoint prepended to the command.
        env: environment, ``KEY=VALUE`` strings (PATH defaults to the usual system path).
        workdir: working directory.
        arch, os: the platform the image is published for (default: this machine's).
    """

    cmd: list[str] = field(default_factory=lambda: ["/bin/sh"])
    entrypoint: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=lambda: [f"PATH={DEFAULT_PATH}"])
    workdir: str = "/"
    arch: str = field(default_factory=host_arch)
    os: str = "linux"


def reference_layer(image_id: str, store_url: str) -> tuple[bytes, str]:
    """The reference layer (gzip'd tar, byte-identical for the same inputs) and its diff id
    (sha256 of the uncompressed tar)."""
    payload = json.dumps({"casfs": 1, "image": image_id, "store": store_url},
                         separators=(",", ":")).encode() + b"\n"
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(REF_FILE)
        info.size = len(payload)
        info.mode = 0o644
        info.mtime = 0
        info.uname = info.gname = "root"
        tar.addfile(info, io.BytesIO(payload))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha256_digest(tar_bytes)


def parse_reference(data: bytes) -> tuple[str, str]:
    """(image id, store URL) from the bytes of a ``/.casfs-ref.json``.

    Raises:
        ValueError: when they are not a casfs reference.
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("not a casfs reference (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("casfs") != 1:
        raise ValueError("not a casfs reference")
    image, store = doc.get("image"), doc.get("store")
    if not isinstance(image, str) or len(image) != 64 or any(c not in "0123456789abcdef" for c in image):
        raise ValueError("casfs reference without a valid image id")
    if not isinstance(store, str) or not store or len(store) > 4096:
        raise ValueError("casfs reference without a store URL")
    return image, store


def runnable_manifest(registry: Registry, image_id: str, store_url: str,
                      config: ImageConfig | None = None) -> dict:
    """Push the config, the reference layer and the manifest of a runnable image of casfs
    image ``image_id`` to ``registry``; return the manifest's descriptor (with its platform),
    for an image index.

    Raises:
        StoreError: when the registry refuses an upload.
    """
    cfg = config or ImageConfig()
    layer, diff_id = reference_layer(image_id, store_url)
    layer_digest = registry.push_blob(layer)
    conf = {
        "architecture": cfg.arch,
        "os": cfg.os,
        "config": {"Env": list(cfg.env), "Cmd": list(cfg.cmd), "WorkingDir": cfg.workdir,
                   "Labels": {"org.casfs.image-id": image_id, "org.casfs.store": store_url}}
        | ({"Entrypoint": list(cfg.entrypoint)} if cfg.entrypoint else {}),
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": f"casfs: lazy reference to casfs image {image_id}"}],
    }
    conf_bytes = json.dumps(conf, separators=(",", ":"), sort_keys=True).encode()
    conf_digest = registry.push_blob(conf_bytes)
    annotations = {LABEL_IMAGE: image_id, LABEL_STORE: store_url, "org.casfs.image-id": image_id}
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": conf_digest, "size": len(conf_bytes)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": layer_digest, "size": len(layer),
                    "annotations": annotations}],
        "annotations": {"org.casfs.image-id": image_id, "org.casfs.store": store_url},
    }
    body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    digest = registry.put_manifest(sha256_digest(body), body, MANIFEST_TYPE)
    return {"mediaType": MANIFEST_TYPE, "digest": digest, "size": len(body),
            "platform": {"architecture": cfg.arch, "os": cfg.os}}
