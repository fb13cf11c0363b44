"""The OCI registry store (``oci://``) against a real registry: Debian's ``docker-registry``
(distribution 2.8) on 127.0.0.1, started per module with its storage in a temp dir. Faults are
injected by a real TCP relay (``tests.support.FaultProxy``) or by corrupting the registry's
blob files on disk."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest

import casfs
from casfs.errors import ChunkUnavailable, CorruptChunk, StoreError
from casfs.objects import open_objects
from casfs.objects.oci import OciObjectStore, catalog_tag
from casfs.oci.registry import Registry, sha256_digest
from conftest import write_tree
from tests.support import FaultProxy, missing_binary
from tests.support.registry import REGISTRY, registry_server

pytestmark = pytest.mark.skipif(missing_binary(REGISTRY) is not None,
                                reason=f"{missing_binary(REGISTRY)} (apt-get install docker-registry)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def registry():
    with registry_server() as r:
        yield r


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An image built into a local store: (store dir, image id, files)."""
    root = tmp_path_factory.mktemp("oci")
    rng = random.Random(5)
    files = {f"pkg/m{i}.py": rng.randbytes(rng.randrange(0, 3000)) for i in range(50)}
    files["weights/model.bin"] = rng.randbytes(2_300_000)  # 3 loose chunks (2 of 1 MiB and the tail)
    files["empty"] = b""
    write_tree(str(root / "tree"), files)
    with casfs.open_store(str(root / "store")) as store:
        res = casfs.build(store, str(root / "tree"), tag="src", chunk_size=1 << 20)
    return str(root / "store"), res.image_id, files


def _url(registry, repo: str) -> str:
    return f"oci://{registry.host}/{repo}"


def _copy(built, url: str, tag: str = "web"):
    src_dir, image_id, _ = built
    with casfs.open_store(src_dir) as src, casfs.open_store(url, cache_dir="") as dst:
        from casfs.copy import copy_image

        return copy_image(src, dst, "src", tag=tag, progress=False)


def test_the_oci_scheme_opens_a_registry_store_with_http_for_loopback_and_https_elsewhere():
    s = open_objects("oci://127.0.0.1:5000/casfs/images")
    assert isinstance(s, OciObjectStore) and s.registry.scheme == "http"
    assert s.url == "oci://127.0.0.1:5000/casfs/images"
    remote = open_objects("oci://registry.example.com/team/img")
    assert remote.registry.scheme == "https" and remote.url == "oci://registry.example.com/team/img"
    insecure = open_objects("oci://registry.example.com:5000/team/img?insecure=1")
    assert insecure.registry.scheme == "http" and insecure.url.endswith("?insecure=1")
    assert open_objects(insecure.url).registry.scheme == "http"  # the URL round-trips


@pytest.mark.parametrize("url", ["oci://127.0.0.1:5000", "oci://127.0.0.1:5000/Upper/Case",
                                 "oci:///repo", "oci://h/repo?tls=0", "oci://h:99999/repo"])
def test_a_malformed_oci_url_is_one_clear_error(url):
    with pytest.raises(StoreError, match="oci|repository|registry|parameter|host|port"):
        open_objects(url)


def test_casfs_copy_publishes_an_image_that_a_fresh_store_reads_back_byte_exact(registry, built, tmp_path):
    _, image_id, files = built
    url = _url(registry, "casfs/copy")
    r = _copy(built, url)
    assert r.image_id == image_id and r.objects_copied == r.objects_total
    with casfs.open_store(url, cache_dir=str(tmp_path / "cache"), memory_bytes=0) as store:
        image = store.open_image("web")
        assert image.id == image_id
        for path, data in files.items():
            assert image.read(path, 0, len(data) + 10) == data
        assert store.blob.stats().hits > 0
    again = _copy(built, url)  # everything is there already: nothing moves
    assert again.objects_copied == 0 and again.bytes_copied == 0


def test_an_image_opened_by_id_gets_its_whole_mapping_from_one_catalog(registry, built, tmp_path):
    _, image_id, files = built
    url = _url(registry, "casfs/byid")
    _copy(built, url)
    objects = OciObjectStore(registry.host, "casfs/byid")
    store = casfs.Store(objects, memory_bytes=0)
    assert store.resolve(image_id) == image_id
    assert len(objects._catalogs) == 1 and len(objects._map) >= 4  # index, 2 chunks, packs
    image = store.open_image(image_id)
    assert image.read("weights/model.bin", 0, 100) == files["weights/model.bin"][:100]
    tags = Registry(registry.host, "casfs/byid").tags()
    assert catalog_tag(image_id) in tags and "web" in tags and "_casfs.indexes." + image_id in tags


