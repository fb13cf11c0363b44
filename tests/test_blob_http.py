"""What only the read-only HTTP store does, against a real web server (a local store directory
served by Debian's nginx): an image published by nginx reads back, a server that ignores
ranges, a listing without a JSON autoindex, a store under a URL path prefix.

The contract every object store keeps (reads, ranges, missing keys, invalid keys, listing,
refusing writes, a failing backend, retried 5xx answers, cut connections, a hung server) is
``tests/test_object_stores.py``, run against this store too.
"""

from __future__ import annotations

import os
import random

import pytest

import casfs
from casfs.errors import StoreError
from casfs.objects.http import HttpObjectStore
from casfs.objects.local import LocalObjectStore
from conftest import write_tree
from tests.support import NGINX, missing_binary, nginx_static

pytestmark = pytest.mark.skipif(missing_binary(NGINX) is not None,
                                reason=f"{missing_binary(NGINX)} (apt-get install nginx-light)")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """An image built into a local store directory; returns (store dir, image id, files)."""
    root = tmp_path_factory.mktemp("http")
    rng = random.Random(3)
    files = {f"pkg/m{i}.py": rng.randbytes(rng.randrange(0, 4000)) for i in range(60)}
    files["weights/model.bin"] = rng.randbytes(2_500_000)  # 3 loose chunks (2 of 1 MiB and the tail)
    files["weights/copy.bin"] = files["weights/model.bin"]  # deduplicated
    files["empty"] = b""
    write_tree(str(root / "tree"), files)
    with casfs.open_store(str(root / "store")) as store:
        res = casfs.build(store, str(root / "tree"), tag="web", chunk_size=1 << 20)
        assert len(list(store.objects.list("chunks/"))) == 3 and list(store.objects.list("packs/"))
    return str(root / "store"), res.image_id, files


@pytest.fixture(scope="module")
def site(published):
    """nginx serving the store directory at its root, with a JSON autoindex."""
    with nginx_static(published[0]) as url:
        yield url


def test_an_image_published_by_nginx_reads_back_byte_exact(published, site, tmp_path):
    _, image_id, files = published
    with casfs.open_store(site, cache_dir=str(tmp_path / "cache"), memory_bytes=0) as store:
        assert store.url == site
        image = store.open_image("web")  # a tag, fetched as tags/web: no listing needed
        assert image.id == image_id
        for rel, data in files.items():
            assert image.read(rel) == data, rel
        assert image.read("weights/model.bin", 1_000_000, 200_000) == files["weights/model.bin"][1_000_000:1_200_000]
        assert store.tags() == {"web": image_id}  # through the JSON autoindex
        assert store.open_image(image_id[:10]).id == image_id


def test_a_server_that_ignores_ranges_is_sliced_locally(published):
    local = LocalObjectStore(published[0], create=False)
    key = next(iter(local.list("packs/")))
    data = local.get(key)
    with nginx_static(published[0], ranges=False) as url:
        web = HttpObjectStore(url)
        assert web.get_range(key, 5, 100) == data[5:105]
        assert web.get_range(key, len(data) - 3, 100) == data[-3:]
        assert web.get_range(key, len(data) + 5, 10) == b""
        assert web.size(key) == len(data)


def test_listing_without_a_json_autoindex_says_what_is_needed(published):
    with nginx_static(published[0], autoindex=False) as url:
        web = HttpObjectStore(url)
        with pytest.raises(StoreError, match="autoindex"):
            list(web.list("tags/"))
        with casfs.open_store(url, cache_dir="", memory_bytes=0) as store:
            assert store.open_image("web").read("empty") == b""  # tags still resolve


def test_a_store_under_a_url_path_prefix(published):
    parent = os.path.dirname(published[0])
    with nginx_static(parent) as url:
        web = HttpObjectStore(url + os.path.basename(published[0]))  # no trailing slash
        assert web.get("tags/web").decode().strip() == published[1]
        assert list(web.list("tags/")) == ["tags/web"]
