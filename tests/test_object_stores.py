"""The object-store contract (``casfs.objects.base.ObjectStore``), written once and run against
every store, each a real one:

    local   ``LocalObjectStore`` over a fresh directory
    s3      ``S3ObjectStore`` against moto's S3 server in its own process (a fresh key prefix
            per test)
    http    ``HttpObjectStore`` against Debian's nginx serving a local store directory
            (read-only: objects are placed by writing that directory)
    oci     ``OciObjectStore`` against Debian's docker-registry (distribution 2.8; a fresh
            repository per test)

and, for the two stores that talk to a network, the failure contract through a real
fault-injecting TCP proxy (``tests.support.FaultProxy``) in front of the server: 5xx answers
retried, an exhausted attempt budget is a ``StoreError``, connections cut inside the headers or
the body retried, a hung server timed out.

What only one store does stays in its own file: S3 multipart uploads, paging, missing buckets
and refused credentials (``test_blob_s3.py``); servers that ignore ranges, listings without an
autoindex and URL prefixes (``test_blob_http.py``). A new object store joins by adding a row to
``_open`` (and, if it is remote, to ``_through``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import shutil
import threading
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casfs.errors import StoreError
from casfs.objects import ObjectStore
from casfs.objects.http import HttpObjectStore
from casfs.objects.local import LocalObjectStore
from conftest import S3_BUCKET as BUCKET
from tests.support import REGISTRY, FaultProxy, free_port, missing_binary, registry_server

_names = itertools.count()
STORES = ["local", "s3", "http", "oci"]
REMOTE = ["s3", "http", "oci"]


@dataclass
class Backend:
    """One store under the contract.

    ``seed(key, data)`` places an object by the backend's own means: through the store itself
    when it is writable, into the directory nginx serves when it is not.
    """

    kind: str
    store: ObjectStore
    seed: Callable[[str, bytes], None]


@pytest.fixture(scope="module")
def oci_registry():
    """A running docker-registry (``tests.support.Registry``); skips when it is not installed."""
    if missing_binary(REGISTRY):
        pytest.skip(f"{missing_binary(REGISTRY)} (apt-get install docker-registry)")
    with registry_server() as r:
        yield r


def _oci(host: str, repo: str, **kw) -> ObjectStore:
    from casfs.objects.oci import OciObjectStore

    return OciObjectStore(host, repo, **{"backoff": 0.01, **kw})


def _s3(endpoint: str, prefix: str, **kw) -> ObjectStore:
    from casfs.objects.s3 import S3ObjectStore

    return S3ObjectStore(BUCKET, prefix, endpoint_url=endpoint, **kw)


@contextlib.contextmanager
def _open(kind: str, request, tmp_path) -> Iterator[Backend]:
    """A fresh, empty namespace of store ``kind``."""
    name = f"c{next(_names)}"
    if kind == "local":
        store = LocalObjectStore(str(tmp_path / name))
        yield Backend(kind, store, store.put)
    elif kind == "s3":
        store = _s3(request.getfixturevalue("s3_endpoint"), name)
        yield Backend(kind, store, store.put)
    elif kind == "http":
        root, url = request.getfixturevalue("web_root")
        served = LocalObjectStore(os.path.join(root, name))
        store = HttpObjectStore(url + name + "/", backoff=0.01)
        try:
            yield Backend(kind, store, served.put)
        finally:
            store.close()
            shutil.rmtree(served.root, ignore_errors=True)
    elif kind == "oci":
        store = _oci(request.getfixturevalue("oci_registry").host, f"contract/{name}")
        try:
            yield Backend(kind, store, store.put)
        finally:
            store.close()
    else:
        raise AssertionError(kind)


@pytest.fixture(params=STORES)
def backend(request, tmp_path) -> Iterator[Backend]:
    with _open(request.param, request, tmp_path) as b:
        yield b


@pytest.fixture(params=[k for k in STORES if k != "http"])
def writable(request, tmp_path) -> Iterator[Backend]:
    with _open(request.param, request, tmp_path) as b:
        assert not b.store.read_only
        yield b


HEX = [os.urandom(32).hex() for _ in range(8)]


# -- reads -----------------------------------------------------------------------------------


def test_an_object_reads_back_whole_by_range_and_by_size(backend):
    data = os.urandom(3000)
    backend.seed(f"chunks/{HEX[0]}", data)
    s = backend.store
    assert s.get(f"chunks/{HEX[0]}") == data
    assert s.contains(f"chunks/{HEX[0]}")
    assert s.size(f"chunks/{HEX[0]}") == 3000
    assert s.get_range(f"chunks/{HEX[0]}", 0, 3000) == data
    assert s.get_range(f"chunks/{HEX[0]}", 2990, 100) == data[2990:]  # short at the end
    assert s.get_range(f"chunks/{HEX[0]}", 3000, 10) == b""  # at the end, like pread
    assert s.get_range(f"chunks/{HEX[0]}", 5000, 10) == b""  # past it


def test_an_empty_object_is_present_with_size_zero(backend):
    backend.seed("tags/empty", b"")
    s = backend.store
    assert s.contains("tags/empty")
    assert s.get("tags/empty") == b""
    assert s.size("tags/empty") == 0
    assert s.get_range("tags/empty", 0, 10) == b""


def test_a_large_object_reads_back_identical_whole_and_in_ranges(backend):
    data = random.Random(5).randbytes(5 << 20)
    backend.seed(f"packs/{HEX[1]}", data)
    s = backend.store
    assert s.size(f"packs/{HEX[1]}") == len(data)
    assert s.get(f"packs/{HEX[1]}") == data
    for off in (0, (1 << 20) - 7, (4 << 20) + 3):
        assert s.get_range(f"packs/{HEX[1]}", off, 1 << 20) == data[off:off + (1 << 20)]


def test_get_range_returns_exactly_the_bytes_a_slice_would(backend):
    data = random.Random(7).randbytes(1000)
    backend.seed(f"packs/{HEX[2]}", data)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(offset=st.integers(0, 1100), length=st.integers(0, 1100))
    def check(offset, length):
        assert backend.store.get_range(f"packs/{HEX[2]}", offset, length) == data[offset:offset + length]

    check()


def test_a_missing_object_is_a_key_error_for_every_read(backend):
    s = backend.store
    key = f"chunks/{HEX[3]}"
    for read in (lambda: s.get(key), lambda: s.get_range(key, 0, 10), lambda: s.get_range(key, 0, 0),
                 lambda: s.size(key)):
        with pytest.raises(KeyError):
            read()
    assert not s.contains(key)


def test_negative_ranges_are_a_value_error(backend):
    backend.seed(f"chunks/{HEX[4]}", b"abc")
    for off, n in ((-1, 2), (0, -1)):
        with pytest.raises(ValueError):
            backend.store.get_range(f"chunks/{HEX[4]}", off, n)


@pytest.mark.parametrize("bad", ["../x", "chunks/../x", "chunks/", "Chunks/ab", "chunks/a/b", "/chunks/ab",
                                 "chunks", "chunks/../../etc/passwd"])
def test_keys_that_could_escape_the_namespace_are_a_value_error(backend, bad):
    s = backend.store
    for op in (lambda: s.get(bad), lambda: s.get_range(bad, 0, 1), lambda: s.contains(bad),
               lambda: s.size(bad)):
        with pytest.raises(ValueError):
            op()


def test_list_yields_the_keys_of_one_kind_in_key_order(backend):
    names = sorted(os.urandom(8).hex() for _ in range(7))
    for n in names:
        backend.seed(f"chunks/{n}", b"c")
    backend.seed("tags/latest", b"id\n")
    backend.seed(f"packs/{HEX[5]}", b"p")
    s = backend.store
    assert list(s.list("chunks/")) == [f"chunks/{n}" for n in names]
    assert list(s.list("tags/")) == ["tags/latest"]
    assert list(s.list("packs/")) == [f"packs/{HEX[5]}"]
    assert list(s.list("profiles/")) == []  # a kind never written


def test_concurrent_readers_each_get_their_own_bytes(backend):
    """Threads share the store's connections (keep-alive pools, boto3's client): no reader may
    see another's answer."""
    objects = {f"chunks/{os.urandom(32).hex()}": os.urandom(20_000 + 1000 * i) for i in range(8)}
    for k, v in objects.items():
        backend.seed(k, v)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20):
            k = rng.choice(list(objects))
            off = rng.randrange(0, 20_000)
            if backend.store.get_range(k, off, 777) != objects[k][off:off + 777]:
                errors.append(f"{k} at {off}")
            if backend.store.get(k) != objects[k]:
                errors.append(k)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert errors == []


