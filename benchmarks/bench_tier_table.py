"""The tier table, measured: read latency and throughput of memory, ssd, AZ cache and blob
tiers, a sequential read of a large file through each, the hit-rate split of repeated starts
across three hosts sharing a cache server, and the cache server's HTTP stack against the
alternatives.

Links are emulated with user-space delay relays (``tests.support.FaultProxy`` in their own
processes): this kernel has no netem. Settings (defaults): AZ link 1 ms RTT (0.5 ms each
way), blob link 100 ms RTT (50 ms each way) plus one RTT per new connection, no rate caps.
The blob store is Debian's nginx serving the store directory (``http://`` store) behind the
blob relay; the AZ cache is ``casfs cache-server`` (a separate process, filled through the blob
relay) behind the AZ relay; a second AZ row uses nginx ``proxy_cache`` instead. The host is
this process: a ``casfs.Store`` with only the tier under test above the blob store.

Usage::

    python -m benchmarks.bench_tier_table [--seq-mib 1024] [--plot docs/tier_table.png]
    python -m benchmarks.bench_tier_table --http-stacks       # only the HTTP stack comparison

Results: ``benchmarks/results/tier_table.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from benchmarks._common import GiB, MiB, ROOT, Samples, describe_machine, machine_info, table, write_results


import casfs
from casfs.index import ChunkRef
from casfs.layout import object_key, relpath
from casfs.store import Store
from casfs.tiers.azcache import AzCacheTier
from casfs.objects.http import HttpObjectStore
from casfs.objects.local import LocalObjectStore
from tests.support import NGINX, missing_binary, nginx_cache, nginx_static

PY = sys.executable
LAMBDA_SPLIT = {"local": 67.0, "az": 32.0, "s3": 0.1}  # AWS Lambda container loader (paper), % of chunk reads

_RELAY = """
import sys, time
from tests.support import FaultProxy
p = FaultProxy({port}, http=False).start()
p.set_latency(up={one_way}, down={one_way}, connect={connect})
print(p.port, flush=True)
sys.stdin.read()
p.close()
"""


@contextlib.contextmanager
def relay(target_port: int, rtt_s: float) -> Iterator[str]:
    """A delay relay process in front of ``target_port``: RTT/2 each way, one RTT per new
    connection. Yields ``http://127.0.0.1:PORT``."""
    code = _RELAY.format(port=target_port, one_way=rtt_s / 2, connect=rtt_s)
    proc = subprocess.Popen([PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)  # -c imports from the cwd: tests.support
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stdin.close()
        proc.wait(10)


@contextlib.contextmanager
def cache_server(store_url: str, memory: str = "3G", extra: list[str] | None = None) -> Iterator[str]:
    """``casfs cache-server`` in its own process; yields its URL."""
    proc = subprocess.Popen([PY, "-m", "casfs.cli.main", "cache-server", "--listen", "127.0.0.1:0",
                             "--store", store_url, "--memory", memory, *(extra or [])],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        m = re.search(r" on (http://127\.0\.0\.1:\d+/)", proc.stdout.readline())
        if not m:
            raise RuntimeError("cache-server did not start")
        _PIDS[m.group(1)] = proc.pid
        yield m.group(1)
    finally:
        proc.terminate()
        proc.wait(10)


_PIDS: dict[str, int] = {}  # server URL -> its process id (for CPU accounting)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


# -- the workload ------------------------------------------------------------------------------


def build_workload(work: str, seq_mib: int, n_small: int) -> tuple[str, dict]:
    """A store with ``n_small`` 4 KiB files (packed), and a ``seq_mib`` MiB file of random
    bytes (4 MiB loose chunks). Returns (store dir, refs by kind)."""
    src = os.path.join(work, "src")
    os.makedirs(os.path.join(src, "small"), exist_ok=True)
    for i in range(n_small):
        with open(os.path.join(src, "small", f"f{i:05d}"), "wb") as f:
            f.write(os.urandom(4096))
    with open(os.path.join(src, "big"), "wb") as f:
        for _ in range(seq_mib):
            f.write(os.urandom(MiB))
    store_dir = os.path.join(work, "store")
    t0 = time.perf_counter()
    with casfs.open_store(store_dir) as s:
        r = casfs.build(s, src, tag="bench", progress=False)
        image = s.open_image("bench")
        small = [image.chunk_refs(image.lookup(f"small/f{i:05d}"))[0] for i in range(n_small)]
        big = image.chunk_refs(image.lookup("big"))
    shutil.rmtree(src)
    print(f"built {r.entries} entries, {seq_mib} MiB file in {time.perf_counter() - t0:.1f} s", flush=True)
    return store_dir, {"4k": small, "4m": big}


# -- measurements ------------------------------------------------------------------------------


def latency(get: Callable[[ChunkRef], int], refs: list[ChunkRef], n: int) -> Samples:
    s = Samples()
    for r in refs[:n]:
        t0 = time.perf_counter()
        get(r)
        s.add(time.perf_counter() - t0)
    return s


def throughput(get: Callable[[ChunkRef], int], refs: list[ChunkRef], threads: int) -> tuple[float, float]:
    """(reads/s, bytes/s) of ``refs`` read by ``threads`` threads."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(get, refs))
    dt = time.perf_counter() - t0
    return len(refs) / dt, total / dt


def sequential(store: Store, size: int, step: int = 32 * MiB) -> float:
    """bytes/s of reading image file "big" front to back in ``step`` reads (the store fetches
    the chunks of each read concurrently)."""
    image = store.open_image("bench")
    entry = image.lookup("big")
    t0 = time.perf_counter()
    off = 0
    while off < size:
        off += len(image.read_entry(entry, off, step))
    return size / (time.perf_counter() - t0)


def drop_page_cache(root: str) -> None:
    """Evict the files under ``root`` from the page cache (posix_fadvise DONTNEED), so the ssd
    row reads the disk; nothing else is dropped."""
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


_local = threading.local()


def consumer(store: Store) -> Callable[[ChunkRef], int]:
    """A reader of chunks that copies each into its own (warm, reused) buffer, as a FUSE reply
    or a pread would: a memory-tier hit then costs a memcpy, not a reference. Returns bytes."""
    def get(ref: ChunkRef) -> int:
        data = store.chunks.get(ref)
        buf = getattr(_local, "buf", None)
        if buf is None or len(buf) < len(data):
            buf = _local.buf = bytearray(max(len(data), 4 * MiB))
        buf[:len(data)] = data
        return len(data)
    return get


def measure_tier(name: str, store: Store, refs: dict, counts: dict, seq_bytes: int,
                 before_each: Callable[[], None] = lambda: None) -> dict:
    get = consumer(store)
    row: dict = {"tier": name}
    before_each()
    lat4k = latency(get, refs["4k"], counts["lat4k"])
    before_each()
    lat4m = latency(get, refs["4m"], counts["lat4m"])
    before_each()
    r4k, _ = throughput(get, refs["4k"][:counts["thr4k"]], 16)
    before_each()
    r4m, b4m = throughput(get, refs["4m"][:counts["thr4m"]], 8)
    before_each()
    seq = sequential(store, seq_bytes)
    row.update({
        "4k_p50_ms": lat4k.median * 1e3, "4k_p99_ms": lat4k.quantile(0.99) * 1e3, "4k_n": len(lat4k.values),
        "4m_p50_ms": lat4m.median * 1e3, "4m_p99_ms": lat4m.quantile(0.99) * 1e3, "4m_n": len(lat4m.values),
        "4k_reads_per_s": r4k, "4m_MiB_per_s": b4m / MiB, "seq_MiB_per_s": seq / MiB,
    })
    print(table([row], list(row)), flush=True)
    return row


def tier_table(store_dir: str, refs: dict, seq_bytes: int, rtt_az: float, rtt_blob: float, work: str) -> list[dict]:
    rows = []
    local = LocalObjectStore(store_dir)
    fast = {"lat4k": 2000, "lat4m": 100, "thr4k": 2000, "thr4m": 128}
    # memory: every read a memory hit
    with Store(local, memory_bytes=seq_bytes + 512 * MiB) as s:
        s.chunks.get_many(refs["4k"] + refs["4m"])
        rows.append(measure_tier("memory", s, refs, fast, seq_bytes))
    # ssd: memory tier off; warm cache dir (page cache), then evicted from the page cache
    cache = os.path.join(work, "hostcache")
    with Store(local, cache_dir=cache, memory_bytes=0) as s:
        s.chunks.get_many(refs["4k"] + refs["4m"])
        s.chunks.flush(120)
        rows.append(measure_tier("ssd (page cache)", s, refs, fast, seq_bytes))
        rows.append(measure_tier("ssd (cold: fadvise DONTNEED)", s, refs, fast, seq_bytes,
                                 before_each=lambda: drop_page_cache(cache)))
    shutil.rmtree(cache)
    slow = {"lat4k": 300, "lat4m": 40, "thr4k": 2000, "thr4m": 128}
    blob_counts = {"lat4k": 30, "lat4m": 15, "thr4k": 320, "thr4m": 64}
    with nginx_static(store_dir) as origin, relay(port_of(origin), rtt_blob) as blob_url:
        blob = HttpObjectStore(blob_url + "/")
        with cache_server(blob_url + "/") as az:
            # warm the server through the blob link (this is the AZ tier's cold fill)
            t0 = time.perf_counter()
            warm = AzCacheTier([az])
            with Store(blob, memory_bytes=0, extra_tiers=[warm]) as s:
                s.chunks.get_many(refs["4k"] + refs["4m"])
                assert warm.stats().hits > 0 and s.blob.stats().hits == 0
            warm.close()
            print(f"cache server filled through the blob link in {time.perf_counter() - t0:.1f} s", flush=True)
            with relay(port_of(az), rtt_az) as az_url:
                tier = AzCacheTier([az_url + "/"], timeout=10.0)
                with Store(blob, memory_bytes=0, extra_tiers=[tier]) as s:
                    rows.append(measure_tier(f"AZ cache: casfs cache-server ({rtt_az * 1e3:g} ms RTT)", s, refs,
                                             slow, seq_bytes))
                    assert s.blob.stats().hits == 0
                tier.close()
            tier = AzCacheTier([az], timeout=10.0)
            with Store(blob, memory_bytes=0, extra_tiers=[tier]) as s:
                rows.append(measure_tier("AZ cache: casfs cache-server (loopback, no relay)", s, refs, slow, seq_bytes))
                assert s.blob.stats().hits == 0
            tier.close()

        with nginx_cache(blob_url + "/") as ngx:
            warm = AzCacheTier([ngx])
            with Store(blob, memory_bytes=0, extra_tiers=[warm]) as s:
                s.chunks.get_many(refs["4k"] + refs["4m"])
            warm.close()
            with relay(port_of(ngx), rtt_az) as ngx_url:
                tier = AzCacheTier([ngx_url + "/"], timeout=10.0)
                with Store(blob, memory_bytes=0, extra_tiers=[tier]) as s:
                    rows.append(measure_tier(f"AZ cache: nginx proxy_cache ({rtt_az * 1e3:g} ms RTT)", s, refs,
                                             slow, seq_bytes))
                    assert s.blob.stats().hits == 0
                tier.close()
        with Store(blob, memory_bytes=0) as s:
            rows.append(measure_tier(f"blob: nginx static ({rtt_blob * 1e3:g} ms RTT)", s, refs,
                                     blob_counts, seq_bytes))
    return rows


# -- hit-rate split --------------------------------------------------------------------------


def hit_split(store_dir: str, refs: dict, work: str, hosts: int, starts_per_host: int,
              startup_4m: int) -> dict:
    """Repeated starts round-robin over ``hosts`` hosts (each its own ssd cache dir, a fresh
    Store per start) sharing one cold cache server. A start reads every 4 KiB file and the
    first ``startup_4m`` chunks of the big file, chunk by chunk. Counts which tier served each
    chunk read; AZ reads the server had to fill from the blob store count as blob."""
    startup = refs["4k"] + refs["4m"][:startup_4m]
    local = LocalObjectStore(store_dir)
    split = {"local": 0, "az": 0, "s3": 0, "blob_direct": 0}
    per_start = []
    with cache_server(store_dir, memory="2G") as az:
        metrics_url = az + "metrics"
        for k in range(hosts * starts_per_host):
            h = k % hosts
            tier = AzCacheTier([az])
            fills0 = server_misses(metrics_url)
            with Store(local, cache_dir=os.path.join(work, f"host{h}"), memory_bytes=0, extra_tiers=[tier]) as s:
                for r in startup:
                    s.chunks.get(r)
                s.chunks.flush(120)
                st = {t.name: t.hits for t in s.chunks.stats()}
            fills = server_misses(metrics_url) - fills0
            split["local"] += st["ssd"]
            split["az"] += st["azcache"] - fills
            split["s3"] += fills
            split["blob_direct"] += st["blob"]
            per_start.append({"start": k + 1, "host": h + 1, "local": st["ssd"], "az": st["azcache"] - fills,
                              "s3_via_az": fills, "blob_direct": st["blob"]})
            tier.close()
    total = sum(split.values())
    pct = {k: 100.0 * v / total for k, v in split.items()}
    print(table(per_start, list(per_start[0])), flush=True)
    print("split %:", {k: round(v, 2) for k, v in pct.items()}, "Lambda:", LAMBDA_SPLIT, flush=True)
    return {"hosts": hosts, "starts_per_host": starts_per_host, "chunk_reads": total, "counts": split,
            "percent": pct, "per_start": per_start, "startup_chunks": len(startup), "lambda_percent": LAMBDA_SPLIT}


def server_misses(metrics_url: str) -> int:
    host, port = metrics_url.split("//")[1].split("/")[0].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    m = re.search(r"^casfs_cache_misses_total (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


# -- HTTP stacks -----------------------------------------------------------------------------

_STDLIB_SERVER = """
import sys, re
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from casfs.objects.local import LocalObjectStore
store = LocalObjectStore({store!r})
cache = {{}}
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = {nodelay}
    def log_message(self, *a): pass
    def do_GET(self):
        kind, hh, name = self.path.lstrip("/").split("/")
        key = kind + "/" + name
        data = cache.get(key)
        if data is None:
            data = cache[key] = store.get(key)
        body = memoryview(data)
        m = re.match(r"bytes=(\\d+)-(\\d+)$", self.headers.get("Range", ""))
        if m:
            a, b = int(m.group(1)), int(m.group(2)) + 1
            body = body[a:b]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {{a}}-{{b - 1}}/{{len(data)}}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer.daemon_threads = True
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


@contextlib.contextmanager
def stdlib_server(store_dir: str, nodelay: bool) -> Iterator[str]:
    code = _STDLIB_SERVER.format(store=store_dir, nodelay=nodelay)
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{int(proc.stdout.readline())}/"
        _PIDS[url] = proc.pid
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def http_load(url: str, paths: list[tuple[str, dict]], threads: int, seconds: float) -> tuple[float, float]:
    """(requests/s, bytes/s) of ``threads`` keep-alive clients (one process, ``http.client``,
    reading into reused buffers) cycling through ``paths``."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    stop = time.perf_counter() + seconds
    counts = []

    def client(k: int) -> None:
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        buf = memoryview(bytearray(8 * MiB))  # reused: the client's page faults stay out of it
        n = nbytes = 0
        i = k
        while time.perf_counter() < stop:
            p, h = paths[i % len(paths)]
            c.request("GET", p, headers=h)
            r = c.getresponse()
            while True:
                got = r.readinto(buf)
                if not got:
                    break
                nbytes += got
            n += 1
            i += threads
        counts.append((n, nbytes))
        c.close()

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    return sum(c[0] for c in counts) / dt, sum(c[1] for c in counts) / dt


def http_stacks(store_dir: str, refs: dict, seconds: float) -> list[dict]:
    """The same client (http.client threads in this process) against three servers of the same
    bytes from memory: casfs cache-server, stdlib ThreadingHTTPServer, nginx static (page cache)."""
    big = [("/" + relpath(object_key(r)), {}) for r in refs["4m"][:64]]
    small = [("/" + relpath(object_key(r)), {"Range": f"bytes={r.pack_off}-{r.pack_off + r.stored_len - 1}"})
             for r in refs["4k"][:2000]]
    rows = []
    stacks = [("casfs cache-server (threaded, raw sockets)", lambda: cache_server(store_dir)),
              ("stdlib ThreadingHTTPServer", lambda: stdlib_server(store_dir, False)),
              ("stdlib ThreadingHTTPServer + TCP_NODELAY", lambda: stdlib_server(store_dir, True)),
              ("nginx static (C, sendfile; reference)", lambda: nginx_static(store_dir))]
    if missing_binary(NGINX):
        stacks.pop()
    for name, start in stacks:
        with start() as url:
            http_load(url, big + small, 2, 2.0)  # warm: fill memory / page cache
            pid = _PIDS.get(url)
            for threads in (1, 4):
                c0 = cpu_seconds(pid) if pid else 0.0
                rq, bps = http_load(url, big, threads, seconds)
                c1 = cpu_seconds(pid) if pid else 0.0
                rq4, _ = http_load(url, small, threads, seconds)
                c2 = cpu_seconds(pid) if pid else 0.0
                row = {"server": name, "client_threads": threads, "4MiB_GiB_per_s": bps / GiB,
                       "4MiB_req_per_s": rq, "4KiB_range_req_per_s": rq4,
                       "server_cpu_us_per_4MiB": (c1 - c0) / (rq * seconds) * 1e6 if pid else None,
                       "server_cpu_us_per_4KiB": (c2 - c1) / (rq4 * seconds) * 1e6 if pid else None}
                rows.append(row)
                print(table([row], list(row)), flush=True)
    return rows


# -- plot --------------------------------------------------------------------------------------


def plot(rows: list[dict], split: dict | None, path: str, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if split else 2, figsize=(17 if split else 12, 5.2))
    names = [r["tier"].replace(": ", ":\n").replace(" (", "\n(") for r in rows]
    y = range(len(rows))
    ax = axes[0]
    ax.barh([i + 0.2 for i in y], [r["4k_p50_ms"] for r in rows], 0.4, label="4 KiB p50",
            xerr=[[0] * len(rows), [r["4k_p99_ms"] - r["4k_p50_ms"] for r in rows]], capsize=2)
    ax.barh([i - 0.2 for i in y], [r["4m_p50_ms"] for r in rows], 0.4, label="4 MiB p50",
            xerr=[[0] * len(rows), [r["4m_p99_ms"] - r["4m_p50_ms"] for r in rows]], capsize=2)
    ax.set_xscale("log")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("read latency, ms (bar p50, whisker p99; log)")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax = axes[1]
    ax.barh([i + 0.2 for i in y], [r["4m_MiB_per_s"] / 1024 for r in rows], 0.4, label="4 MiB reads, 8 threads")
    ax.barh([i - 0.2 for i in y], [r["seq_MiB_per_s"] / 1024 for r in rows], 0.4, label="sequential file read")
    ax.set_yticks(list(y), [""] * len(rows))
    ax.invert_yaxis()
    ax.set_xlabel("throughput, GiB/s")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    if split:
        ax = axes[2]
        ours = split["percent"]
        labels = ["casfs, 3 hosts\n(simulated starts)", "AWS Lambda\n(reported)"]
        local = [ours["local"], LAMBDA_SPLIT["local"]]
        az = [ours["az"], LAMBDA_SPLIT["az"]]
        s3 = [ours["s3"] + ours["blob_direct"], LAMBDA_SPLIT["s3"]]
        ax.bar(labels, local, label="local cache (ssd)")
        ax.bar(labels, az, bottom=local, label="AZ cache")
        ax.bar(labels, s3, bottom=[a + b for a, b in zip(local, az)], label="blob / S3")
        for i in range(2):
            ax.text(i, 50, f"{local[i]:.1f} / {az[i]:.1f} / {s3[i]:.2f}", ha="center", fontsize=8)
        ax.set_ylabel("% of chunk reads")
        ax.legend(fontsize=8)
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print("wrote", path)


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-mib", type=int, default=1024, help="size of the sequentially read file (MiB)")
    ap.add_argument("--small", type=int, default=2000, help="number of 4 KiB files")
    ap.add_argument("--rtt-az-ms", type=float, default=1.0)
    ap.add_argument("--rtt-blob-ms", type=float, default=100.0)
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--starts-per-host", type=int, default=3)
    ap.add_argument("--startup-4m", type=int, default=32, help="4 MiB chunks read by each start")
    ap.add_argument("--http-stacks", action="store_true", help="only compare HTTP stacks")
    ap.add_argument("--http-seconds", type=float, default=3.0)
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "tier_table.png"))
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/tier_table.json)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    started = time.time()
    machine = machine_info()
    print(describe_machine(machine), flush=True)
    work = args.work or tempfile.mkdtemp(prefix="casfs-tiers-")
    try:
        if args.http_stacks:
            store_dir, refs = build_workload(work, 256, args.small)
            rows = http_stacks(store_dir, refs, args.http_seconds)
            path = write_results("http_stacks", vars(args), rows, started=started, out=args.out, machine=machine)
            print("results:", path)
            return 0
        store_dir, refs = build_workload(work, args.seq_mib, args.small)
        rows = tier_table(store_dir, refs, args.seq_mib * MiB, args.rtt_az_ms / 1e3, args.rtt_blob_ms / 1e3, work)
        print()
        print(table(rows, list(rows[0])))
        split = hit_split(store_dir, refs, work, args.hosts, args.starts_per_host, args.startup_4m)
        note = (f"casfs tier table, {time.strftime('%Y-%m-%d')}: {describe_machine(machine)}; links emulated by "
                f"user-space relays: AZ {args.rtt_az_ms:g} ms RTT, blob {args.rtt_blob_ms:g} ms RTT, no rate caps; "
                f"sequential read of {args.seq_mib} MiB")
        if args.plot:
            plot(rows, split, args.plot, note)
        path = write_results("tier_table", vars(args), {"tiers": rows, "hit_split": split}, started=started,
                             out=args.out, machine=machine)
        print("results:", path)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
