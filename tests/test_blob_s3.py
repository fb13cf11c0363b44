"""The S3 blob store against a real S3-compatible server (moto_server in its own process).

Faults (5xx replies, connections cut mid-body) are injected by a real TCP proxy
(``tests.support.FaultProxy``) between the client and moto.
"""

from __future__ import annotations

import itertools
import os
import random
import re
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import casfs
from casfs.urls import open_objects
from casfs.errors import StoreError
from tests.support import MOTO_SERVER, FaultProxy, free_port, missing_binary, moto_server
from conftest import write_tree

pytest.importorskip("boto3", reason="S3 stores need boto3 (pip install 'casfs[s3]')")
from casfs.objects.s3 import S3ObjectStore  # noqa: E402

pytestmark = pytest.mark.skipif(missing_binary(MOTO_SERVER) is not None,
                                reason=f"{missing_binary(MOTO_SERVER)} (pip install 'moto[server]')")

BUCKET = "casfs-test"
_prefixes = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def aws_environment():
    """Dummy credentials for boto3's chain; no profile or endpoint from the developer's shell."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "CASFS_S3_ENDPOINT"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        yield


@pytest.fixture(scope="module")
def endpoint(aws_environment):
    """moto_server's URL; the bucket BUCKET exists."""
    with moto_server() as url:
        S3ObjectStore(BUCKET, endpoint_url=url).create_bucket()
        yield url


@pytest.fixture
def s3(endpoint):
    """A store under a fresh prefix of the shared test bucket."""
    return S3ObjectStore(BUCKET, f"t{next(_prefixes)}", endpoint_url=endpoint)


@pytest.fixture
def proxy(endpoint):
    """A FaultProxy in front of moto."""
    with FaultProxy(urlsplit(endpoint).port) as p:
        yield p


def test_objects_round_trip_through_put_get_contains_size_and_delete(s3):
    data = os.urandom(3000)
    s3.put("chunks/aa01", data)
    assert s3.get("chunks/aa01") == data
    assert s3.contains("chunks/aa01")
    assert s3.size("chunks/aa01") == 3000
    s3.put("chunks/aa01", b"replaced")
    assert s3.get("chunks/aa01") == b"replaced"
    s3.delete("chunks/aa01")
    assert not s3.contains("chunks/aa01")
    s3.delete("chunks/aa01")  # deleting a missing object is not an error


def test_a_missing_object_is_a_key_error(s3):
    with pytest.raises(KeyError):
        s3.get("chunks/beef")
    with pytest.raises(KeyError):
        s3.get_range("chunks/beef", 0, 10)
    with pytest.raises(KeyError):
        s3.get_range("chunks/beef", 0, 0)
    with pytest.raises(KeyError):
        s3.size("chunks/beef")
    assert not s3.contains("chunks/beef")


def test_keys_that_could_escape_the_namespace_are_rejected(s3):
    for bad in ("../x", "chunks/../x", "chunks/", "Chunks/ab", "chunks/a/b", "/chunks/ab"):
        with pytest.raises(ValueError):
            s3.get(bad)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 1100), length=st.integers(0, 1100))
def test_get_range_returns_exactly_the_bytes_a_slice_would(s3, offset, length):
    data = random.Random(7).randbytes(1000)
    if not s3.contains("packs/range"):
        s3.put("packs/range", data)
    assert s3.get_range("packs/range", offset, length) == data[offset:offset + length]


def test_list_yields_the_keys_of_one_kind_and_one_prefix_only(endpoint, s3):
    other = S3ObjectStore(BUCKET, s3.prefix + "x", endpoint_url=endpoint)  # a prefix of a prefix
    names = sorted(os.urandom(8).hex() for _ in range(5))
    for n in names:
        s3.put(f"chunks/{n}", b"c")
    s3.put("tags/latest", b"id\n")
    other.put("chunks/ffff", b"o")
    assert list(s3.list("chunks/")) == [f"chunks/{n}" for n in names]
    assert list(s3.list("tags/")) == ["tags/latest"]
    assert list(s3.list("packs/")) == []
    assert list(other.list("chunks/")) == ["chunks/ffff"]


def test_list_pages_through_more_keys_than_one_response_holds(endpoint):
    s3 = S3ObjectStore(BUCKET, f"t{next(_prefixes)}", endpoint_url=endpoint, list_page_size=7)
    keys = [f"chunks/{i:04x}" for i in range(30)]
    for k in keys:
        s3.put(k, b"")
    assert list(s3.list("chunks/")) == keys


def test_a_large_object_is_uploaded_in_parts_and_reads_back_identical(s3):
    data = random.Random(70).randbytes(70 << 20)
    s3.put("chunks/big", data)
    head = s3.client.head_object(Bucket=BUCKET, Key=f"{s3.prefix}/chunks/big")
    assert re.search(r"-\d+\"?$", head["ETag"]), f"not a multipart ETag: {head['ETag']}"
    assert s3.size("chunks/big") == len(data)
    assert s3.get("chunks/big") == data
    assert s3.get_range("chunks/big", (64 << 20) - 5, 10) == data[(64 << 20) - 5:(64 << 20) + 5]
    s3.delete("chunks/big")