def test_the_tag_is_an_image_index_with_a_catalog_and_a_runnable_manifest(registry, built):
    _, image_id, _ = built
    _copy(built, _url(registry, "casfs/layout"), tag="v1.0")
    reg = Registry(registry.host, "casfs/layout")
    index = reg.get_manifest("v1.0", ["application/vnd.oci.image.index.v1+json"]).json()
    assert index["annotations"]["org.casfs.image-id"] == image_id
    platforms = {(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]}
    assert ("unknown", "unknown") in platforms and ("linux", "amd64") in platforms
    catalog = next(m for m in index["manifests"] if m["platform"]["os"] == "unknown")
    doc = reg.get_manifest(catalog["digest"], ["application/vnd.oci.image.manifest.v1+json"]).json()
    keys = {layer["annotations"]["org.casfs.key"] for layer in doc["layers"]}
    assert f"indexes/{image_id}" in keys and any(k.startswith("packs/") for k in keys)
    assert sum(k.startswith("chunks/") for k in keys) == 3
    for layer in doc["layers"]:  # every object is a blob of the repository, byte for byte
        assert reg.blob_size(layer["digest"]) == layer["size"]


def test_ranged_reads_use_range_gets_and_whole_gets_are_checked_against_the_digest(registry):
    s = OciObjectStore(registry.host, "casfs/ranges")
    data = bytes(range(256)) * 40
    s.put("packs/" + "ab" * 32, data)
    assert s.get_range("packs/" + "ab" * 32, 100, 50) == data[100:150]
    assert s.get_range("packs/" + "ab" * 32, len(data) - 5, 50) == data[-5:]
    assert s.get_range("packs/" + "ab" * 32, len(data) + 5, 50) == b""
    assert s.get("packs/" + "ab" * 32) == data and s.size("packs/" + "ab" * 32) == len(data)