# -- writes ----------------------------------------------------------------------------------


def test_put_replaces_an_object_and_delete_removes_it(writable):
    s = writable.store
    key = f"chunks/{HEX[6]}"
    s.put(key, b"first")
    s.put(key, b"replaced")
    assert s.get(key) == b"replaced" and s.size(key) == 8
    s.delete(key)
    assert not s.contains(key)
    with pytest.raises(KeyError):
        s.get(key)
    s.delete(key)  # deleting a missing object is not an error


def test_writes_of_invalid_keys_are_a_value_error_and_store_nothing(writable):
    for bad in ("../x", "chunks/a/b", "tags/"):
        with pytest.raises(ValueError):
            writable.store.put(bad, b"x")
    assert list(writable.store.list("chunks/")) == [] and list(writable.store.list("tags/")) == []


def test_a_read_only_store_refuses_put_and_delete_and_changes_nothing(request, tmp_path):
    with _open("http", request, tmp_path) as b:
        b.seed("tags/web", b"id\n")
        assert b.store.read_only
        with pytest.raises(StoreError, match="read-only"):
            b.store.put("tags/x", b"1")
        with pytest.raises(StoreError, match="read-only"):
            b.store.delete("tags/web")
        assert b.store.get("tags/web") == b"id\n" and not b.store.contains("tags/x")


