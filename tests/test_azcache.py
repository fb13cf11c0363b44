"""The azcache tier against real cache servers on 127.0.0.1: reads, rendezvous placement, peers
sharing one blob store, node health, tokens, and nginx proxy_cache as the AZ cache (in front of
an HTTP store and in front of S3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import casfs
from casfs.cacheserver import CacheServer
from casfs.errors import StoreError
from casfs.index import ChunkRef
from casfs.store import Store
from casfs.tiers.azcache import AzCacheTier
from casfs.objects.local import LocalObjectStore

from conftest import write_tree

from tests.support import NGINX, FaultProxy, free_port, missing_binary, moto_server, nginx_cache, nginx_static

CHUNK = 2 << 20


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(store dir, {path: bytes}) of an image "t": 80 small files in packs and a 5 MiB file."""
    d = tmp_path_factory.mktemp("az")
    files = {f"small/f{i:03d}": os.urandom(500 + 53 * i) for i in range(80)}
    files["big"] = os.urandom(5 << 20)
    write_tree(d / "src", files)
    with casfs.open_store(str(d / "store")) as s:
        casfs.build(s, str(d / "src"), tag="t", chunk_size=CHUNK, progress=False)
    return str(d / "store"), files


def host(store_dir: str, tier: AzCacheTier, cache_dir: str | None = None) -> Store:
    """A "host": its own (optional) ssd cache, no memory tier, the AZ tier, then the blob store."""
    return Store(LocalObjectStore(store_dir), cache_dir=cache_dir, memory_bytes=0, extra_tiers=[tier])


def read_all(store: Store, files: dict[str, bytes]) -> None:
    image = store.open_image("t")
    for path, data in files.items():
        assert image.read(path) == data, path


def tier_stats(store: Store) -> dict[str, int]:
    return {t.name: t.hits for t in store.chunks.stats()}


def test_reads_through_cache_servers_equal_the_source_and_never_touch_the_blob_tier(built):
    with CacheServer(LocalObjectStore(built[0])) as a, CacheServer(LocalObjectStore(built[0])) as b:
        tier = AzCacheTier([a.url, b.url])
        with host(built[0], tier) as s:
            read_all(s, built[1])
            stats = tier_stats(s)
        assert stats["azcache"] > 0 and stats["blob"] == 0
        assert sum(n["ok"] for n in tier.node_status()) == stats["azcache"]
        tier.close()


def test_rendezvous_hashing_spreads_keys_and_moves_only_a_removed_nodes_share():
    urls = [f"http://127.0.0.1:{p}/" for p in (9001, 9002, 9003)]
    three = AzCacheTier(urls)
    two = AzCacheTier(urls[:2])
    keys = [f"chunks/{os.urandom(32).hex()}" for _ in range(3000)]
    top3 = [three._ranked(k)[0].url for k in keys]
    top2 = [two._ranked(k)[0].url for k in keys]
    for u in urls:
        assert 0.25 < top3.count(u) / len(keys) < 0.42
    for a, b in zip(top3, top2):
        if a != urls[2]:
            assert a == b  # keys of the surviving nodes stay where they were
    assert three._ranked(keys[0])[0].url == AzCacheTier(list(reversed(urls)))._ranked(keys[0])[0].url
    three.close()
    two.close()


def test_three_hosts_sharing_cache_servers_fetch_each_object_from_the_blob_store_once(built, tmp_path):
    """Peers: three servers on 127.0.0.1 over one blob store, three hosts with their own ssd
    caches. The first host's reads fill the servers; the others are served from them."""
    servers = [CacheServer(LocalObjectStore(built[0]), cache_dir=str(tmp_path / f"srv{i}")).start()
               for i in range(3)]
    try:
        objects = LocalObjectStore(built[0])
        n_objects = len(list(objects.list("chunks/"))) + len(list(objects.list("packs/")))
        hosts, fills = [], []
        for i in range(3):
            tier = AzCacheTier([s.url for s in servers], fill_hedge_default=30.0)
            with host(built[0], tier, cache_dir=str(tmp_path / f"host{i}")) as h:
                read_all(h, built[1])
                hosts.append(tier_stats(h))
            tier.close()
            fills.append(sum(s.metrics.value("casfs_cache_misses_total") for s in servers))
        assert fills == [n_objects] * 3  # all by the first host; none by the others
        assert all(h["blob"] == 0 and h["azcache"] > 0 for h in hosts)
    finally:
        for s in servers:
            s.close()


