"""Faults in the tiers below memory, each with real servers on 127.0.0.1 and a fault-injecting
proxy (``tests/support``). Every test asserts that no wrong byte reaches the caller: reads
either return the source's bytes or raise a clean error.

Covered: a cache node cut off mid-transfer and killed with a request in flight; a hung node
(hedging and timeouts); a node serving corrupted bytes; S3 answering 500/503/429 (retries
with backoff, behind a cache server); a full local ssd; every tier down. (EIO through a
mount is covered by the mount tests.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import casfs
from casfs.cacheserver import CacheServer
from casfs.cacheserver.objects import _slot
from casfs.errors import ChunkUnavailable, StoreError
from casfs.index import ChunkRef
from casfs.store import Store
from casfs.layout import object_key as key_of
from casfs.tiers.azcache import AzCacheTier
from casfs.objects.http import HttpObjectStore
from casfs.objects.local import LocalObjectStore

from conftest import write_tree

from tests.support import NGINX, FaultProxy, missing_binary, moto_server, nginx_static

CHUNK = 2 << 20


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(store dir, files, image refs): 60 small files (packed) and a 24 MiB file (12 loose chunks)."""
    d = tmp_path_factory.mktemp("faults")
    files = {f"small/f{i:03d}": os.urandom(700 + 41 * i) for i in range(60)}
    files["big"] = os.urandom(24 << 20)
    write_tree(d / "src", files)
    with casfs.open_store(str(d / "store")) as s:
        casfs.build(s, str(d / "src"), tag="t", chunk_size=CHUNK, progress=False)
        image = s.open_image("t")
        loose = image.chunk_refs(image.lookup("big"))
        packed = image.chunk_refs(image.lookup("small/f007"))
    assert all(r.pack is None for r in loose) and packed[0].pack is not None
    return str(d / "store"), files, loose, packed[0]


def blob_bytes(store_dir: str, ref: ChunkRef) -> bytes:
    """The decoded bytes of ``ref`` straight from the blob directory (the expected answer)."""
    with casfs.open_store(store_dir, memory_bytes=0) as s:
        return s.chunks.get(ref)


def routed_to(tier: AzCacheTier, url: str, refs: list[ChunkRef]) -> list[ChunkRef]:
    """The refs whose first-ranked node is ``url``."""
    return [r for r in refs if tier._ranked(key_of(r))[0].url == url]


def pair_with_primary(built, make_proxy, **tier_args):
    """(proxy, tier, refs): a proxy from ``make_proxy()`` and a tier over [proxy, the direct
    server] such that some of the big file's chunks rank the proxy first (a fresh proxy port
    changes the ranking; 12 chunks almost always give some on the first try)."""
    for _ in range(20):
        proxy, direct_url = make_proxy()
        tier = AzCacheTier([proxy.url + "/", direct_url], **tier_args)
        refs = routed_to(tier, proxy.url + "/", built[2])
        if refs:
            return proxy, tier, refs
        tier.close()
        proxy.close()
    raise AssertionError("no chunk ranked the proxy first in 20 tries")


def host(store_dir: str, tier: AzCacheTier | None = None, **kw) -> Store:
    return Store(LocalObjectStore(store_dir), memory_bytes=0, extra_tiers=[tier] if tier else [], **kw)


