"""The read-only HTTP blob store against a real web server: a local store directory served by
Debian's nginx. Faults (5xx replies, cut connections, a hung server) are injected by a real TCP
proxy (``tests.support.FaultProxy``) between the client and nginx.
"""

from __future__ import annotations

import os
import random
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import casfs
from casfs.errors import StoreError
from casfs.objects.http import HttpObjectStore
from casfs.objects.local import LocalObjectStore
from conftest import write_tree
from tests.support import NGINX, FaultProxy, missing_binary, nginx_static

pytestmark = pytest.mark.skipif(missing_binary(NGINX) is not None,
                                reason=f"{missing_binary(NGINX)} (apt-get install nginx-light)")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """An image built into a local store directory; returns (store dir, image id, files)."""
    root = tmp_path_factory.mktemp("http")
    rng = random.Random(3)
    files = {f"pkg/m{i}.py": rng.randbytes(rng.randrange(0, 4000)) for i in range(60)}
    files["weights/model.bin"] = rng.randbytes(2_500_000)  # 2 loose 1 MiB chunks + a packed tail
    files["weights/copy.bin"] = files["weights/model.bin"]  # deduplicated
    files["empty"] = b""
    write_tree(str(root / "tree"), files)
    with casfs.open_store(str(root / "store")) as store:
        res = casfs.build(store, str(root / "tree"), tag="web", chunk_size=1 << 20)
        assert len(list(store.objects.list("chunks/"))) == 2 and list(store.objects.list("packs/"))
    return str(root / "store"), res.image_id, files


@pytest.fixture(scope="module")
def site(published):
    """nginx serving the store directory at its root, with a JSON autoindex."""
    with nginx_static(published[0]) as url:
        yield url


@pytest.fixture
def proxy(site):
    with FaultProxy(urlsplit(site).port) as p:
        yield p


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


def test_get_range_returns_exact_slices_of_the_object(published, site):
    local = LocalObjectStore(published[0], create=False)
    web = HttpObjectStore(site)
    key = max(local.list("packs/"), key=local.size)
    data = local.get(key)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(offset=st.integers(0, len(data) + 10), length=st.integers(0, 5000))
    def check(offset, length):
        assert web.get_range(key, offset, length) == data[offset:offset + length]

    check()


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


def test_objects_and_sizes_match_the_directory_served(published, site):
    local = LocalObjectStore(published[0], create=False)
    web = HttpObjectStore(site)
    for kind in ("chunks/", "packs/", "indexes/", "tags/"):
        keys = list(local.list(kind))
        assert list(web.list(kind)) == keys
        for key in keys[:5]:
            assert web.contains(key)
            assert web.size(key) == local.size(key)
            assert web.get(key) == local.get(key)
    assert list(web.list("profiles/")) == []  # no such directory


def test_a_missing_object_is_a_key_error(site):
    web = HttpObjectStore(site)
    for op in (lambda: web.get("chunks/00ff"), lambda: web.get_range("chunks/00ff", 0, 9),
               lambda: web.get_range("chunks/00ff", 0, 0), lambda: web.size("chunks/00ff")):
        with pytest.raises(KeyError):
            op()
    assert not web.contains("chunks/00ff")
    with pytest.raises(ValueError):
        web.get("chunks/../../etc/passwd")


def test_the_store_is_read_only(site):
    web = HttpObjectStore(site)
    assert web.read_only
    with pytest.raises(StoreError, match="read-only"):
        web.put("tags/x", b"1")
    with pytest.raises(StoreError, match="read-only"):
        web.delete("tags/web")
    assert web.contains("tags/web")


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


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried(published, proxy, status):
    local = LocalObjectStore(published[0], create=False)
    key = next(iter(local.list("chunks/")))
    web = HttpObjectStore(proxy.url, backoff=0.01)
    proxy.fail_next(3, status)
    assert web.get(key) == local.get(key)
    proxy.fail_next(2, status)
    assert web.get_range(key, 100, 1000) == local.get(key)[100:1100]
    proxy.fail_next(2, status)
    assert web.contains(key)
    assert proxy.stats["failed"] == 7


def test_server_errors_beyond_the_attempt_budget_are_a_store_error(published, proxy):
    web = HttpObjectStore(proxy.url, attempts=3, backoff=0.01)
    proxy.fail_next(3, 503)
    with pytest.raises(StoreError, match="503.*after 3 attempts|after 3 attempts.*503"):
        web.get("tags/web")
    assert proxy.pending_failures == 0
    assert web.get("tags/web")  # and the next request goes through


@pytest.mark.parametrize("cut_at", [60, 20_000], ids=["inside-headers", "mid-body"])
def test_a_connection_cut_mid_response_is_retried(published, proxy, cut_at):
    local = LocalObjectStore(published[0], create=False)
    key = max(local.list("chunks/"), key=local.size)
    data = local.get(key)
    assert len(data) > 2 * cut_at
    web = HttpObjectStore(proxy.url, backoff=0.01)
    assert web.contains(key)  # a warm keep-alive connection
    proxy.drop_after(cut_at)
    assert web.get(key) == data
    proxy.drop_after(cut_at)
    assert web.get_range(key, 7, len(data)) == data[7:]
    proxy.drop_after(min(cut_at, 100))
    assert web.size(key) == len(data)
    assert proxy.stats["drops"] == 3


def test_a_hung_server_times_out_into_a_store_error(proxy):
    web = HttpObjectStore(proxy.url, timeout=0.3, attempts=2, backoff=0.01)
    proxy.hang()
    with pytest.raises(StoreError, match="after 2 attempts.*[Tt]imeout"):
        web.get("tags/web")
    proxy.release()
    assert web.get("tags/web")
