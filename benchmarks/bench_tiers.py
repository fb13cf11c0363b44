"""Benchmark: read throughput and latency of each tier, against os.pread from the page cache.

For each data kind (``random``: incompressible, stored raw like model weights;
``site-packages``: the venv's files concatenated, stored zstd-compressed like code and shared
libraries), a file of ``--size-mib`` MiB is built into a local store with 4 MiB chunks, then
read through ``Image.read_entry`` from each tier in turn:

  memory      every chunk already in the memory tier (decoded, verified once)
  ssd         no memory tier; every chunk in the ssd tier (frame files in the page cache):
              read + decode + verify per chunk
  blob-local  no memory or ssd tier: every read fetches the chunk object from the local blob
              store (in the page cache) and decodes + verifies it
  blob-s3     as blob-local, from moto_server on 127.0.0.1 (when casfs.tiers.blob_s3 and
              tests/servers.py exist; moto is slow per request: a correctness server, not a
              yardstick for S3 itself)

and the baseline, ``os.pread`` of the same bytes from the original file in the page cache.
Two patterns: sequential 4 MiB reads over the whole file (MB/s; one read = one whole chunk,
so each tier's per-chunk cost shows; the memory tier is also read in 1 MiB pieces, the most a
FUSE request asks for), and ``--random-reads``
4 KiB reads at random offsets (p50/p99 latency and ops/s; a cold 4 KiB read costs a whole
chunk: fetch, decompress, verify). ``store.chunks.stats()`` confirms which tier served.

Usage: python benchmarks/bench_tiers.py [--size-mib 256] [--kinds random,site-packages] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (ROOT, MiB, Samples, describe_machine, machine_info, ratio, table,  # noqa: E402
                     write_results)

import casfs  # noqa: E402

SEQ_BLOCK = 4 * MiB
RAND_BLOCK = 4096
SITE = os.path.join(ROOT, ".venv", "lib", "python3.11", "site-packages")


def make_data(kind: str, size: int, path: str) -> None:
    """Write ``size`` bytes of data kind ``kind`` to ``path``."""
    with open(path, "wb") as out:
        if kind == "random":
            left = size
            while left:
                n = min(left, 16 * MiB)
                out.write(os.urandom(n))
                left -= n
            return
        if kind != "site-packages":
            raise SystemExit(f"unknown data kind {kind!r} (random, site-packages)")
        left = size
        for top, dnames, fnames in os.walk(SITE):
            dnames.sort()
            for n in sorted(fnames):
                p = os.path.join(top, n)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                with open(p, "rb") as f:
                    data = f.read(left)
                out.write(data)
                left -= len(data)
                if not left:
                    return
        raise SystemExit(f"{SITE} holds less than {size} bytes")


def seq_read(read, size: int, block: int = SEQ_BLOCK) -> float:
    """Seconds to read [0, size) in ``block``-byte reads through ``read(offset, n) -> bytes``."""
    t0 = time.perf_counter()
    got = 0
    for off in range(0, size, block):
        got += len(read(off, block))
    dt = time.perf_counter() - t0
    if got != size:
        raise SystemExit(f"sequential read returned {got} of {size} bytes")
    return dt


def rand_read(read, offsets: list[int]) -> Samples:
    s = Samples()
    for off in offsets:
        t0 = time.perf_counter()
        n = len(read(off, RAND_BLOCK))
        s.add(time.perf_counter() - t0)
        if n != RAND_BLOCK:
            raise SystemExit(f"random read at {off} returned {n} bytes")
    return s


def tier_hits(store) -> dict[str, int]:
    return {t.name: t.hits for t in store.chunks.stats()}


@contextlib.contextmanager
def s3_endpoint():
    """moto_server on 127.0.0.1 (yields its URL), or None with the reason it is unavailable."""
    try:
        import casfs.tiers.blob_s3  # noqa: F401
    except ImportError as e:
        yield None, f"casfs.tiers.blob_s3 unavailable ({e})"
        return
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        from servers import MOTO_SERVER, missing_binary, moto_server
    except ImportError as e:
        yield None, f"tests/servers.py has no moto_server ({e})"
        return
    if missing_binary(MOTO_SERVER):
        yield None, missing_binary(MOTO_SERVER)
        return
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    old = {k: os.environ.get(k) for k in list(env) + ["AWS_PROFILE", "AWS_ENDPOINT_URL", "CASFS_S3_ENDPOINT"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "CASFS_S3_ENDPOINT"):
        os.environ.pop(k, None)
    try:
        with moto_server() as url:
            yield url, ""
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure(name: str, store, tag: str, size: int, offsets: list[int], warm, block: int = SEQ_BLOCK) -> dict:
    """Warm a tier with ``warm(image, entry)``, then time sequential ``block``-byte reads and
    random 4 KiB reads from it."""
    img = store.open_image(tag)
    entry = img.lookup("data.bin")
    read = lambda off, n: img.read_entry(entry, off, n)  # noqa: E731
    warm(img, entry)
    before = tier_hits(store)
    t_seq = seq_read(read, size, block)
    rnd = rand_read(read, offsets)
    after = tier_hits(store)
    served = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
    return {"tier": name, "seq_s": t_seq, "seq_MBps": size / 1e6 / t_seq, "rand": rnd.summary(1e3),
            "rand_ops": len(rnd.values) / sum(rnd.values), "served_by": served}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--size-mib", type=int, default=256, help="bytes per data kind, MiB (default 256)")
    ap.add_argument("--kinds", default="random,site-packages", help="data kinds (default random,site-packages)")
    ap.add_argument("--random-reads", type=int, default=1000, help="random 4 KiB reads per tier (default 1000)")
    ap.add_argument("--s3-random-reads", type=int, default=100, help="random 4 KiB reads from S3 (default 100)")
    ap.add_argument("--no-s3", action="store_true", help="skip the moto_server S3 tier")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: temp, removed)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/tiers.json)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    started = time.time()
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}")
    size = args.size_mib * MiB
    work = args.workdir or tempfile.mkdtemp(prefix="casfs-bench-tiers-")
    os.makedirs(work, exist_ok=True)
    results: dict = {"kinds": {}, "notes": []}
    rng = random.Random(args.seed)
    try:
        with s3_endpoint() as (s3_url, why):
            if args.no_s3:
                s3_url, why = None, "--no-s3"
            if s3_url is None:
                results["notes"].append(f"S3 tier not measured: {why}")
                print(f"S3 tier not measured: {why}")
            for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
                src = os.path.join(work, f"src-{kind}")
                os.makedirs(src, exist_ok=True)
                data_path = os.path.join(src, "data.bin")
                make_data(kind, size, data_path)
                store_path = os.path.join(work, f"store-{kind}")
                with casfs.open_store(store_path, memory_bytes=0) as st:
                    built = casfs.build(st, src, tag="bench", progress=False)
                stored = built.pack.bytes_stored
                print(f"\n{kind}: {args.size_mib} MiB stored as {stored / MiB:.1f} MiB "
                      f"({size / max(1, stored):.2f}x), {built.pack.chunks_total} chunks of 4 MiB")
                offsets = [rng.randrange(0, size - RAND_BLOCK) for _ in range(args.random_reads)]
                rows = []

                # baseline: pread from the page cache
                fd = os.open(data_path, os.O_RDONLY)
                try:
                    pread = lambda off, n: os.pread(fd, n, off)  # noqa: E731
                    seq_read(pread, size)  # warm
                    t_seq = min(seq_read(pread, size) for _ in range(3))
                    rnd = rand_read(pread, offsets)
                finally:
                    os.close(fd)
                base = {"tier": "os.pread (baseline)", "seq_s": t_seq, "seq_MBps": size / 1e6 / t_seq,
                        "rand": rnd.summary(1e3), "rand_ops": len(rnd.values) / sum(rnd.values), "served_by": {}}

                def warm_all(img, entry):
                    for off in range(0, size, SEQ_BLOCK):
                        img.read_entry(entry, off, SEQ_BLOCK)

                with casfs.open_store(store_path, memory_bytes=size + 64 * MiB) as st:
                    # a whole-chunk read hands back the cached object itself (no copy); FUSE
                    # asks for at most 1 MiB, which slices (copies) out of the cached chunk
                    rows.append(measure("memory", st, "bench", size, offsets, warm_all))
                    rows.append(measure("memory, 1 MiB reads", st, "bench", size, offsets,
                                        lambda img, entry: None, block=MiB))

                def warm_ssd(st):
                    def warm(img, entry):
                        refs = img.chunk_refs(entry)
                        for _ in range(3):
                            for ref in refs:
                                if not st.ssd.contains(ref):
                                    st.chunks.get(ref)
                                    st.chunks.flush()
                            if all(st.ssd.contains(r) for r in refs):
                                return
                        raise SystemExit("the ssd tier did not take every chunk")
                    return warm

                cache = os.path.join(work, f"cache-{kind}")
                with casfs.open_store(store_path, cache_dir=cache, memory_bytes=0) as st:
                    rows.append(measure("ssd", st, "bench", size, offsets, warm_ssd(st)))
                shutil.rmtree(cache, ignore_errors=True)

                with casfs.open_store(store_path, memory_bytes=0) as st:
                    rows.append(measure("blob-local", st, "bench", size, offsets, warm_all))

                if s3_url:
                    from casfs.tiers.blob_s3 import S3ObjectStore

                    S3ObjectStore("casfs-bench", endpoint_url=s3_url).create_bucket()
                    url = f"s3://casfs-bench/{kind}?endpoint={s3_url}"
                    with casfs.open_store(url, cache_dir="", memory_bytes=0) as st:
                        t0 = time.perf_counter()
                        casfs.build(st, src, tag="bench", progress=False)
                        t_up = time.perf_counter() - t0
                    with casfs.open_store(url, cache_dir="", memory_bytes=0) as st:
                        row = measure("blob-s3 (moto)", st, "bench", size, offsets[:args.s3_random_reads],
                                      lambda img, entry: None)
                        row["build_upload_s"] = t_up
                        rows.append(row)

                rows.append(base)
                results["kinds"][kind] = {"stored_bytes": stored, "size": size, "tiers": rows}
                out = []
                for r in rows:
                    out.append({
                        "tier": r["tier"], "seq MB/s": r["seq_MBps"], "seq vs pread": ratio(r["seq_MBps"], base["seq_MBps"]),
                        "4K p50 us": r["rand"]["median"] * 1e3, "4K p99 us": r["rand"]["p99"] * 1e3,
                        "4K ops/s": r["rand_ops"], "ops vs pread": ratio(r["rand_ops"], base["rand_ops"]),
                        "served by": ", ".join(f"{k} {v}" for k, v in r["served_by"].items()),
                    })
                print(table(out, ["tier", "seq MB/s", "seq vs pread", "4K p50 us", "4K p99 us", "4K ops/s",
                                  "ops vs pread", "served by"]))
                shutil.rmtree(src, ignore_errors=True)
                shutil.rmtree(store_path, ignore_errors=True)
        path = write_results("tiers", vars(args), results, started=started, out=args.out, machine=machine)
        print(f"results: {os.path.relpath(path)}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