# -- a failing backend -----------------------------------------------------------------------


@pytest.fixture(params=STORES)
def failing(request, tmp_path) -> tuple[ObjectStore, str]:
    """(a store whose backend fails, a pattern its errors must match: where, and for a remote
    store how many attempts and what to check). Remote: nothing listens at its endpoint.
    Local: its directory was replaced by a file (as root, permissions do not stop a read; this
    is the nearest a test gets to a failing disk)."""
    kind = request.param
    if kind == "local":
        store = LocalObjectStore(str(tmp_path / "gone"))
        shutil.rmtree(store.root)
        open(store.root, "wb").close()
        return store, re.escape(store.root)
    port = free_port()  # nothing listens there: connections are refused
    if kind == "s3":
        request.getfixturevalue("s3_endpoint")  # skips without boto3/moto; sets dummy credentials
        store = _s3(f"http://127.0.0.1:{port}", "p", max_attempts=2, connect_timeout=1.0)
    elif kind == "oci":
        store = _oci(f"127.0.0.1:{port}", "p", attempts=2, timeout=1.0)
    else:
        store = HttpObjectStore(f"http://127.0.0.1:{port}/", attempts=2, backoff=0.01, timeout=1.0)
    return store, rf"127\.0\.0\.1:{port}\S* .*after 2 attempts.*the server is up"


def test_a_failing_backend_is_a_store_error_naming_it_never_a_missing_object(failing):
    store, where = failing
    key = f"chunks/{HEX[7]}"
    ops = (lambda: store.get(key), lambda: store.get_range(key, 0, 10), lambda: store.size(key),
           lambda: store.put(key, b"x"))
    for op in ops:
        with pytest.raises(StoreError, match="read-only" if store.read_only and op is ops[-1] else where):
            op()


# -- the failure contract of remote stores, through a fault-injecting proxy ------------------------


@dataclass
class Remote:
    """A remote store written directly and read through a FaultProxy."""

    kind: str
    direct: Backend
    proxy: FaultProxy
    via: Callable[..., ObjectStore]  # via(attempts=, timeout=) -> the store through the proxy