def test_a_hedge_during_a_slow_fill_asks_only_for_cached_bytes_and_the_blob_is_read_once(built):
    """Both servers fill from real LocalObjectStores that count gets and hold them until the
    test has seen the hedge: the hedged node answers 504 (only-if-cached) instead of fetching."""
    release = threading.Event()
    gets = []

    class GatedStore(LocalObjectStore):
        def get(self, key):
            gets.append(key)
            release.wait(10)
            return super().get(key)

    a = CacheServer(GatedStore(built[0])).start()
    b = CacheServer(GatedStore(built[0])).start()
    try:
        tier = AzCacheTier([a.url, b.url], hedge_default=0.01, fill_hedge_default=30.0, hedge_ratio=1.0)
        with host(built[0], tier) as s:
            image = s.open_image("t")
            ref = image.chunk_refs(image.lookup("big"))[0]
            got = []
            t = threading.Thread(target=lambda: got.append(s.chunks.get(ref)))
            t.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(
                    srv.metrics.value("casfs_cache_requests_total", code="504") for srv in (a, b)):
                time.sleep(0.01)
            release.set()
            t.join(10)
            assert got == [built[1]["big"][:CHUNK]]
        assert len(gets) == 1  # one blob fetch, by the primary
        assert sum(srv.metrics.value("casfs_cache_requests_total", code="504") for srv in (a, b)) == 1
        tier.close()
    finally:
        release.set()
        a.close()
        b.close()


def test_when_every_node_is_down_the_store_reads_the_blob_tier(built):
    dead = [f"http://127.0.0.1:{free_port()}/" for _ in range(2)]
    tier = AzCacheTier(dead, down_base=30.0)
    with host(built[0], tier) as s:
        read_all(s, built[1])
        assert tier_stats(s)["blob"] > 0
    status = tier.node_status()
    assert not any(n["up"] for n in status) and all(n["errors"] >= 1 for n in status)
    ref = ChunkRef(os.urandom(32), 10, 58)
    assert tier.get(ref) is None  # no node left to ask: a miss, at once
    tier.close()


def test_a_node_that_comes_back_is_used_again_after_its_backoff(built):
    port = free_port()
    tier = AzCacheTier([f"http://127.0.0.1:{port}/"], down_base=0.2)
    with host(built[0], tier) as s:
        read_all(s, {"big": built[1]["big"]})  # the node is down: blob
        assert not tier.node_status()[0]["up"]
        srv = CacheServer(LocalObjectStore(built[0]), port=port).start()
        try:
            deadline = time.monotonic() + 10
            while not tier.node_status()[0]["up"] and time.monotonic() < deadline:
                time.sleep(0.05)
            before = tier.node_status()[0]["ok"]
            read_all(s, {"small/f001": built[1]["small/f001"]})
            assert tier.node_status()[0]["ok"] > before
        finally:
            srv.close()
    tier.close()


def test_a_bearer_token_is_sent_and_a_wrong_one_sends_the_store_to_the_blob_tier(built):
    with CacheServer(LocalObjectStore(built[0]), token="t0ken") as srv:
        good = AzCacheTier([srv.url], token="t0ken")
        with host(built[0], good) as s:
            read_all(s, built[1])
            assert tier_stats(s)["blob"] == 0
        bad = AzCacheTier([srv.url], token="nope")
        with host(built[0], bad) as s:
            read_all(s, built[1])
            assert tier_stats(s)["blob"] > 0
        assert "401" in bad.node_status()[0]["last_error"] and not bad.node_status()[0]["up"]
        good.close()
        bad.close()


