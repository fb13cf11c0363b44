"""Benchmark: building an image from a real tree, per chunk size, with dedup and read-back costs.

The tree (default: this venv's site-packages, ~1.5 GB with torch, ~43k files, most of them
small) is mirrored with hard links (``cp -al``) into a work directory so that one file can be
changed without touching the original. Baselines, measured in the same run on the same
page-cache-warm tree:

  cat          ``find -type f | xargs cat > /dev/null``: plain read throughput of the tree
  tar|zstd -1  ``tar cf - . | zstd -1 -T0``: a whole-tree archive compressed on all cores

Then for each chunk size (default 1, 4 and 16 MiB; a fresh local store each):

  build        ``casfs.build`` of the tree: MB/s of input and MB per CPU-second, stored size vs
               raw, objects written (packs and loose chunks), chunk count
  rebuild      one mid-sized file (the one closest to ``--change-size``) gets one byte flipped
               in its middle; the tree is built again (deduplicated against the first image's
               tag): what it stores should be about one chunk of that file
  read all     a new Store (no memory or ssd tier, store objects in the page cache) reads every
               file whole through ``Image.read_entry``: MB/s (vs cat) and MB per CPU-second
  random 4K    ``--random-reads`` 4 KiB reads at random offsets of files >= 1 MiB through a
               Store with no memory or ssd tier, so each is a cold chunk read (a whole chunk,
               or a pack span, fetched, decompressed and verified): p50/p99 latency and the
               process's CPU time per read, against os.pread of the same offsets; plus the
               one-time cost of the index's pack map (built on the first packed read)

Builds, baselines and whole-tree reads run ``--rounds`` times, interleaved across chunk sizes
(and each random offset is read from every chunk size in turn), so that load from other
processes on a shared machine falls on every variant alike; medians are reported. CPU seconds
(this process and its children, all threads) are reported beside wall time because they barely
move with other people's load.

Usage: python -m benchmarks.bench_build [--tree DIR] [--chunk-sizes 1,4,16] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import stat as statmod
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks._common import (ROOT, Clock, MiB, Samples, describe_machine, human_bytes, machine_info,
                     ratio, table, write_results)

import casfs

DEFAULT_TREE = os.path.join(ROOT, ".venv", "lib", "python3.11", "site-packages")
SMALL = 64 << 10


def scan(tree: str) -> dict:
    """Counts and sizes of a tree (lstat, no symlink following)."""
    files: list[tuple[str, int]] = []
    dirs = links = other = 0
    for top, dnames, fnames in os.walk(tree):
        dirs += 1
        for n in fnames + [d for d in dnames if os.path.islink(os.path.join(top, d))]:
            p = os.path.join(top, n)
            st = os.lstat(p)
            if statmod.S_ISREG(st.st_mode):
                files.append((os.path.relpath(p, tree), st.st_size))
            elif statmod.S_ISLNK(st.st_mode):
                links += 1
            else:
                other += 1
    sizes = sorted(s for _, s in files)
    return {
        "files": len(files), "dirs": dirs, "symlinks": links, "other": other,
        "bytes": sum(sizes), "small_files": sum(1 for s in sizes if s <= SMALL),
        "small_bytes": sum(s for s in sizes if s <= SMALL),
        "median_file": sizes[len(sizes) // 2] if sizes else 0,
        "largest_file": sizes[-1] if sizes else 0,
        "_files": files,
    }


def sh(cmd: str, cwd: str) -> tuple[Clock, str]:
    """Run a shell pipeline; (its wall/CPU clock, stdout)."""
    with Clock() as c:
        out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, check=True, capture_output=True,
                             text=True).stdout
    return c, out


def store_usage(path: str) -> dict:
    """Objects and bytes in a local store directory, by kind."""
    out: dict[str, list[int]] = {}
    for kind in ("chunks", "packs", "indexes", "tags"):
        n = b = 0
        for top, _, fnames in os.walk(os.path.join(path, kind)):
            for f in fnames:
                n += 1
                b += os.lstat(os.path.join(top, f)).st_size
        out[kind] = [n, b]
    return {"objects": sum(v[0] for v in out.values()), "bytes": sum(v[1] for v in out.values()),
            **{f"{k}_objects": v[0] for k, v in out.items()}, **{f"{k}_bytes": v[1] for k, v in out.items()}}


def change_one_byte(mirror: str, rel: str) -> None:
    """Replace the hard link ``mirror/rel`` with a copy that has one byte flipped mid-file."""
    p = os.path.join(mirror, rel)
    with open(p, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    mode = os.lstat(p).st_mode
    os.unlink(p)  # the original (shared inode) is never written
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, statmod.S_IMODE(mode))


def restore_link(tree: str, mirror: str, rel: str) -> None:
    p = os.path.join(mirror, rel)
    os.unlink(p)
    os.link(os.path.join(tree, rel), p)


def read_all(store_path: str, tag: str) -> tuple[Clock, int]:
    """Read every regular file of the image whole, from a new Store: (clock, bytes)."""
    with casfs.open_store(store_path, memory_bytes=0) as st:
        with Clock() as c:
            img = st.open_image(tag)
            ix = img.index
            n = 0
            for i in range(ix.n_entries):
                if statmod.S_ISREG(ix.mode(i)) and ix.size(i):
                    n += len(img.read_entry(i))
    return c, n


class ColdReader:
    """4 KiB reads through a Store with no memory or ssd tier: every read fetches its chunk (or
    its pack span) from the local blob store, decompresses and verifies it. The image's index
    and its pack map are loaded before timing (that one-time cost is reported separately)."""

    def __init__(self, store_path: str, tag: str) -> None:
        self.store = casfs.open_store(store_path, memory_bytes=0)
        self.image = self.store.open_image(tag)
        with Clock() as c:
            self.image.index.pack_members(bytes(32))  # builds the pack -> members map once
        self.pack_map_s = c.wall
        self.pack_map_cpu_s = c.cpu

    def read(self, rel: str, off: int) -> tuple[float, float, bytes]:
        """(seconds, CPU seconds of this process, bytes) of one 4 KiB read. CPU time barely
        moves with other processes' load; wall time does."""
        entry = self.image.lookup(rel)
        c0, t0 = Clock.process_cpu(), time.perf_counter()
        got = self.image.read_entry(entry, off, 4096)
        return time.perf_counter() - t0, Clock.process_cpu() - c0, got

    def close(self) -> None:
        self.store.close()


