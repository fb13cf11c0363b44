"""Building images from OCI image layouts written by the real ``skopeo`` (from a docker-save tar)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess

import pytest
from test_build_tar import (assert_layered_image, layer1, member, tar_bytes, write_docker_save,
                            write_layered_docker_save)

import casfs
from casfs.build.oci import OciSource

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed (it writes the OCI layouts)")


def skopeo_copy(archive: str, layout: str, *, ref: str | None = None, flags: tuple[str, ...] = ()) -> str:
    dest = f"oci:{layout}" + (f":{ref}" if ref else "")
    subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", *flags, f"docker-archive:{archive}", dest],
                   check=True, capture_output=True)
    return layout


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def put_blob(layout: str, doc: dict) -> dict:
    """Store ``doc`` as a JSON blob of ``layout``; return its descriptor (without mediaType)."""
    data = json.dumps(doc).encode()
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def manifest_of(layout: str, i: int = 0) -> tuple[dict, dict]:
    desc = load(os.path.join(layout, "index.json"))["manifests"][i]
    return desc, load(os.path.join(layout, "blobs", *desc["digest"].split(":")))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_layered_docker_save(tmp_path_factory.mktemp("oci") / "img.tar")


LAYER = "application/vnd.oci.image.layer.v1.tar"


def decompress_layers(layout: str) -> str:
    """Rewrite the layout's image with uncompressed (``tar``) layers: skopeo 1.9 always
    compresses layers for ``oci:`` (``--dest-oci-accept-uncompressed-layers`` did not stop it)."""
    desc, manifest = manifest_of(layout)
    for layer in manifest["layers"]:
        with open(os.path.join(layout, "blobs", *layer["digest"].split(":")), "rb") as f:
            data = gzip.decompress(f.read())
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
            f.write(data)
        layer.update(mediaType=LAYER, digest=f"sha256:{digest}", size=len(data))
    new = {"mediaType": desc["mediaType"], **put_blob(layout, manifest)}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [new]}, f)
    return layout


@pytest.mark.parametrize("flags,media_types", [
    ((), [LAYER + "+gzip"] * 3),
    (("--dest-compress", "--dest-compress-format", "zstd"), [LAYER + "+zstd"] * 3),
    (None, [LAYER] * 3),
])
def test_an_oci_layout_builds_the_same_image_as_its_docker_save_archive(store, tmp_path, archive, flags, media_types):
    layout = str(tmp_path / "layout")
    if flags is None:
        decompress_layers(skopeo_copy(archive, layout))
    else:
        skopeo_copy(archive, layout, flags=flags)
    _, manifest = manifest_of(layout)
    assert [layer["mediaType"] for layer in manifest["layers"]] == media_types
    from_oci = casfs.build(store, layout, tag="oci")
    assert_layered_image(store.open_image("oci"))
    assert casfs.build(store, archive).image_id == from_oci.image_id


@pytest.fixture
def two_images(tmp_path, archive):
    """A layout holding the layered image as ref 'big' and a one-file image as ref 'small'."""
    small = str(tmp_path / "small.tar")
    write_docker_save(small, [tar_bytes([member("only", b"small")])])
    layout = str(tmp_path / "two")
    skopeo_copy(archive, layout, ref="big")
    skopeo_copy(small, layout, ref="small")
    return layout


def test_a_layout_with_several_images_needs_a_ref_name(store, two_images):
    with pytest.raises(casfs.BuildError, match=r"lists 2 manifests.*big .*small"):
        casfs.build(store, two_images)
    casfs.build(store, OciSource(two_images, ref="small"), tag="s")
    assert store.open_image("s").listdir("") == ["only"]
    with pytest.raises(casfs.BuildError, match="no manifest named 'medium' .*big, small"):
        casfs.build(store, OciSource(two_images, ref="medium"))


def test_an_image_index_is_resolved_to_the_linux_amd64_manifest(store, two_images):
    big, _ = manifest_of(two_images, 0)
    small, _ = manifest_of(two_images, 1)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {**small, "annotations": {}, "platform": {"os": "linux", "architecture": "arm64"}},
        {**big, "annotations": {}, "platform": {"os": "linux", "architecture": "amd64"}},
    ]}
    desc = {"mediaType": index["mediaType"], **put_blob(two_images, index)}
    with open(os.path.join(two_images, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [desc]}, f)
    casfs.build(store, two_images, tag="amd64")
    assert_layered_image(store.open_image("amd64"))
    casfs.build(store, OciSource(two_images, platform="linux/arm64"), tag="arm64")
    assert store.open_image("arm64").listdir("") == ["only"]


def _first_layer_path(layout: str) -> str:
    _, manifest = manifest_of(layout)
    return os.path.join(layout, "blobs", *manifest["layers"][0]["digest"].split(":"))


def test_a_tampered_layer_blob_fails_digest_verification(store, tmp_path, archive):
    layout = decompress_layers(skopeo_copy(archive, str(tmp_path / "l")))
    blob = _first_layer_path(layout)
    with open(blob, "r+b") as f:  # same size, one byte of file content changed
        data = f.read()
        at = data.index(b"127.0.0.1 localhost")
        f.seek(at)
        f.write(b"6")
    with pytest.raises(casfs.BuildError, match="layer 1 blob sha256:[0-9a-f]{64} fails verification: its content hashes to sha256:"):
        casfs.build(store, layout, tag="bad")
    assert "bad" not in store.tags()


def test_a_truncated_layer_blob_is_refused_on_its_size(store, tmp_path, archive):
    layout = skopeo_copy(archive, str(tmp_path / "l"))
    blob = _first_layer_path(layout)
    with open(blob, "r+b") as f:
        f.truncate(10)
    with pytest.raises(casfs.BuildError, match="is 10 bytes, its descriptor says"):
        casfs.build(store, layout)


def test_a_missing_layer_blob_is_refused(store, tmp_path, archive):
    layout = skopeo_copy(archive, str(tmp_path / "l"))
    os.unlink(_first_layer_path(layout))
    with pytest.raises(casfs.BuildError, match="layer 1 blob sha256:[0-9a-f]+ is missing"):
        casfs.build(store, layout)


@pytest.mark.parametrize("digest", ["sha256:../../../etc/passwd", "sha256:ABC", "md5:d41d8cd98f00b204e9800998ecf8427e"])
def test_a_digest_that_is_not_a_plain_hash_is_refused_before_any_file_is_opened(store, tmp_path, digest):
    layout = tmp_path / "evil"
    os.makedirs(layout / "blobs" / "sha256")
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": 10}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    with pytest.raises(casfs.BuildError, match="malformed or unsupported digest"):
        casfs.build(store, str(layout))


def test_a_layer_of_an_unknown_media_type_is_refused(store, tmp_path):
    layout = str(tmp_path / "l")
    src = str(tmp_path / "one.tar")
    write_docker_save(src, [layer1()])
    skopeo_copy(src, layout)
    desc, manifest = manifest_of(layout)
    manifest["layers"][0]["mediaType"] = "application/vnd.example.squashfs"
    new = {"mediaType": desc["mediaType"], **put_blob(layout, manifest)}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [new]}, f)
    with pytest.raises(casfs.BuildError, match="media type 'application/vnd.example.squashfs', not a tar layer"):
        casfs.build(store, layout)


def test_an_oci_layout_keeps_nanosecond_mtimes_like_the_tree_it_was_made_from(store, tmp_path):
    from test_build_tar import gnu_pax_tar, nanosecond_tree

    src = nanosecond_tree(tmp_path / "src")
    layer = gnu_pax_tar(src, tmp_path / "layer.tar")
    write_docker_save(str(tmp_path / "img.tar"), [layer])
    layout = skopeo_copy(str(tmp_path / "img.tar"), str(tmp_path / "layout"))
    from_oci = casfs.build(store, layout, progress=False)
    assert store.open_image(from_oci.image_id).stat("l").mtime_ns == 1_700_000_000_987_654_321
    assert from_oci.image_id == casfs.build(store, src, progress=False).image_id