def test_a_missing_bucket_is_a_store_error_that_says_to_create_it(endpoint):
    s3 = S3ObjectStore("casfs-nobucket", "p", endpoint_url=endpoint)
    for op in (lambda: s3.get("chunks/ab"), lambda: s3.contains("chunks/ab"),
               lambda: s3.put("chunks/ab", b"x"), lambda: list(s3.list("chunks/"))):
        with pytest.raises(StoreError, match="does not exist.*create"):
            op()
    s3.create_bucket()
    s3.create_bucket()  # creating a bucket we already own is fine
    s3.put("chunks/ab", b"x")
    assert s3.get("chunks/ab") == b"x"


def test_an_unreachable_endpoint_is_a_store_error_naming_it():
    port = free_port()  # nothing listens there: connections are refused
    s3 = S3ObjectStore(BUCKET, endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(StoreError, match=f"cannot reach .*127.0.0.1:{port}"):
        s3.get("chunks/ab")


def test_credentials_the_server_refuses_are_reported_as_access_denied():
    """A second moto_server that checks every request against its (empty) IAM."""
    with moto_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as url:
        s3 = S3ObjectStore(BUCKET, "p", endpoint_url=url)
        with pytest.raises(StoreError, match="access denied.*AWS_ACCESS_KEY_ID"):
            s3.get("chunks/ab")
        with pytest.raises(StoreError, match="access denied"):
            s3.put("chunks/ab", b"x")


def test_a_store_built_and_read_through_an_s3_url_returns_every_byte(endpoint, tmp_path):
    tree = tmp_path / "tree"
    rng = random.Random(1)
    files = {f"lib/mod{i}.py": rng.randbytes(rng.randrange(0, 3000)) for i in range(40)}
    files["weights/model.bin"] = rng.randbytes(2_500_000)  # 2 loose 1 MiB chunks + a packed tail
    files["etc/hosts"] = b"127.0.0.1 localhost\n"
    write_tree(str(tree), files)
    os.symlink("hosts", tree / "etc" / "hosts.link")
    url = f"s3://{BUCKET}/build{next(_prefixes)}?endpoint={endpoint}"
    with casfs.open_store(url, cache_dir=str(tmp_path / "cache"), memory_bytes=0) as store:
        res = casfs.build(store, str(tree), tag="demo", chunk_size=1 << 20)
        assert len(list(store.objects.list("chunks/"))) == 2 and list(store.objects.list("packs/"))
    with casfs.open_store(url, cache_dir="", memory_bytes=0) as store:
        assert open_objects(store.url).url == store.url  # the URL names the same store
        assert store.tags() == {"demo": res.image_id}
        image = store.open_image("demo")
        assert image.id == res.image_id
        for rel, data in files.items():
            assert image.read(rel) == data, rel
        assert image.read("weights/model.bin", 1_000_000, 200_000) == files["weights/model.bin"][1_000_000:1_200_000]
        assert image.readlink("etc/hosts.link") == "hosts"
        assert sorted(image.listdir("lib")) == sorted(f"mod{i}.py" for i in range(40))
        assert store.open_image(res.image_id[:12]).id == res.image_id


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried_and_the_read_returns_the_right_bytes(s3, proxy, status):
    data = os.urandom(50_000)
    s3.put("chunks/feed", data)
    via = S3ObjectStore(BUCKET, s3.prefix, endpoint_url=proxy.url)
    proxy.fail_next(2, status)
    assert via.get("chunks/feed") == data
    proxy.fail_next(2, status)
    assert via.get_range("chunks/feed", 1000, 5000) == data[1000:6000]
    assert proxy.stats["failed"] == 4


def test_server_errors_beyond_the_attempt_budget_are_a_store_error(s3, proxy):
    s3.put("chunks/feed", b"x")
    via = S3ObjectStore(BUCKET, s3.prefix, endpoint_url=proxy.url, max_attempts=2)
    proxy.fail_next(2, 503)
    with pytest.raises(StoreError, match="503"):
        via.get("chunks/feed")
    assert proxy.stats["failed"] == 2


@pytest.mark.parametrize("cut_at", [100, 64 << 10], ids=["inside-headers", "mid-body"])
def test_a_connection_cut_mid_response_is_retried(s3, proxy, cut_at):
    """A cut inside the headers can look like a complete, empty response to http.client."""
    data = os.urandom(1 << 20)
    s3.put("chunks/cafe", data)
    via = S3ObjectStore(BUCKET, s3.prefix, endpoint_url=proxy.url)
    assert via.contains("chunks/cafe")  # a warm keep-alive connection: the cut hits it mid-use
    proxy.drop_after(cut_at, direction="down")
    assert via.get("chunks/cafe") == data
    proxy.drop_after(cut_at, direction="down")
    assert via.get_range("chunks/cafe", 10, 500_000) == data[10:500_010]
    proxy.drop_after(min(cut_at, 300), direction="down")
    assert via.size("chunks/cafe") == len(data)
    proxy.drop_after(min(cut_at, 100), direction="down")
    assert via.contains("chunks/cafe")
    assert proxy.stats["drops"] == 4


def test_uploads_survive_server_errors(s3, proxy):
    via = S3ObjectStore(BUCKET, s3.prefix, endpoint_url=proxy.url)
    proxy.fail_next(2, 503)
    via.put("chunks/d00d", b"payload" * 1000)
    assert s3.get("chunks/d00d") == b"payload" * 1000
    assert proxy.stats["failed"] == 2
