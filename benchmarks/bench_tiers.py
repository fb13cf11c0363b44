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
  blob-s3     as blob-local, from moto_server on 127.0.0.1 (when casfs.objects.s3 and
              tests/support exist; moto is slow per request: a correctness server, not a
              yardstick for S3 itself)

and the baseline, ``os.pread`` of the same bytes from the original file in the page cache.
Two patterns: sequential 4 MiB reads over the whole file (MB/s and MB per CPU-second; one read
= one whole chunk, so each tier's per-chunk cost shows; the memory tier is also read in 1 MiB
pieces, the most a FUSE request asks for), and ``--random-reads`` 4 KiB reads at random offsets
(p50/p99 latency, CPU time per read (all threads: blake3 hashes on two), and ops/s; a cold 4 KiB read costs a
whole chunk: fetch, decompress, verify).
``store.chunks.stats()`` confirms which tier served.

All tiers are open at once (one Store each) and measured interleaved: ``--rounds`` sequential
passes, each pass over every tier in turn, and each random offset read from every tier in turn,
so that load from other processes on a shared machine falls on every tier alike (memory hits
first, then the other tiers in an order that rotates per offset). Medians of the sequential rounds are reported.

Usage: python -m benchmarks.bench_tiers [--size-mib 256] [--kinds random,site-packages] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks._common import (ROOT, Clock, MiB, Samples, describe_machine, machine_info, ratio, table,
                     write_results)

import casfs

SEQ_BLOCK = 4 * MiB
DATA_NAME = "data.img"  # no weight-file suffix (.bin, .safetensors ...): the build's compress="auto" stores those raw
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


def seq_read(read, size: int, block: int = SEQ_BLOCK) -> Clock:
    """Read [0, size) in ``block``-byte reads through ``read(offset, n) -> bytes``; its clock."""
    got = 0
    with Clock() as c:
        for off in range(0, size, block):
            got += len(read(off, block))
    if got != size:
        raise SystemExit(f"sequential read returned {got} of {size} bytes")
    return c


def tier_hits(store) -> dict[str, int]:
    return {t.name: t.hits for t in store.chunks.stats()}


@contextlib.contextmanager
def s3_endpoint():
    """moto_server on 127.0.0.1: yields (its URL, "") or (None, the reason it is unavailable)."""
    try:
        import casfs.objects.s3  # noqa: F401
    except ImportError as e:
        yield None, f"casfs.objects.s3 unavailable ({e})"
        return
    from tests.support import MOTO_SERVER, missing_binary, moto_server
    if missing_binary(MOTO_SERVER):
        yield None, missing_binary(MOTO_SERVER)
        return
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    unset = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "CASFS_S3_ENDPOINT")
    old = {k: os.environ.get(k) for k in list(env) + list(unset)}
    os.environ.update(env)
    for k in unset:
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


class Variant:
    """One way of reading the data: a tier (through a Store's image) or the pread baseline."""

    def __init__(self, name: str, read, store=None, block: int = SEQ_BLOCK) -> None:
        self.name, self.read, self.store, self.block = name, read, store, block
        self.seq: list[Clock] = []
        self.rand = Samples()
        self.rand_cpu = Samples()  # process CPU seconds per read (steady under others' load)
        self.served: dict[str, int] = {}

    def _count(self, before: dict[str, int]) -> None:
        if self.store is not None:
            for k, v in tier_hits(self.store).items():
                if v - before.get(k, 0):
                    self.served[k] = self.served.get(k, 0) + v - before.get(k, 0)

    def seq_pass(self, size: int) -> None:
        before = tier_hits(self.store) if self.store is not None else {}
        self.seq.append(seq_read(self.read, size, self.block))
        self._count(before)

    def rand_read(self, off: int) -> bytes:
        before = tier_hits(self.store) if self.store is not None else {}
        c0, t0 = Clock.process_cpu(), time.perf_counter()
        data = self.read(off, RAND_BLOCK)
        self.rand.add(time.perf_counter() - t0)
        self.rand_cpu.add(Clock.process_cpu() - c0)
        self._count(before)
        return data

    def result(self, size: int) -> dict:
        mbps = statistics.median(size / 1e6 / c.wall for c in self.seq)
        mbcpu = statistics.median(size / 1e6 / c.cpu for c in self.seq if c.cpu > 0) if any(
            c.cpu > 0 for c in self.seq) else 0.0
        return {"tier": self.name, "seq_MBps": mbps, "seq_MB_per_cpu_s": mbcpu,
                "seq_rounds": [{"s": c.wall, "cpu_s": c.cpu} for c in self.seq],
                "rand": self.rand.summary(1e3), "rand_ops": len(self.rand.values) / sum(self.rand.values),
                "rand_cpu": self.rand_cpu.summary(1e3),
                "served_by": self.served}


def image_reader(store, tag: str = "bench"):
    img = store.open_image(tag)
    entry = img.lookup(DATA_NAME)
    return img, entry, (lambda off, n: img.read_entry(entry, off, n))