def test_a_blob_corrupted_in_the_registry_is_never_served(registry, built, tmp_path):
    _, image_id, files = built
    url = _url(registry, "casfs/corrupt")
    _copy(built, url)
    reg = Registry(registry.host, "casfs/corrupt")
    objects = OciObjectStore(registry.host, "casfs/corrupt")
    store = casfs.Store(objects, memory_bytes=0)
    image = store.open_image("web")
    chunk_keys = [k for k in objects._map if k.startswith("chunks/")]
    digest = objects._map[chunk_keys[0]][0]
    path = registry.blob_path(digest)
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(blob)
    try:
        with pytest.raises(StoreError, match="do not match the digest"):
            objects.get(chunk_keys[0])  # a whole-blob GET is checked against sha256
        model = files["weights/model.bin"]
        got_bad = 0
        for off in (0, 1 << 20):
            try:
                data = image.read("weights/model.bin", off, 1 << 20)
            except (CorruptChunk, ChunkUnavailable):
                got_bad += 1
                continue
            assert data == model[off:off + (1 << 20)]  # whatever is served is the truth
        assert got_bad == 1
    finally:
        blob[len(blob) // 2] ^= 0xFF
        with open(path, "wb") as f:
            f.write(blob)
    assert reg.get_blob(digest)


def test_tags_list_put_and_delete_through_the_registry(registry, built):
    _, image_id, _ = built
    url = _url(registry, "casfs/tags")
    _copy(built, url, tag="one")
    with casfs.open_store(url, cache_dir="") as store:
        store.tag("two", image_id)
        assert store.tags() == {"one": image_id, "two": image_id}
        store.untag("one")
        assert store.tags() == {"two": image_id}
        assert f"indexes/{image_id}" in list(store.objects.list("indexes/"))
        with pytest.raises(StoreError, match="registry tag"):
            store.tag("bad:name", image_id)


def test_objects_written_by_another_handle_are_found_through_their_pointers(registry):
    a = OciObjectStore(registry.host, "casfs/scan")
    a.put("chunks/" + "cd" * 32, b"frame bytes")
    a.put("tags/holder", b"not an image id\n")
    b = OciObjectStore(registry.host, "casfs/scan")
    assert b.contains("chunks/" + "cd" * 32) and b.get("chunks/" + "cd" * 32) == b"frame bytes"
    assert b.get("tags/holder") == b"not an image id\n"
    assert not b.contains("chunks/" + "ef" * 32)
    with pytest.raises(KeyError):
        b.get("chunks/" + "ef" * 32)
    assert list(b.list("chunks/")) == ["chunks/" + "cd" * 32] and list(b.list("tags/")) == ["tags/holder"]
    b.delete("chunks/" + "cd" * 32)
    assert not OciObjectStore(registry.host, "casfs/scan").contains("chunks/" + "cd" * 32)
    assert list(b.list("chunks/")) == []


def test_big_blobs_upload_in_chunked_patch_requests(registry):
    s = OciObjectStore(registry.host, "casfs/chunked", chunk_threshold=1 << 16)
    data = random.Random(1).randbytes((1 << 18) + 123)
    s.put("chunks/" + "12" * 32, data)
    assert s.registry.get_blob(sha256_digest(data)) == data


def test_5xx_replies_and_cut_connections_are_retried(registry):
    with FaultProxy(registry.port, http=True) as proxy:
        s = OciObjectStore(f"127.0.0.1:{proxy.port}", "casfs/faults", backoff=0.01)
        data = b"x" * 5000
        proxy.fail_next(2, status=503)
        s.put("chunks/" + "77" * 32, data)
        proxy.fail_next(2, status=502)
        assert s.get_range("chunks/" + "77" * 32, 10, 20) == data[10:30]
        assert proxy.stats["failed"] == 4


def test_an_unreachable_registry_is_one_clear_error():
    s = OciObjectStore("127.0.0.1:9", "casfs/none", attempts=2, backoff=0.01, timeout=2)
    with pytest.raises(StoreError, match="failed after 2 attempts"):
        s.get("tags/x")


def test_the_cli_copies_an_image_to_a_registry_and_lists_it_there(registry, built, tmp_path):
    src_dir, image_id, _ = built
    url = _url(registry, "casfs/cli")
    env = {**os.environ, "PYTHONPATH": ROOT, "CASFS_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", src_dir, "copy", "src",
                        "--to", url, "--tag", "cli", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"to {url}" in p.stdout
    p = subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", url, "--cache-dir", "",
                        "cat", "cli", "pkg/m1.py"], capture_output=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", url, "copy", "src",
                        "--from", src_dir, "--to", url, "--tag", "a:b"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "registry tag" in p.stderr


def test_casfs_push_publishes_a_runnable_image_with_the_config_asked_for(registry, built, tmp_path):
    src_dir, image_id, _ = built
    env = {**os.environ, "PYTHONPATH": ROOT, "CASFS_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", src_dir, "push", "src",
                        f"{registry.host}/casfs/push:t1", "--cmd", "/bin/sh -c 'echo hi there'",
                        "--env", "A=1", "--workdir", "/srv", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"ctr image pull --snapshotter casfs {registry.host}/casfs/push:t1" in p.stdout
    reg = Registry(registry.host, "casfs/push")
    index = reg.get_manifest("t1", ["application/vnd.oci.image.index.v1+json"]).json()
    runnable = next(m for m in index["manifests"] if m["platform"]["os"] == "linux")
    manifest = reg.get_manifest(runnable["digest"], ["application/vnd.oci.image.manifest.v1+json"]).json()
    config = json.loads(reg.get_blob(manifest["config"]["digest"]))
    assert config["config"]["Cmd"] == ["/bin/sh", "-c", "echo hi there"]
    assert "A=1" in config["config"]["Env"] and config["config"]["WorkingDir"] == "/srv"
    layer = manifest["layers"][0]
    assert layer["size"] < 1024 and layer["annotations"]["containerd.io/snapshot/casfs.image-id"] == image_id
    for bad in (["src", "nohost"], ["src", f"{registry.host}/casfs/push:t2", "--platform", "linux"]):
        p = subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", src_dir, "push", *bad],
                           capture_output=True, text=True, env=env, timeout=120)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.parametrize("body", [b"", b"[]", b"null", b"{" * 100_000, b"[" * 100_000 + b"]" * 100_000,
                                  b'{"layers": 5}', b'{"layers": [{"digest": "sha256:00", "size": 1}]}',
                                  b'{"layers": [{"annotations": {"org.casfs.key": "tags/x"}, '
                                  b'"digest": "sha256:' + b"0" * 64 + b'", "size": 1}]}',
                                  b'{"layers": [{"annotations": {"org.casfs.key": "chunks/ab"}, '
                                  b'"digest": "sha256:' + b"0" * 64 + b'", "size": true}]}'])
def test_hostile_catalogs_tag_indexes_and_references_are_clean_errors(body):
    from casfs.objects.oci import parse_catalog, parse_tag_index
    from casfs.oci.publish import parse_reference

    with pytest.raises(StoreError):
        parse_catalog(body)
    assert parse_tag_index(body) is None
    with pytest.raises(ValueError):
        parse_reference(body)
    bad_tag = b'{"annotations": {"org.casfs.tag-data": "%%%"}}'
    with pytest.raises(StoreError):
        parse_tag_index(bad_tag)


def test_gc_on_a_registry_keeps_tagged_and_young_objects_and_deletes_old_strays(registry, built):
    from casfs.gc import collect

    url = _url(registry, "casfs/gc")
    _copy(built, url)
    objects = OciObjectStore(registry.host, "casfs/gc")
    stray = "chunks/" + "5e" * 32
    objects.put(stray, b"an unreferenced object")
    assert abs(objects.mtime(stray) - time.time()) < 60
    store = casfs.Store(objects, memory_bytes=0)
    kept_before = len(store.referenced_objects())
    r = collect(store, grace_seconds=3600)
    assert r.deleted == 0 and r.young == 1  # too young to go
    r = collect(store, grace_seconds=0)
    assert r.deleted == 1 and not objects.contains(stray)
    fresh = casfs.Store(OciObjectStore(registry.host, "casfs/gc"), memory_bytes=0)
    assert len(fresh.referenced_objects()) == kept_before
    assert fresh.open_image("web").read("pkg/m1.py", 0, 10) == built[2]["pkg/m1.py"][:10]