def pread_4k(path: str, off: int) -> tuple[float, bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        data = os.pread(fd, 4096, off)
        return time.perf_counter() - t0, data
    finally:
        os.close(fd)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tree", default=DEFAULT_TREE, help="directory to build (default: the venv's site-packages)")
    ap.add_argument("--chunk-sizes", default="1,4,16",
                    help="comma-separated chunk sizes in MiB (may be fractional: 0.25); default 1,4,16")
    ap.add_argument("--change-size", type=float, default=40.0,
                    help="MiB: the rebuild changes the file closest to this size (default 40)")
    ap.add_argument("--random-reads", type=int, default=200, help="random 4 KiB reads per chunk size (default 200)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="builds and whole-tree reads per chunk size, interleaved (default 2; medians reported)")
    ap.add_argument("--no-dedup", action="store_true", help="skip the rebuild with one file changed")
    ap.add_argument("--no-read", action="store_true", help="skip the read-back measurements")
    ap.add_argument("--workdir", default=None, help="scratch directory on the tree's filesystem (default: temp)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/build.json)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    started = time.time()
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}")
    tree = os.path.abspath(args.tree)
    sizes = [int(float(x) * MiB) for x in args.chunk_sizes.split(",") if x.strip()]
    work = args.workdir or tempfile.mkdtemp(prefix="casfs-bench-build-")
    os.makedirs(work, exist_ok=True)
    mirror = os.path.join(work, "tree")
    results: dict = {"tree": tree, "baselines": {}, "builds": []}
    try:
        info = scan(tree)
        files = info.pop("_files")
        results["tree_info"] = info
        print(f"tree: {tree}\n  {info['files']} files ({human_bytes(info['bytes'])}), {info['dirs']} dirs, "
              f"{info['symlinks']} symlinks; {info['small_files']} files <= 64 KiB "
              f"({human_bytes(info['small_bytes'])}); median file {human_bytes(info['median_file'])}, "
              f"largest {human_bytes(info['largest_file'])}")
        target = int(args.change_size * MiB)
        changed, changed_size = min(files, key=lambda f: abs(f[1] - target))
        results["changed_file"] = {"path": changed, "bytes": changed_size}
        if os.path.exists(mirror):
            shutil.rmtree(mirror)
        subprocess.run(["cp", "-al", tree, mirror], check=True)

        # -- baselines (warm the page cache first: every measurement below reads from it)
        sh("find . -type f -print0 | xargs -0 cat > /dev/null", mirror)
        raw = info["bytes"]
        rng = random.Random(args.seed)
        big = [f for f in files if f[1] >= MiB]
        picks = [(rel, rng.randrange(0, size - 4096)) for rel, size in rng.choices(big, k=args.random_reads)] \
            if big and args.random_reads else []
        cat: list[Clock] = []
        tz: list[Clock] = []
        tz_bytes = 0
        builds: dict[int, list] = {cs: [] for cs in sizes}
        stores = {cs: os.path.join(work, f"store-{cs}") for cs in sizes}

        # -- builds: rounds interleave chunk sizes and baselines, so that other people's load on
        #    this shared machine falls on all of them alike; medians over rounds are reported
        for rnd in range(args.rounds):
            c, _ = sh("find . -type f -print0 | xargs -0 cat > /dev/null", mirror)
            cat.append(c)
            c, out = sh("tar cf - . | zstd -1 -T0 -q -c | wc -c", mirror)
            tz.append(c)
            tz_bytes = int(out.strip())
            print(f"round {rnd + 1}: cat {raw / 1e6 / cat[-1].wall:.0f} MB/s; tar|zstd -1 -T0 "
                  f"{raw / 1e6 / tz[-1].wall:.0f} MB/s ({raw / 1e6 / tz[-1].cpu:.0f} MB/CPU-s)", flush=True)
            for cs in sizes:
                shutil.rmtree(stores[cs], ignore_errors=True)
                with casfs.open_store(stores[cs], memory_bytes=0) as st:
                    with Clock() as c:
                        r1 = casfs.build(st, mirror, tag="first", chunk_size=cs, progress=False)
                builds[cs].append((c, r1))
                print(f"  build, {human_bytes(cs)} chunks: {c.wall:.1f} s, {r1.pack.bytes_in / 1e6 / c.wall:.0f} MB/s, "
                      f"{r1.pack.bytes_in / 1e6 / c.cpu:.0f} MB/CPU-s", flush=True)
        cat_MBps = med([raw / 1e6 / c.wall for c in cat])
        tz_MBps = med([raw / 1e6 / c.wall for c in tz])
        tz_cpu = med([raw / 1e6 / c.cpu for c in tz])
        results["baselines"] = {
            "cat_MBps": cat_MBps, "cat_MB_per_cpu_s": med([raw / 1e6 / c.cpu for c in cat]),
            "tar_zstd1_MBps": tz_MBps, "tar_zstd1_MB_per_cpu_s": tz_cpu, "tar_zstd1_bytes": tz_bytes,
            "rounds": [{"cat_s": a.wall, "cat_cpu_s": a.cpu, "tar_zstd1_s": b.wall, "tar_zstd1_cpu_s": b.cpu}
                       for a, b in zip(cat, tz)],
        }

        rows: dict[int, dict] = {}
        for cs in sizes:
            r1 = builds[cs][-1][1]
            p = r1.pack
            use = store_usage(stores[cs])
            mbps = med([p.bytes_in / 1e6 / c.wall for c, _ in builds[cs]])
            mbcpu = med([p.bytes_in / 1e6 / c.cpu for c, _ in builds[cs]])
            rows[cs] = {
                "chunk_size": cs, "build_MBps": mbps, "build_MB_per_cpu_s": mbcpu,
                "build_rounds": [{"s": c.wall, "cpu_s": c.cpu} for c, _ in builds[cs]],
                "entries": r1.entries, "bytes_in": p.bytes_in, "stored_bytes": use["bytes"],
                "stored_vs_raw": use["bytes"] / max(1, p.bytes_in), "chunks": p.chunks_total,
                "chunks_new": p.chunks_new, "packs": p.packs, "loose": p.loose, "objects": use["objects"],
                "index_bytes": r1.index_bytes, "vs_tar_zstd": mbps / tz_MBps, "cpu_vs_tar_zstd": mbcpu / tz_cpu,
            }
            print(f"\nchunk size {human_bytes(cs)}: build {mbps:.0f} MB/s ({ratio(mbps, tz_MBps)} tar|zstd), "
                  f"{mbcpu:.0f} MB/CPU-s ({ratio(mbcpu, tz_cpu)}); stored {human_bytes(use['bytes'])} "
                  f"({use['bytes'] / max(1, p.bytes_in):.3f} of raw), {p.packs} packs + {p.loose} loose chunks, "
                  f"{p.chunks_total} chunks ({p.chunks_total - p.chunks_new} deduplicated within the tree)")
            if not args.no_dedup:
                change_one_byte(mirror, changed)
                try:
                    with casfs.open_store(stores[cs], memory_bytes=0) as st:
                        with Clock() as c:
                            r2 = casfs.build(st, mirror, tag="second", chunk_size=cs, progress=False)
                finally:
                    restore_link(tree, mirror, changed)
                use2 = store_usage(stores[cs])
                q = r2.pack
                rows[cs].update({
                    "rebuild_s": c.wall, "rebuild_cpu_s": c.cpu, "rebuild_chunks_new": q.chunks_new,
                    "rebuild_new_raw_bytes": q.bytes_new_raw, "rebuild_new_stored_bytes": q.bytes_stored,
                    "rebuild_store_growth_bytes": use2["bytes"] - use["bytes"], "rebuild_dedup_ratio": r2.dedup_ratio,
                })
                print(f"  rebuild, 1 byte of {changed} ({human_bytes(changed_size)}) changed: {c.wall:.1f} s, "
                      f"{q.chunks_new} new chunks, {human_bytes(q.bytes_new_raw)} new raw, store grew "
                      f"{human_bytes(use2['bytes'] - use['bytes'])} (index included); dedup {r2.dedup_ratio:.0f}x")

        if not args.no_read:
            reads: dict[int, list[tuple[Clock, int]]] = {cs: [] for cs in sizes}
            for rnd in range(args.rounds):
                for cs in sizes:
                    reads[cs].append(read_all(stores[cs], "first"))
            lat: dict[int, Samples] = {cs: Samples() for cs in sizes}
            cpu: dict[int, Samples] = {cs: Samples() for cs in sizes}
            base = Samples()
            readers = {cs: ColdReader(stores[cs], "first") for cs in sizes}
            for k, (rel, off) in enumerate(picks):  # each offset read from every chunk size in turn
                want = None
                for cs in sizes[k % len(sizes):] + sizes[:k % len(sizes)]:
                    dt, dc, got = readers[cs].read(rel, off)
                    lat[cs].add(dt)
                    cpu[cs].add(dc)
                    want = want if want is not None else got
                    if got != want:
                        raise SystemExit(f"read mismatch at {rel}+{off}")
                dt, got = pread_4k(os.path.join(mirror, rel), off)
                base.add(dt)
                if got != want:
                    raise SystemExit(f"read mismatch against pread at {rel}+{off}")
            for cs, rd in readers.items():
                rows[cs]["pack_map_ms"] = rd.pack_map_s * 1e3
                rows[cs]["pack_map_cpu_ms"] = rd.pack_map_cpu_s * 1e3
                rd.close()
            if picks:
                results["rand4k_pread_ms"] = base.summary(1e3)
            for cs in sizes:
                n = reads[cs][0][1]
                mbps = med([n / 1e6 / c.wall for c, _ in reads[cs]])
                mbcpu = med([n / 1e6 / c.cpu for c, _ in reads[cs]])
                rows[cs].update({"read_all_MBps": mbps, "read_all_MB_per_cpu_s": mbcpu,
                                 "read_vs_cat": mbps / cat_MBps,
                                 "read_rounds": [{"s": c.wall, "cpu_s": c.cpu} for c, _ in reads[cs]]})
                line = f"read every file, {human_bytes(cs)} chunks: {mbps:.0f} MB/s ({ratio(mbps, cat_MBps)} cat), " \
                       f"{mbcpu:.0f} MB/CPU-s"
                if picks:
                    rows[cs]["rand4k_ms"] = lat[cs].summary(1e3)
                    rows[cs]["rand4k_cpu_ms"] = cpu[cs].summary(1e3)
                    line += (f"; cold 4 KiB reads p50 {lat[cs].median * 1e3:.2f} ms, p99 {lat[cs].quantile(0.99) * 1e3:.2f}"
                             f" ms, CPU p50 {cpu[cs].median * 1e3:.2f} ms (pack map built once: "
                             f"{rows[cs]['pack_map_ms']:.1f} ms)")
                print(line)
            if picks:
                print(f"os.pread 4 KiB (page cache) p50 {base.median * 1e6:.1f} us")
        results["builds"] = [rows[cs] for cs in sizes]
        for cs in sizes:
            shutil.rmtree(stores[cs], ignore_errors=True)

        cols = ["chunk", "build MB/s", "vs tar|zstd", "MB/CPU-s", "cpu vs tar|zstd", "stored/raw", "packs",
                "loose", "rebuild new", "read MB/s", "vs cat", "read MB/CPU-s", "4K p50 ms", "4K p99 ms", "4K CPU ms"]
        summary = []
        for r in results["builds"]:
            summary.append({
                "chunk": human_bytes(r["chunk_size"]), "build MB/s": r["build_MBps"],
                "vs tar|zstd": f"{r['vs_tar_zstd']:.2f}x", "MB/CPU-s": r["build_MB_per_cpu_s"],
                "cpu vs tar|zstd": f"{r['cpu_vs_tar_zstd']:.2f}x", "stored/raw": r["stored_vs_raw"],
                "packs": r["packs"], "loose": r["loose"],
                "rebuild new": human_bytes(r["rebuild_new_raw_bytes"]) if "rebuild_new_raw_bytes" in r else "",
                "read MB/s": r.get("read_all_MBps"), "vs cat": f"{r['read_vs_cat']:.2f}x" if "read_vs_cat" in r else "",
                "read MB/CPU-s": r.get("read_all_MB_per_cpu_s"),
                "4K p50 ms": r["rand4k_ms"]["median"] if "rand4k_ms" in r else None,
                "4K p99 ms": r["rand4k_ms"]["p99"] if "rand4k_ms" in r else None,
                "4K CPU ms": r["rand4k_cpu_ms"]["median"] if "rand4k_cpu_ms" in r else None,
            })
        print("\n" + table(summary, cols))
        path = write_results("build", vars(args), results, started=started, out=args.out, machine=machine)
        print(f"results: {os.path.relpath(path)}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif os.path.exists(mirror):
            shutil.rmtree(mirror, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