def test_open_store_puts_the_azcache_tier_between_ssd_and_blob(built, tmp_path, monkeypatch):
    with CacheServer(LocalObjectStore(built[0])) as srv:
        monkeypatch.setenv("CASFS_AZCACHE", srv.url)
        with casfs.open_store(built[0], cache_dir=str(tmp_path / "c")) as s:
            assert s.chunks.memory.name == "memory"  # the decoded cache in front of the tiers
            assert [t.name for t in s.chunks.tiers] == ["ssd", "azcache", "blob"]
            read_all(s, built[1])
            assert tier_stats(s)["azcache"] > 0
    with pytest.raises(StoreError, match="http://host:port"):
        AzCacheTier(["https://example.com/"])
    with pytest.raises(StoreError, match="layout"):
        AzCacheTier(["http://127.0.0.1:1/?layout=weird"])


def test_the_cli_takes_azcache_urls(built, tmp_path):
    with CacheServer(LocalObjectStore(built[0])) as srv:
        r = subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", built[0], "--azcache", srv.url,
                            "cat", "t", "big"], capture_output=True, timeout=60)
        assert r.returncode == 0 and r.stdout == built[1]["big"]
        assert srv.metrics.value("casfs_cache_misses_total") > 0


# -- any HTTP cache works as the AZ tier: nginx proxy_cache ---------------------------------------

@pytest.mark.skipif(bool(missing_binary(NGINX)), reason=missing_binary(NGINX) or "")
def test_nginx_proxy_cache_in_front_of_an_http_store_works_as_the_azcache_tier(built):
    """origin: nginx serving the store directory; a FaultProxy between cache and origin counts
    what the origin sent; the cache: nginx proxy_cache. Two hosts read; the second is served
    by the cache without origin traffic."""
    with nginx_static(built[0]) as origin_url:
        origin_port = int(origin_url.rstrip("/").rsplit(":", 1)[1])
        with FaultProxy(origin_port) as counter, nginx_cache(counter.url + "/") as cache_url:
            t1 = AzCacheTier([cache_url])
            with host(built[0], t1) as s:
                read_all(s, built[1])
                assert tier_stats(s)["blob"] == 0
            sent = counter.stats["bytes_down"]
            assert sent > 0
            t2 = AzCacheTier([cache_url])
            with host(built[0], t2) as s:
                read_all(s, built[1])
                assert tier_stats(s)["blob"] == 0 and tier_stats(s)["azcache"] > 0
            assert counter.stats["bytes_down"] == sent  # all from nginx's cache
            t1.close()
            t2.close()


@pytest.mark.skipif(bool(missing_binary(NGINX)), reason=missing_binary(NGINX) or "")
def test_nginx_proxy_cache_in_front_of_s3_works_with_the_flat_layout(built, monkeypatch):
    """moto's S3 server as the blob store (bucket readable anonymously by policy, as a bucket
    behind a VPC endpoint would be); nginx proxy_cache in front of the bucket prefix; the tier
    uses ``?layout=flat`` (S3 keys have no fan-out directories)."""
    pytest.importorskip("boto3")
    if missing_binary(os.path.join(os.path.dirname(sys.executable), "moto_server")):
        pytest.skip("moto_server is not installed")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    from casfs.copy import copy_image
    from casfs.objects.s3 import S3ObjectStore

    with moto_server() as endpoint:
        s3 = S3ObjectStore("casfs-test", "img", endpoint_url=endpoint, region="us-east-1")
        s3.create_bucket()
        s3.client.put_bucket_policy(Bucket="casfs-test", Policy=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",
                                                    "Action": "s3:GetObject",
                                                    "Resource": "arn:aws:s3:::casfs-test/img/*"}]}))
        src = casfs.open_store(built[0])
        dst = Store(s3, memory_bytes=0)
        copy_image(src, dst, "t", progress=False)
        with nginx_cache(f"{endpoint}/casfs-test/img/") as cache_url:
            tier = AzCacheTier([cache_url + "?layout=flat"])
            with Store(s3, memory_bytes=0, extra_tiers=[tier]) as s:
                read_all(s, built[1])
                assert tier_stats(s)["blob"] == 0 and tier_stats(s)["azcache"] > 0
            tier.close()
        dst.close()
        src.close()
