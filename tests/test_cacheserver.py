"""The cache server over real sockets on 127.0.0.1: paths, ranges, verification, single flight,
auth, metrics, the HTTP parser's limits, peer mode and the CLI."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import casfs
from casfs.cacheserver import CacheServer, parse_listen, parse_range, verify_object
from casfs.errors import CorruptChunk, StoreError
from casfs.objects.local import LocalObjectStore

from conftest import write_tree

CHUNK = 2 << 20


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store with small files (in packs) and a 5 MiB file (loose chunks); returns
    (store dir, source dir, {kind: [keys]})."""
    d = tmp_path_factory.mktemp("cs")
    files = {f"small/f{i:03d}": os.urandom(1000 + 37 * i) for i in range(60)}
    files["big"] = os.urandom(5 << 20)
    write_tree(d / "src", files)
    with casfs.open_store(str(d / "store")) as s:
        casfs.build(s, str(d / "src"), tag="t", chunk_size=CHUNK, progress=False)
    objs = LocalObjectStore(str(d / "store"))
    keys = {k: list(objs.list(k + "/")) for k in ("chunks", "packs", "indexes")}
    assert keys["chunks"] and keys["packs"] and keys["indexes"]
    return str(d / "store"), str(d / "src"), keys


@pytest.fixture
def server(built):
    srv = CacheServer(LocalObjectStore(built[0]), memory_bytes=64 << 20).start()
    yield srv
    srv.close()


def request(url: str, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = url.split("//")[1].rstrip("/").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def fanout(key: str) -> str:
    kind, _, name = key.partition("/")
    return f"/{kind}/{name[:2]}/{name}"


def test_every_object_read_through_the_server_equals_the_blob_object(built, server):
    objs = LocalObjectStore(built[0])
    for kind, keys in built[2].items():
        for key in keys:
            status, h, body = request(server.url, "GET", fanout(key))
            assert status == 200 and body == objs.get(key)
            assert h["etag"] == f'"{key.partition("/")[2]}"' and "immutable" in h["cache-control"]
    key = built[2]["chunks"][0]
    status, h, body = request(server.url, "GET", "/" + key)  # the flat layout
    assert status == 200 and body == objs.get(key) and h["x-casfs-source"] == "memory"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_range_of_a_pack_equals_the_same_slice_of_the_blob_object(built, server, data):
    key = built[2]["packs"][0]
    whole = LocalObjectStore(built[0]).get(key)
    n = len(whole)
    a = data.draw(st.integers(0, n + 5))
    form = data.draw(st.sampled_from(["a-b", "a-", "-n"]))
    if form == "a-b":
        b = data.draw(st.integers(a, n + 10))
        header, want = f"bytes={a}-{b}", (a, min(n, b + 1))
    elif form == "a-":
        header, want = f"bytes={a}-", (a, n)
    else:
        header, want = f"bytes=-{a}", (max(0, n - a), n) if a else None
    status, h, body = request(server.url, "GET", fanout(key), {"Range": header})
    if want is None or want[0] >= n:
        assert status == 416 and h["content-range"] == f"bytes */{n}"
    else:
        assert status == 206 and body == whole[want[0]:want[1]]
        assert h["content-range"] == f"bytes {want[0]}-{want[1] - 1}/{n}"


def test_multi_range_and_malformed_range_requests_get_the_whole_object():
    assert parse_range("bytes=0-1,5-6", 10) is None
    assert parse_range("bytes=5-2", 10) is None
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=-", 10) is None
    assert parse_range("bytes=2-", 10) == (2, 10)


@given(st.text(max_size=300), st.integers(0, 1 << 40))
@settings(max_examples=300, deadline=None)
def test_any_range_header_parses_to_a_range_inside_the_object_or_none_or_416(header, size):
    got = parse_range(header, size)
    assert got is None or got == "unsatisfiable" or (0 <= got[0] < got[1] <= size)


def test_a_range_with_thousands_of_digits_is_no_server_error(built, server):
    """``Range: bytes=0-<5,000 nines>`` made int() raise (Python's 4,300-digit limit): a 500
    and a traceback in the server's log; now such numbers mean "past the end"."""
    key = built[2]["chunks"][0]
    size = len(LocalObjectStore(built[0]).get(key))
    assert parse_range("bytes=0-" + "9" * 5000, size) == (0, size)
    assert parse_range("bytes=" + "9" * 5000 + "-", size) == "unsatisfiable"
    assert parse_range("bytes=-" + "9" * 5000, size) == (0, size)
    status, headers, body = request(server.url, "GET", fanout(key), {"Range": "bytes=0-" + "9" * 5000})
    assert status == 206 and len(body) == size


def test_concurrent_misses_for_one_object_cause_one_blob_fetch(built):
    """The blob store is a real LocalObjectStore that counts gets and holds the first one until
    every other request is waiting on it (so the requests really overlap)."""
    key = built[2]["chunks"][0]
    n = 8
    release = threading.Event()

    class CountingStore(LocalObjectStore):
        gets = 0

        def get(self, k):
            CountingStore.gets += 1
            release.wait(10)
            return super().get(k)

    srv = CacheServer(CountingStore(built[0])).start()
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(request(srv.url, "GET", fanout(key))))
                   for _ in range(n)]
        for t in threads:
            t.start()
        for _ in range(1000):
            if srv.metrics.value("casfs_cache_fill_waiters_total") >= n - 1:
                break
            threading.Event().wait(0.01)
        release.set()
        for t in threads:
            t.join(10)
        want = LocalObjectStore(built[0]).get(key)
        assert [r[0] for r in results] == [200] * n and all(r[2] == want for r in results)
        assert CountingStore.gets == 1
        assert srv.metrics.value("casfs_cache_misses_total") == 1
    finally:
        srv.close()


