"""What only the S3 store does, against a real S3-compatible server (moto_server in its own
process): key prefixes, paged listings, multipart uploads, missing buckets, refused
credentials, uploads through 5xx answers (injected by a real TCP proxy,
``tests.support.FaultProxy``), and a store built and read through an ``s3://`` URL.

The contract every object store keeps (reads, ranges, missing keys, invalid keys, listing,
put/delete, a failing backend, retried 5xx answers, cut connections, a hung server) is
``tests/test_object_stores.py``, run against this store too.
"""

from __future__ import annotations

import itertools
import os
import random
import re
from urllib.parse import urlsplit

import pytest

import casfs
from casfs.urls import open_objects
from casfs.errors import StoreError
from tests.support import MOTO_SERVER, FaultProxy, aws_test_environment, missing_binary, moto_server
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
    with aws_test_environment():
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


def test_list_yields_the_keys_of_one_prefix_only_not_of_a_prefix_that_extends_it(endpoint, s3):
    other = S3ObjectStore(BUCKET, s3.prefix + "x", endpoint_url=endpoint)  # a prefix of a prefix
    names = sorted(os.urandom(8).hex() for _ in range(5))
    for n in names:
        s3.put(f"chunks/{n}", b"c")
    other.put("chunks/ffff", b"o")
    assert list(s3.list("chunks/")) == [f"chunks/{n}" for n in names]
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
    files["weights/model.bin"] = rng.randbytes(2_500_000)  # 3 loose chunks (2 of 1 MiB and the tail)
    files["etc/hosts"] = b"127.0.0.1 localhost\n"
    write_tree(str(tree), files)
    os.symlink("hosts", tree / "etc" / "hosts.link")
    url = f"s3://{BUCKET}/build{next(_prefixes)}?endpoint={endpoint}"
    with casfs.open_store(url, cache_dir=str(tmp_path / "cache"), memory_bytes=0) as store:
        res = casfs.build(store, str(tree), tag="demo", chunk_size=1 << 20)
        assert len(list(store.objects.list("chunks/"))) == 3 and list(store.objects.list("packs/"))
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


def test_uploads_survive_server_errors(s3, proxy):
    via = S3ObjectStore(BUCKET, s3.prefix, endpoint_url=proxy.url)
    proxy.fail_next(2, 503)
    via.put("chunks/d00d", b"payload" * 1000)
    assert s3.get("chunks/d00d") == b"payload" * 1000
    assert proxy.stats["failed"] == 2