@pytest.fixture(params=REMOTE)
def remote(request, tmp_path) -> Iterator[Remote]:
    with _open(request.param, request, tmp_path) as b:
        target = {"s3": lambda: request.getfixturevalue("s3_endpoint"),
                  "http": lambda: request.getfixturevalue("web_root")[1],
                  "oci": lambda: "http://" + request.getfixturevalue("oci_registry").host}[b.kind]()
        with FaultProxy(urlsplit(target).port) as proxy:
            opened: list[ObjectStore] = []

            def via(attempts: int = 5, timeout: float = 10.0) -> ObjectStore:
                if b.kind == "s3":
                    s = _s3(proxy.url, b.store.prefix, max_attempts=attempts, connect_timeout=timeout,
                            read_timeout=timeout)
                elif b.kind == "oci":
                    s = _oci(f"127.0.0.1:{proxy.port}", b.store.registry.repo, attempts=attempts,
                             timeout=timeout)
                else:
                    s = HttpObjectStore(proxy.url + urlsplit(b.store.url).path, attempts=attempts,
                                        backoff=0.01, timeout=timeout)
                opened.append(s)
                return s

            yield Remote(b.kind, b, proxy, via)
            for s in opened:
                if hasattr(s, "close"):
                    s.close()


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried_and_every_read_returns_the_right_bytes(remote, status):
    data = os.urandom(50_000)
    remote.direct.seed(f"chunks/{HEX[0]}", data)
    s = remote.via()
    remote.proxy.fail_next(2, status)
    assert s.get(f"chunks/{HEX[0]}") == data
    remote.proxy.fail_next(2, status)
    assert s.get_range(f"chunks/{HEX[0]}", 1000, 5000) == data[1000:6000]
    remote.proxy.fail_next(2, status)
    assert s.contains(f"chunks/{HEX[0]}")
    remote.proxy.fail_next(2, status)
    assert s.size(f"chunks/{HEX[0]}") == len(data)
    assert remote.proxy.stats["failed"] == 8


def test_server_errors_beyond_the_attempt_budget_are_a_store_error_and_the_next_read_works(remote):
    remote.direct.seed("tags/web", b"id\n")
    s = remote.via(attempts=3)
    remote.proxy.fail_next(3, 503)
    with pytest.raises(StoreError, match={"s3": "503", "http": "after 3 attempts.*503",
                                           "oci": "after 3 attempts.*503"}[remote.kind]):
        s.get("tags/web")
    assert remote.proxy.stats["failed"] == 3 and remote.proxy.pending_failures == 0
    assert s.get("tags/web") == b"id\n"


@pytest.mark.parametrize("cut_at", [60, 64 << 10], ids=["inside-headers", "mid-body"])
def test_a_connection_cut_mid_response_is_retried(remote, cut_at):
    """A cut inside the headers can look like a complete, empty response to http.client."""
    data = os.urandom(1 << 20)
    key = f"chunks/{HEX[1]}"
    remote.direct.seed(key, data)
    s = remote.via()
    assert s.contains(key)  # a warm keep-alive connection: the cut hits it mid-use
    remote.proxy.drop_after(cut_at)
    assert s.get(key) == data
    remote.proxy.drop_after(cut_at)
    assert s.get_range(key, 7, 500_000) == data[7:500_007]
    remote.proxy.drop_after(min(cut_at, 100))
    assert s.size(key) == len(data)
    remote.proxy.drop_after(min(cut_at, 100))
    assert s.contains(key)
    assert remote.proxy.stats["drops"] == 4


def test_a_hung_server_times_out_into_a_store_error_and_recovers(remote):
    remote.direct.seed("tags/web", b"id\n")
    s = remote.via(attempts=2, timeout=0.3)
    remote.proxy.hang()
    with pytest.raises(StoreError, match="after 2 attempts.*[Tt]ime"):
        s.get("tags/web")
    remote.proxy.release()
    assert s.get("tags/web") == b"id\n"