def test_a_corrupt_object_from_the_blob_store_is_refused_and_never_cached(built, tmp_path):
    objs = LocalObjectStore(str(tmp_path / "copy"))
    key = built[2]["chunks"][0]
    good = LocalObjectStore(built[0]).get(key)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    objs.put(key, bytes(bad))
    with CacheServer(objs) as srv:
        status, _, body = request(srv.url, "GET", fanout(key))
        assert status == 502 and b"corrupt" in body
        assert srv.metrics.value("casfs_cache_verify_failures_total", source="blob") == 1
        objs.put(key, good)  # the store is repaired: the bad bytes were not kept anywhere
        status, _, body = request(srv.url, "GET", fanout(key))
        assert status == 200 and body == good


def test_a_rotten_ssd_cache_file_is_dropped_and_refetched_from_the_blob_store(built, tmp_path):
    key = built[2]["packs"][0]
    good = LocalObjectStore(built[0]).get(key)
    cache = str(tmp_path / "cache")
    with CacheServer(LocalObjectStore(built[0]), cache_dir=cache) as srv:
        assert request(srv.url, "GET", fanout(key))[2] == good
        srv.cache.flush()
    files = [os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs]
    assert len(files) == 1
    with open(files[0], "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    with CacheServer(LocalObjectStore(built[0]), cache_dir=cache) as srv:  # fresh memory tier
        status, h, body = request(srv.url, "GET", fanout(key))
        assert status == 200 and body == good and h["x-casfs-source"] == "blob"
        assert srv.metrics.value("casfs_cache_verify_failures_total", source="ssd") == 1
        srv.cache.flush()
    with CacheServer(LocalObjectStore(built[0]), cache_dir=cache) as srv:
        status, h, body = request(srv.url, "GET", fanout(key))
        assert body == good and h["x-casfs-source"] == "ssd"


def test_verify_object_checks_packs_and_frames_against_their_names(built):
    objs = LocalObjectStore(built[0])
    for kind in ("chunks", "packs", "indexes"):
        key = built[2][kind][0]
        data = objs.get(key)
        verify_object(key, data)
        with pytest.raises(CorruptChunk):
            verify_object(key, data[:-1])
    with pytest.raises(ValueError):
        verify_object("tags/latest", b"x")


def test_unknown_paths_missing_objects_and_other_methods_are_refused(server):
    missing = "ab" * 32
    assert request(server.url, "GET", f"/chunks/ab/{missing}")[0] == 404
    assert request(server.url, "HEAD", f"/chunks/ab/{missing}")[0] == 404
    assert request(server.url, "GET", f"/chunks/cd/{missing}")[0] == 404  # fan-out mismatch
    assert request(server.url, "GET", "/tags/latest")[0] == 404
    assert request(server.url, "GET", "/chunks/../../etc/passwd")[0] == 404
    status, h, _ = request(server.url, "DELETE", f"/chunks/ab/{missing}")
    assert status == 405 and h["allow"] == "GET, HEAD"


def test_only_if_cached_requests_never_fill_and_get_504_until_the_object_is_cached(built, server):
    key = fanout(built[2]["packs"][0])
    oic = {"Cache-Control": "only-if-cached", "Range": "bytes=0-99"}
    assert request(server.url, "GET", key, oic)[0] == 504
    assert server.metrics.value("casfs_cache_misses_total") == 0
    assert request(server.url, "GET", key)[0] == 200
    status, h, body = request(server.url, "GET", key, oic)
    assert status == 206 and body == LocalObjectStore(built[0]).get(built[2]["packs"][0])[:100]


def test_head_reports_the_size_without_filling_the_cache(built, server):
    key = built[2]["chunks"][0]
    status, h, body = request(server.url, "HEAD", fanout(key))
    assert status == 200 and body == b"" and int(h["content-length"]) == LocalObjectStore(built[0]).size(key)
    assert server.metrics.value("casfs_cache_misses_total") == 0


def test_a_token_is_required_when_the_server_has_one(built):
    with CacheServer(LocalObjectStore(built[0]), token="s3cret") as srv:
        key = fanout(built[2]["chunks"][0])
        assert request(srv.url, "GET", "/health")[0] == 200
        status, h, _ = request(srv.url, "GET", key)
        assert status == 401 and h["www-authenticate"].startswith("Bearer")
        assert request(srv.url, "GET", key, {"Authorization": "Bearer wrong"})[0] == 401
        assert request(srv.url, "GET", "/metrics")[0] == 401
        assert request(srv.url, "GET", key, {"Authorization": "Bearer s3cret"})[0] == 200


def test_listening_off_loopback_without_a_token_is_refused(built, monkeypatch):
    monkeypatch.delenv("CASFS_CACHE_TOKEN", raising=False)
    with pytest.raises(StoreError, match="token"):
        CacheServer(LocalObjectStore(built[0]), host="0.0.0.0")
    assert parse_listen("[::1]:0") == ("::1", 0)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("8470")


def test_metrics_are_prometheus_text_counting_hits_misses_and_bytes(built, server):
    key = fanout(built[2]["chunks"][0])
    n = len(request(server.url, "GET", key)[2])
    request(server.url, "GET", key)
    status, h, body = request(server.url, "GET", "/metrics")
    assert status == 200 and h["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) casfs_cache_\w+ ", line)
            continue
        m = re.match(r'^(casfs_cache_\w+)(\{[^}]*\})? (\S+)$', line)
        assert m, line
        values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    assert values["casfs_cache_misses_total"] == 1
    assert values['casfs_cache_hits_total{tier="memory"}'] == 1
    assert values["casfs_cache_bytes_sent_total"] == 2 * n
    assert values['casfs_cache_request_seconds_bucket{le="+Inf"}'] == 2
    assert values['casfs_cache_tier_bytes{tier="memory"}'] == n


def raw_exchange(url: str, payload: bytes) -> bytes:
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        out = b""
        while True:
            data = s.recv(65536)
            if not data:
                return out
            out += data


def test_pipelined_requests_are_answered_in_order_on_one_connection(server):
    req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    out = raw_exchange(server.url, req * 3 + b"GET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 3 and out.rstrip().endswith(b"objects live at /<chunks|packs|indexes>/<hh>/<hex>")


@pytest.mark.parametrize("payload,status", [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET /health HTTP/2.0\r\n\r\n", b"505"),
    (b"GET /health HTTP/1.1\r\nno-colon-here\r\n\r\n", b"400"),
    (b"GET /health HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", b"400"),
    (b"GET /health HTTP/1.1\r\n" + b"X-Pad: " + b"a" * (20 << 10) + b"\r\n\r\n", b"431"),
    (b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 120 + b"\r\n", b"431"),
])
def test_malformed_or_oversized_requests_get_an_error_and_the_connection_closes(server, payload, status):
    out = raw_exchange(server.url, payload)
    assert out.startswith(b"HTTP/1.1 " + status) and b"Connection: close" in out


def test_a_server_over_a_hosts_own_cache_dir_serves_the_loose_chunks_that_host_holds(built, tmp_path):
    """Peer mode: the host's Store caches frames in DIR/chunks; a server whose --cache-dir is DIR
    serves them though its own blob store (here an empty one) lacks them."""
    cache_dir = str(tmp_path / "hostcache")
    with casfs.open_store(built[0], cache_dir=cache_dir) as host:
        assert host.open_image("t").read("big") == open(os.path.join(built[1], "big"), "rb").read()
        host.chunks.flush()
    with CacheServer(LocalObjectStore(str(tmp_path / "empty")), cache_dir=cache_dir) as srv:
        for key in built[2]["chunks"]:
            status, h, body = request(srv.url, "GET", fanout(key))
            assert status == 200 and h["x-casfs-source"] == "host"
            assert body == LocalObjectStore(built[0]).get(key)
        assert request(srv.url, "GET", fanout(built[2]["packs"][0]))[0] == 404


def test_the_cache_server_command_serves_until_sigterm(built):
    proc = subprocess.Popen([sys.executable, "-m", "casfs.cli.main", "cache-server", "--listen", "127.0.0.1:0",
                             "--store", built[0], "--memory", "16M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
        assert m, line + proc.stderr.read()
        key = built[2]["chunks"][0]
        status, _, body = request(m.group(1), "GET", fanout(key))
        assert status == 200 and body == LocalObjectStore(built[0]).get(key)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert "stopped" in proc.stderr.read()


def test_the_cache_server_command_refuses_a_public_address_without_a_token(built):
    env = {k: v for k, v in os.environ.items() if k != "CASFS_CACHE_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "casfs.cli.main", "cache-server", "--listen", "0.0.0.0:0",
                        "--store", built[0]], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1 and "without a token" in r.stderr