def run_kind(kind: str, args, work: str, s3_url: str | None, rng: random.Random) -> dict:
    size = args.size_mib * MiB
    src = os.path.join(work, f"src-{kind}")
    os.makedirs(src, exist_ok=True)
    data_path = os.path.join(src, DATA_NAME)
    make_data(kind, size, data_path)
    store_path = os.path.join(work, f"store-{kind}")
    with casfs.open_store(store_path, memory_bytes=0) as st:
        built = casfs.build(st, src, tag="bench", progress=False)
    stored = built.pack.bytes_stored
    print(f"\n{kind}: {args.size_mib} MiB stored as {stored / MiB:.1f} MiB ({size / max(1, stored):.2f}x), "
          f"{built.pack.chunks_total} chunks of 4 MiB ({built.pack.packs} packs, {built.pack.loose} loose)", flush=True)
    offsets = [rng.randrange(0, size - RAND_BLOCK) for _ in range(args.random_reads)]
    cache = os.path.join(work, f"cache-{kind}")
    with contextlib.ExitStack() as stack:
        mem = stack.enter_context(casfs.open_store(store_path, memory_bytes=size + 64 * MiB))
        ssd = stack.enter_context(casfs.open_store(store_path, cache_dir=cache, memory_bytes=0))
        blob = stack.enter_context(casfs.open_store(store_path, memory_bytes=0))
        img, entry, mem_read = image_reader(mem)
        for off in range(0, size, SEQ_BLOCK):  # warm the memory tier
            img.read_entry(entry, off, SEQ_BLOCK)
        img, entry, ssd_read = image_reader(ssd)
        refs = img.chunk_refs(entry)
        for _ in range(3):  # warm the ssd tier (fills are written in the background)
            for ref in refs:
                if not ssd.ssd.contains(ref):
                    ssd.chunks.get(ref)
                    ssd.chunks.flush()
            if all(ssd.ssd.contains(r) for r in refs):
                break
        else:
            raise SystemExit("the ssd tier did not take every chunk")
        _, _, blob_read = image_reader(blob)
        fd = os.open(data_path, os.O_RDONLY)
        stack.callback(os.close, fd)
        variants = [
            # a whole-chunk read hands back the cached object itself (no copy); FUSE asks for
            # at most 1 MiB, which slices (copies) out of the cached chunk
            Variant("memory", mem_read, mem),
            Variant("memory, 1 MiB reads", mem_read, mem, block=MiB),
            Variant("ssd", ssd_read, ssd),
            Variant("blob-local", blob_read, blob),
        ]
        s3 = None
        t_up = None
        if s3_url:
            from casfs.objects.s3 import S3ObjectStore

            S3ObjectStore("casfs-bench", endpoint_url=s3_url).create_bucket()
            url = f"s3://casfs-bench/{kind}?endpoint={s3_url}"
            with casfs.open_store(url, cache_dir="", memory_bytes=0) as up:
                t0 = time.perf_counter()
                casfs.build(up, src, tag="bench", progress=False)
                t_up = time.perf_counter() - t0
            s3 = stack.enter_context(casfs.open_store(url, cache_dir="", memory_bytes=0))
            variants.append(Variant("blob-s3 (moto)", image_reader(s3)[2], s3))
        base = Variant("os.pread (baseline)", lambda off, n: os.pread(fd, n, off))
        variants.append(base)
        seq_read(base.read, size)  # page cache warm for the baseline
        for _ in range(args.rounds):
            for v in variants:
                v.seq_pass(size)
        cheap = [v for v in variants[:-1] if v.name.startswith("memory")]
        costly = [v for v in variants[:-1] if not v.name.startswith("memory")]
        for k, off in enumerate(offsets):
            want = base.rand_read(off)
            # memory hits first (a 4 MiB decode just before would evict their working set from
            # the CPU caches and triple their latency); orders rotate within each group
            a, b = k % len(cheap), k % len(costly)
            for v in cheap[a:] + cheap[:a] + costly[b:] + costly[:b]:
                if v.store is s3 and s3 is not None and k >= args.s3_random_reads:
                    continue
                if v.rand_read(off) != want:
                    raise SystemExit(f"{v.name}: wrong bytes at offset {off}")
        rows = [v.result(size) for v in variants]
        if t_up is not None:
            rows[-2]["build_upload_s"] = t_up
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(store_path, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    b = rows[-1]
    out = [{
        "tier": r["tier"], "seq MB/s": r["seq_MBps"], "seq vs pread": ratio(r["seq_MBps"], b["seq_MBps"]),
        "MB/CPU-s": r["seq_MB_per_cpu_s"], "4K p50 us": r["rand"]["median"] * 1e3, "4K p99 us": r["rand"]["p99"] * 1e3,
        "4K CPU us": r["rand_cpu"]["median"] * 1e3,
        "4K ops/s": r["rand_ops"], "ops vs pread": ratio(r["rand_ops"], b["rand_ops"]),
        "served by": ", ".join(f"{k} {v}" for k, v in r["served_by"].items()),
    } for r in rows]
    print(table(out, ["tier", "seq MB/s", "seq vs pread", "MB/CPU-s", "4K p50 us", "4K p99 us", "4K CPU us", "4K ops/s",
                      "ops vs pread", "served by"]), flush=True)
    return {"stored_bytes": stored, "size": size, "packs": built.pack.packs, "loose": built.pack.loose,
            "tiers": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--size-mib", type=int, default=256, help="bytes per data kind, MiB (default 256)")
    ap.add_argument("--kinds", default="random,site-packages", help="data kinds (default random,site-packages)")
    ap.add_argument("--rounds", type=int, default=3, help="sequential passes per tier, interleaved (default 3)")
    ap.add_argument("--random-reads", type=int, default=1000, help="random 4 KiB reads per tier (default 1000)")
    ap.add_argument("--s3-random-reads", type=int, default=100, help="of those, read from S3 too (default 100)")
    ap.add_argument("--no-s3", action="store_true", help="skip the moto_server S3 tier")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: temp, removed)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/tiers.json)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    started = time.time()
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}")
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
                results["kinds"][kind] = run_kind(kind, args, work, s3_url, rng)
        path = write_results("tiers", vars(args), results, started=started, out=args.out, machine=machine)
        print(f"results: {os.path.relpath(path)}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
