"""casfs's HTTP clients bound what they read from a server (the class of #17 defect 6, on the
network side): a cache node, an HTTP blob store, an S3 endpoint or a registry that declares a
terabyte, streams chunks forever or never frames its body cannot make a client allocate
without bound. Every read is bounded by what the request can have (a range's length, a frame's
stored length, the largest object of a kind, a manifest limit) and a longer answer is refused
at once with one clear error; the bytes still needed come from the next tier.

The hostile server is real (``tests.support.liar``: a stdlib HTTP server on 127.0.0.1 that
lies about Content-Length, or streams chunked or unframed bodies that never end); the clients
are casfs's own, and the cache server runs as its own ``casfs cache-server`` process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
import urllib.error

import pytest

import casfs
from casfs.errors import StoreError
from casfs.httpclient import ERROR_BODY_LIMIT, ConnectionPool, TooLarge, exchange
from casfs.objects.http import HttpObjectStore
from casfs.objects.local import LocalObjectStore
from casfs.store import Store
from casfs.tiers.azcache import AzCacheTier

from conftest import write_tree

from tests.support import aws_test_environment
from tests.support.liar import LyingServer, pattern

MODES = ("declares", "chunked", "unframed")
SOCKET_SLACK = 24 << 20  # what loopback socket buffers may hold beyond what the client read
KEY = "chunks/" + "ab" * 32


def pool_for(srv: LyingServer) -> ConnectionPool:
    return ConnectionPool("http", "127.0.0.1", srv.port, timeout=10)


# -- casfs.httpclient.exchange ------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_a_body_longer_than_the_limit_is_refused_and_never_buffered(mode):
    with LyingServer(mode) as srv:
        pool = pool_for(srv)
        with pytest.raises(TooLarge, match=r"at most 1048576 .*refused"):
            exchange(pool, "GET", "/x", {}, limit=1 << 20)
        assert pool._idle == []  # the connection is dropped, not reused
    assert srv.sent < (1 << 20) + SOCKET_SLACK  # of the 256 MiB it would have sent


@pytest.mark.parametrize("mode", MODES)
def test_a_206_longer_than_its_range_is_refused(mode):
    with LyingServer(mode, ranges=True) as srv:
        with pytest.raises(TooLarge):
            exchange(pool_for(srv), "GET", "/x", {"Range": "bytes=100-4195"})
    assert srv.sent < SOCKET_SLACK


@pytest.mark.parametrize("mode", MODES)
def test_a_200_to_a_ranged_request_is_read_only_to_the_end_of_the_range(mode):
    """A server that ignores Range sends the whole object: its head up to the range's end is
    enough (the caller slices it), the rest is never read and the connection is dropped."""
    with LyingServer(mode) as srv:
        pool = pool_for(srv)
        ans = exchange(pool, "GET", "/x", {"Range": "bytes=5000-5999"})
        assert ans.status == 200 and ans.body == pattern(0, 6000)
        assert pool._idle == []
    assert srv.sent < SOCKET_SLACK


@pytest.mark.parametrize("mode", MODES)
def test_an_error_answer_keeps_only_the_head_of_an_endless_body(mode):
    with LyingServer(mode, status=500) as srv:
        ans = exchange(pool_for(srv), "GET", "/x", {})
    assert ans.status == 500 and ans.body == pattern(0, ERROR_BODY_LIMIT)
    assert srv.sent < SOCKET_SLACK


# -- the HTTP blob store (and the cache server's fill from it) -----------------------------------

def test_the_http_store_refuses_an_oversized_object_at_once_without_retrying():
    with LyingServer("declares") as srv:
        store = HttpObjectStore(srv.url, attempts=5, backoff=0.01)
        with pytest.raises(StoreError, match=r"declared a body of 1099511627776 bytes .*refused"):
            store.get(KEY)
        assert srv.requests == 1  # a hostile answer is not a transient failure
        with pytest.raises(StoreError, match="refused"):  # a tag is a few bytes
            HttpObjectStore(srv.url).get("tags/latest")


@pytest.mark.parametrize("mode", ("chunked", "unframed"))
def test_the_http_store_reads_a_small_kind_only_up_to_its_bound(mode):
    with LyingServer(mode) as srv:
        with pytest.raises(StoreError, match="more than 65536 bytes"):
            HttpObjectStore(srv.url, attempts=1).get("tags/latest")
    assert srv.sent < SOCKET_SLACK


def test_the_http_store_slices_a_range_from_the_head_of_an_endless_whole_object():
    with LyingServer("chunked") as srv:
        store = HttpObjectStore(srv.url)
        assert store.get_range(KEY, 70_000, 300) == pattern(70_000, 300)
    assert srv.sent < SOCKET_SLACK


def test_the_http_store_sizes_an_object_from_content_length_when_ranges_are_ignored():
    with LyingServer("declares") as srv:
        assert HttpObjectStore(srv.url).size(KEY) == 1 << 40
    assert srv.sent < SOCKET_SLACK


def test_the_cache_server_answers_an_error_when_its_blob_store_sends_too_much(tmp_path):
    """``casfs cache-server --store http://<liar>/``: the fill is refused before the body is
    read (the server's memory stays bounded), the client gets a 502 at once."""
    with LyingServer("declares") as srv:
        proc = subprocess.Popen([sys.executable, "-m", "casfs.cli.main", "cache-server", "--listen",
                                 "127.0.0.1:0", "--store", srv.url, "--memory", "16M"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            m = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
            assert m, line + proc.stderr.read()
            url = m.group(1) + "chunks/ab/" + "ab" * 32
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url, timeout=30)
            assert e.value.code == 502
            assert srv.requests == 1
        finally:
            proc.terminate()
            proc.wait(10)
        assert srv.sent < SOCKET_SLACK
        assert "refused" in proc.stderr.read()


# -- the azcache tier --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(store dir, files) of image "t": small files in packs and a loose 3 MiB file."""
    d = tmp_path_factory.mktemp("liar")
    files = {f"small/f{i:02d}": os.urandom(700 + 31 * i) for i in range(20)}
    files["big"] = os.urandom(3 << 20)
    write_tree(d / "src", files)
    with casfs.open_store(str(d / "store")) as s:
        casfs.build(s, str(d / "src"), tag="t", chunk_size=2 << 20, progress=False)
    return str(d / "store"), files


@pytest.mark.parametrize("mode", MODES)
def test_a_cache_node_that_sends_too_much_is_skipped_and_reads_come_from_the_blob_store(built, mode):
    with LyingServer(mode, ranges=True) as srv:
        tier = AzCacheTier([srv.url], timeout=10)
        with Store(LocalObjectStore(built[0]), memory_bytes=0, extra_tiers=[tier]) as store:
            image = store.open_image("t")
            for path, data in built[1].items():
                assert image.read(path) == data, path
            (node,) = tier.node_status()
        assert not node["up"] and node["corrupt"] >= 1
        assert "refused" in node["down_reason"]
    assert srv.sent < SOCKET_SLACK


# -- S3 and the OCI registry -------------------------------------------------------------------

def test_the_s3_store_refuses_an_object_or_range_longer_than_it_can_be():
    pytest.importorskip("boto3")
    from casfs.objects.s3 import S3ObjectStore

    with aws_test_environment(), LyingServer("declares", ranges=True) as srv:
        s3 = S3ObjectStore("casfs-liar", endpoint_url=srv.url.rstrip("/"), max_attempts=2)
        with pytest.raises(StoreError, match=r"get chunks/.*declared 1099511627776 bytes.*refused"):
            s3.get(KEY)
        with pytest.raises(StoreError, match="declared 1099511627776 bytes where at most 10 can come"):
            s3.get_range(KEY, 0, 10)
    assert srv.sent < SOCKET_SLACK


@pytest.mark.parametrize("mode", MODES)
def test_the_registry_client_bounds_manifests_and_blobs(mode):
    from casfs.oci.registry import MAX_MANIFEST, Registry

    with LyingServer(mode) as srv:
        reg = Registry(f"127.0.0.1:{srv.port}", "casfs/liar", attempts=1)
        with pytest.raises(StoreError, match="refused"):
            reg.get_manifest("latest", ["application/vnd.oci.image.manifest.v1+json"])
        with pytest.raises(StoreError, match="refused"):
            reg.get_blob("sha256:" + "cd" * 32, size=1000)
    assert srv.sent < MAX_MANIFEST + 2 * SOCKET_SLACK