def start_cli_server(store_dir: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "casfs.cli.main", "cache-server", "--listen", "127.0.0.1:0",
                             "--store", store_dir, "--memory", "64M"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    m = re.search(r" on http://127\.0\.0\.1:(\d+)/", proc.stdout.readline())
    assert m, "cache-server did not start"
    return proc, int(m.group(1))


def test_a_cache_node_cut_off_mid_transfer_or_killed_mid_request_returns_no_wrong_bytes(built):
    """Node A is a `casfs cache-server` process behind a FaultProxy, node B runs in-process.
    1) The proxy cuts A's reply after 300 KB of a 2 MiB body (what a client sees when a node
    dies mid-body): the tier fails over to B. 2) A is stopped (SIGSTOP) so a request sits in
    flight, then SIGKILLed: the request fails, the tier fails over. A is then skipped."""
    proc, port = start_cli_server(built[0])
    b = CacheServer(LocalObjectStore(built[0])).start()
    try:
        def make():
            return FaultProxy(port).start(), b.url

        proxy, tier, refs = pair_with_primary(built, make, hedge_default=30.0, down_base=30.0)
        with proxy, host(built[0], tier) as s:
            proxy.drop_after(300_000)
            ref = refs[0]
            assert s.chunks.get(ref) == blob_bytes(built[0], ref)
            assert proxy.stats["drops"] == 1
            a = tier.node_status()[0]
            assert a["errors"] == 1 and not a["up"] and "IncompleteRead" in a["last_error"]

        tier2 = AzCacheTier([proxy.url + "/", b.url], hedge=False, timeout=20.0, down_base=30.0)
        with FaultProxy(port, port=proxy.port) as proxy2, host(built[0], tier2) as s:
            os.kill(proc.pid, signal.SIGSTOP)
            got: list = []
            t = threading.Thread(target=lambda: got.append(s.chunks.get(refs[-1])))
            t.start()
            deadline = time.monotonic() + 10
            while proxy2.stats["bytes_up"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proxy2.stats["bytes_up"] > 0  # the request reached the stopped node
            os.kill(proc.pid, signal.SIGKILL)
            t.join(20)
            assert got == [blob_bytes(built[0], refs[-1])]
            for ref in refs:  # A is skipped from now on; every read still right
                assert s.chunks.get(ref) == blob_bytes(built[0], ref)
            a, bnode = tier2.node_status()
            assert not a["up"] and a["errors"] >= 1 and bnode["ok"] >= len(refs)
        tier.close()
        tier2.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        b.close()


def test_a_hung_node_is_bypassed_by_hedged_requests_then_skipped_as_slow(built):
    a = CacheServer(LocalObjectStore(built[0])).start()
    b = CacheServer(LocalObjectStore(built[0])).start()
    try:
        def make():
            return FaultProxy(a.port).start(), b.url

        proxy, tier, refs = pair_with_primary(built, make, timeout=5.0, hedge_default=0.05, fill_hedge_default=0.1,
                                              slow_strikes=2, hedge_ratio=1.0, down_base=30.0)
        with proxy, host(built[0], tier) as s:
            proxy.hang()
            for _ in range(3):  # no memory or ssd tier here: every read asks the AZ tier again
                assert s.chunks.get(refs[0]) == blob_bytes(built[0], refs[0])
            na, nb = tier.node_status()
            assert nb["hedges_won"] >= 1 and na["hedges_lost"] >= 1
            assert not na["up"] and na["down_reason"].startswith("slow")
            assert tier_hits(s)["blob"] == 0  # B answered every time
            proxy.release()
        tier.close()
    finally:
        a.close()
        b.close()


def test_a_hung_node_without_hedging_times_out_and_the_read_fails_over(built):
    a = CacheServer(LocalObjectStore(built[0])).start()
    b = CacheServer(LocalObjectStore(built[0])).start()
    try:
        def make():
            return FaultProxy(a.port).start(), b.url

        proxy, tier, refs = pair_with_primary(built, make, hedge=False, timeout=1.0, down_base=30.0)
        alone = AzCacheTier([proxy.url + "/"], timeout=1.0, down_base=30.0)
        with proxy:
            proxy.hang()
            with host(built[0], tier) as s:
                ref = refs[0]
                assert s.chunks.get(ref) == blob_bytes(built[0], ref)
                na, nb = tier.node_status()
                assert na["timeouts"] >= 1 and not na["up"] and nb["ok"] == 1
            with host(built[0], alone) as s:  # the only node hangs: socket timeout, then blob
                assert s.chunks.get(refs[0]) == blob_bytes(built[0], refs[0])
                assert alone.node_status()[0]["timeouts"] == 1 and tier_hits(s)["blob"] == 1
            proxy.release()
        tier.close()
        alone.close()
    finally:
        a.close()
        b.close()


def tier_hits(store: Store) -> dict[str, int]:
    return {t.name: t.hits for t in store.chunks.stats()}


def corrupt_in_memory(server: CacheServer, key: str, mutate) -> None:
    """Replace a cached object in the server's memory tier (memory hits are served unhashed:
    this is a node with bad RAM or a bug)."""
    data = server.objects.get(key)
    server.cache.memory.put(_slot(key), mutate(data))


@pytest.mark.parametrize("which", ["loose", "packed"])
def test_a_node_serving_flipped_bits_is_caught_by_the_digest_check_and_marked_bad(built, which):
    ref = built[2][0] if which == "loose" else built[3]
    with CacheServer(LocalObjectStore(built[0])) as a:
        def flip(d: bytes) -> bytes:
            bad = bytearray(d)
            off = ref.pack_off if ref.pack is not None else 0
            bad[off + 48 + 10] ^= 0x40  # a payload bit: length and header still look right
            return bytes(bad)

        corrupt_in_memory(a, key_of(ref), flip)
        tier = AzCacheTier([a.url], bad_seconds=60.0)
        with casfs.open_store(built[0], memory_bytes=0) as plain:
            pack_members = plain.open_image("t").index.pack_members
        with host(built[0], tier) as s:
            assert s.chunks.get(ref, pack_members) == blob_bytes(built[0], ref)
            assert s.chunks.verify_failures >= 1
            node = tier.node_status()[0]
            assert not node["up"] and node["down_reason"].startswith("bad bytes")
            assert s.chunks.get(ref, pack_members) == blob_bytes(built[0], ref)  # blob, A is skipped
        tier.close()


@pytest.mark.parametrize("fault", ["short", "foreign"])
def test_a_node_serving_short_or_foreign_frames_is_skipped_and_the_next_node_serves(built, fault):
    """Wrong lengths and frames of another chunk are caught by the tier's own checks (length,
    frame header), so the next node is asked at once."""
    ref, other = built[2][0], built[2][1]
    assert ref.stored_len == other.stored_len
    with CacheServer(LocalObjectStore(built[0])) as a, CacheServer(LocalObjectStore(built[0])) as b:
        tier = AzCacheTier([a.url, b.url], hedge_default=30.0)
        bad = a if tier._ranked(key_of(ref))[0].url == a.url else b
        if fault == "short":
            corrupt_in_memory(bad, key_of(ref), lambda d: d[:-100])
        else:
            corrupt_in_memory(bad, key_of(ref), lambda d: bad.objects.get(key_of(other)))
        with host(built[0], tier) as s:
            assert s.chunks.get(ref) == blob_bytes(built[0], ref)
            assert tier_hits(s)["azcache"] == 1 and s.chunks.verify_failures == 0  # caught in the tier
        status = {n["url"]: n for n in tier.node_status()}
        assert status[bad.url]["corrupt"] == 1 and not status[bad.url]["up"]
        tier.close()


@pytest.fixture(scope="module")
def s3_store(built, tmp_path_factory):
    """The image copied into moto's S3 server; yields the endpoint."""
    pytest.importorskip("boto3")
    if missing_binary(os.path.join(os.path.dirname(sys.executable), "moto_server")):
        pytest.skip("moto_server is not installed")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    from casfs.copy import copy_image
    from casfs.objects.s3 import S3ObjectStore

    with moto_server() as endpoint:
        s3 = S3ObjectStore("casfs-faults", "img", endpoint_url=endpoint, region="us-east-1")
        s3.create_bucket()
        with casfs.open_store(built[0]) as src:
            copy_image(src, Store(s3, memory_bytes=0), "t", progress=False)
        yield endpoint


def test_s3_errors_and_throttling_behind_a_cache_server_are_retried_and_never_served(built, s3_store):
    """moto behind a FaultProxy that answers 503, 500 and 429 (throttling) to chosen requests;
    the cache server fills from S3 through it; botocore retries with backoff."""
    from casfs.objects.s3 import S3ObjectStore

    with FaultProxy(int(s3_store.rsplit(":", 1)[1])) as proxy:
        s3 = S3ObjectStore("casfs-faults", "img", endpoint_url=proxy.url, region="us-east-1")
        with CacheServer(s3) as srv:
            tier = AzCacheTier([srv.url])
            with Store(s3, memory_bytes=0, extra_tiers=[tier]) as s:
                image = s.open_image("t")
                for i, (status, n) in enumerate(((503, 2), (500, 2), (429, 1))):
                    proxy.fail_next(n, status)
                    lo, hi = 3 * i * CHUNK, 3 * (i + 1) * CHUNK  # chunks the server has not seen
                    assert image.read("big", lo, hi - lo) == built[1]["big"][lo:hi]
                    assert proxy.pending_failures == 0
                assert image.read("small/f003") == built[1]["small/f003"]
                assert tier_hits(s)["blob"] == 0  # every chunk came through the cache server
            assert proxy.stats["failed"] == 5
            assert srv.metrics.value("casfs_cache_fill_errors_total") == 0
            tier.close()
        # more failures than attempts: a clean StoreError, not bytes
        short = S3ObjectStore("casfs-faults", "img", endpoint_url=proxy.url, region="us-east-1", max_attempts=2)
        proxy.fail_next(2, 503)
        key = f"chunks/{built[2][0].digest.hex()}"
        with pytest.raises(StoreError, match="503"):
            short.get(key)


def test_a_full_local_ssd_skips_cache_writes_and_reads_still_succeed(built, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode().strip()}")
    try:
        with Store(LocalObjectStore(built[0]), cache_dir=str(mnt / "host"), memory_bytes=0) as s:
            with open(mnt / "filler", "wb") as f:  # the disk is now full
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            image = s.open_image("t")
            for path, data in built[1].items():
                assert image.read(path) == data
            s.chunks.flush()
            assert s.ssd.stats().errors >= 1 and s.ssd.used == 0
        with CacheServer(LocalObjectStore(built[0]), cache_dir=str(mnt / "server")) as srv:
            tier = AzCacheTier([srv.url])
            with host(built[0], tier) as s:
                image = s.open_image("t")
                assert image.read("big") == built[1]["big"]
                assert tier_hits(s)["blob"] == 0
            srv.cache.flush()
            assert srv.cache.ssd.stats().errors >= 1 and srv.cache.ssd.used == 0
            tier.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.skipif(bool(missing_binary(NGINX)), reason=missing_binary(NGINX) or "")
def test_with_every_tier_down_a_read_raises_a_clean_error_and_recovers_when_one_returns(built):
    with nginx_static(built[0]) as origin:
        origin_port = int(origin.rstrip("/").rsplit(":", 1)[1])
        proxy = FaultProxy(origin_port).start()
        node = CacheServer(LocalObjectStore(built[0])).start()
        tier = AzCacheTier([node.url], timeout=0.5, down_base=0.1)
        blob = HttpObjectStore(proxy.url + "/", attempts=2, backoff=0.01, timeout=2.0)
        with Store(blob, memory_bytes=0, extra_tiers=[tier]) as s:
            image = s.open_image("t")  # the index loads while the blob store is up
            node.close()
            proxy.close()
            with pytest.raises(ChunkUnavailable) as e:
                image.read("big", 0, 100)
            assert "azcache" in str(e.value) and "blob" in str(e.value)
            with pytest.raises(ChunkUnavailable):
                image.read("small/f002")
            with FaultProxy(origin_port, port=proxy.port):  # the blob store is back
                assert image.read("big") == built[1]["big"]
                assert image.read("small/f002") == built[1]["small/f002"]
        tier.close()
