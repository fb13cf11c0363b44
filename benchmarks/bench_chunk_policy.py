#!/usr/bin/env python3
"""Per-file chunk sizes: what the build policy costs and saves on a real venv image.

One venv with torch (the image of ``bench_cold_start``) is built once per policy into its own
local store: ``4M`` (one 4 MiB chunk size for every file: the default before per-file sizes),
and ``auto`` (``casfs build``'s default now: ``casfs.build.policy``), plus any other
``--chunk-size`` values given. For each store:

- build: wall seconds and MB/s (median of ``--builds`` builds into fresh stores), stored bytes,
  objects (packs + loose), index bytes;
- cold start: the store served by Debian's nginx behind the delay relay (``--rtt-ms``,
  ``--rate-mbit``), mounted lazily with an empty ssd cache and no profile, page cache dropped,
  then ``python -c "import torch; torch.ones(2).sum()"`` from the mount: wall seconds, bytes
  the blob tier delivered, and blob requests (``--repeat`` runs, interleaved over policies).

Ratios are against the ``4M`` store measured in the same run. JSON to ``--out``.

- cold random reads: ``--random-reads`` 4 KiB reads at random offsets of files >= 1 MiB through
  a store without memory or ssd tier (page cache dropped first): bytes fetched from the blob
  tier per read, and latency.

Builds run in this process (``casfs.build``), so that policy variants can be tried:
``auto:code=1M`` (another small-chunk size) and ``auto:packed`` (chunks of multi-chunk files
packed, as before per-file sizes; ``auto:loose``, the default, keeps them loose). The run
recorded in docs/benchmarks.md predates that default: its ``auto`` row was ``auto:packed``.

Usage: python -m benchmarks.bench_chunk_policy [--venv DIR] [--policies 4M,auto] [--rtt-ms 50] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.bench_cold_start import blob_bytes, casfs, drop_caches, ensure_venv, mounted_run, tree_stats
from tests.support import FaultProxy, nginx_static

HERE = os.path.dirname(os.path.abspath(__file__))


def store_stats(root: str) -> dict:
    out = {"stored_bytes": 0, "packs": 0, "loose": 0, "index_bytes": 0}
    for dp, _, fs in os.walk(root):
        kind = os.path.relpath(dp, root).split(os.sep)[0]
        for f in fs:
            n = os.path.getsize(os.path.join(dp, f))
            out["stored_bytes"] += n
            if kind == "packs":
                out["packs"] += 1
            elif kind == "chunks":
                out["loose"] += 1
            elif kind == "indexes":
                out["index_bytes"] += n
    return out


def build_in_process(spec: str, venv: str, store_dir: str) -> float:
    """Build ``venv`` into ``store_dir`` under policy ``spec``; returns wall seconds.

    ``spec``: ``auto`` (the default policy), a forced size (``4M``), or ``auto`` with options
    after colons: ``code=SIZE`` (the policy's small chunk size), ``packed`` / ``loose`` (chunks
    of files larger than one chunk are packed / loose objects; loose is the default)."""
    import casfs
    from casfs.build import packer as packermod
    from casfs.build import policy
    from casfs.cli.format import parse_size

    parts = spec.split(":")
    saved = (policy.CODE_CHUNK_SIZE, packermod.Packer.pack_file_chunks)
    forced = None if parts[0] == "auto" else parse_size(parts[0])
    try:
        for opt in parts[1:]:
            if opt.startswith("code="):
                policy.CODE_CHUNK_SIZE = parse_size(opt[5:])
            elif opt == "loose":
                packermod.Packer.pack_file_chunks = False
            elif opt == "packed":
                packermod.Packer.pack_file_chunks = True
            else:
                raise SystemExit(f"unknown policy option {opt!r}")
        with casfs.open_store(store_dir, memory_bytes=0) as s:
            t0 = time.perf_counter()
            casfs.build(s, venv, tag="torchvenv", chunk_size=forced, progress=False)
            return time.perf_counter() - t0
    finally:
        policy.CODE_CHUNK_SIZE, packermod.Packer.pack_file_chunks = saved


def random_reads(store_dir: str, n: int, seed: int = 1) -> dict:
    """Cold 4 KiB reads at random offsets of files >= 1 MiB, through a store with no memory or
    ssd tier (each read fetches its chunk, or its pack span, from the local blob store)."""
    import random as rnd

    import casfs

    with casfs.open_store(store_dir, memory_bytes=0, cache_dir="") as s:
        image = s.open_image("torchvenv")
        ix = image.index
        big = sorted((image.lookup(p) for p, st in image.walk() if st.is_file and st.size >= 1 << 20))
        rng = rnd.Random(seed)
        picks = [(e, rng.randrange(ix.size(e) - 4096)) for e in (rng.choice(big) for _ in range(n))]
        blob = [t for t in s.chunks.tiers if t.name == "blob"][0]
        before = blob.stats().bytes_read
        lat = []
        for e, off in picks:
            t0 = time.perf_counter()
            image.read_entry(e, off, 4096)
            lat.append(time.perf_counter() - t0)
        lat.sort()
        return {"bytes_per_read": (blob.stats().bytes_read - before) / n,
                "p50_ms": lat[n // 2] * 1e3, "p90_ms": lat[int(n * 0.9)] * 1e3}


def blob_requests(stats: dict) -> int:
    return sum(t.get("hits", 0) for t in stats.get("tiers", []) if t.get("tier") == "blob")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default="/tmp/casfs-bench-torchvenv", help="venv with torch (created if missing)")
    ap.add_argument("--policies", default="4M,auto,auto:packed", help="comma-separated: auto, "
                    "auto:code=SIZE, auto:packed, or a forced --chunk-size (the first is the baseline)")
    ap.add_argument("--random-reads", type=int, default=200, help="cold 4 KiB reads per store")
    ap.add_argument("--builds", type=int, default=2, help="builds per policy (median)")
    ap.add_argument("--repeat", type=int, default=2, help="cold starts per policy")
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "chunk_policy.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE mounts, dropping the page cache)")
    venv = ensure_venv(args.venv)
    work = args.work or tempfile.mkdtemp(prefix="casfs-chunkpolicy-")
    nfiles, nbytes = tree_stats(venv)
    print(f"image source: {venv}: {nfiles} files, {nbytes / 1e9:.2f} GB; work {work}", flush=True)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    res: dict[str, dict] = {p: {"build_s": [], "cold_s": [], "blob_bytes": [], "blob_requests": []}
                            for p in policies}
    stores = {}
    for b in range(args.builds):
        for p in policies:
            st = os.path.join(work, f"store-{p.replace(':', '_')}-{b}")
            res[p]["build_s"].append(build_in_process(p, venv, st))
            if b == 0:
                stores[p] = st
                res[p].update(store_stats(st))
                drop_caches()
                res[p].update(random_reads(st, args.random_reads))
            else:
                shutil.rmtree(st)
            print(f"build {p} #{b + 1}: {res[p]['build_s'][-1]:.1f} s", flush=True)
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    dropped = drop_caches()
    for r in range(args.repeat):
        for p in policies:
            with nginx_static(stores[p]) as base:
                port = int(base.rstrip("/").rsplit(":", 1)[1])
                with FaultProxy(port) as proxy:
                    half = args.rtt_ms / 2000.0
                    rate = args.rate_mbit * 1e6 / 8
                    proxy.set_latency(up=half, down=half)
                    proxy.set_rate(up=rate, down=rate)
                    cache = os.path.join(work, f"cache-{p}-{r}")
                    drop_caches()
                    t, d = mounted_run(f"http://127.0.0.1:{proxy.port}/", cache, mnt, "--no-profile")
                    shutil.rmtree(cache, ignore_errors=True)
            res[p]["cold_s"].append(t)
            res[p]["blob_bytes"].append(blob_bytes(d["stats"]))
            res[p]["blob_requests"].append(blob_requests(d["stats"]))
            print(f"cold start {p} #{r + 1}: {t:.2f} s, {res[p]['blob_bytes'][-1] / 1e6:.0f} MB from the blob "
                  f"tier in {res[p]['blob_requests'][-1]} requests", flush=True)
    base = policies[0]
    med = {p: {k: statistics.median(v) for k, v in r.items() if isinstance(v, list) and v} for p, r in res.items()}
    print(f"\n{nfiles} files, {nbytes / 1e9:.2f} GB; blob over http behind {args.rtt_ms:.0f} ms RTT, "
          f"{args.rate_mbit:.0f} Mbit/s; page cache dropped: {dropped}")
    print("| policy | build s (MB/s) | stored MB | packs + loose | index KB | cold import s (runs) "
          f"| blob MB fetched (x {base}) | blob requests | cold 4 KiB read: KB fetched, p50 / p90 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in policies:
        r, m = res[p], med[p]
        print(f"| {p} | {m['build_s']:.1f} ({nbytes / 1e6 / m['build_s']:.0f}) | {r['stored_bytes'] / 1e6:.0f} "
              f"| {r['packs']} + {r['loose']} | {r['index_bytes'] / 1e3:.0f} "
              f"| {m['cold_s']:.2f} ({', '.join(f'{x:.2f}' for x in r['cold_s'])}) "
              f"| {m['blob_bytes'] / 1e6:.0f} ({m['blob_bytes'] / med[base]['blob_bytes']:.2f}x) "
              f"| {m['blob_requests']:.0f} | {r['bytes_per_read'] / 1e3:.0f}, {r['p50_ms']:.1f} / {r['p90_ms']:.1f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.uname()._asdict(),
                   "files": nfiles, "bytes": nbytes, "rtt_ms": args.rtt_ms, "rate_mbit": args.rate_mbit,
                   "results": res, "median": med, "page_cache_dropped": dropped}, f, indent=1)
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
