"""Benchmark: random 4 KiB reads (fio, psync, queue depth 1) from a cold casfs mount whose chunks
sit in the ssd tier, against erofs on the same bytes, and against casfs with whole-chunk frames
(every miss fetches and verifies its whole 4 MiB chunk: the read path before blocked frames).

A ``--size-mib`` file of random bytes (stored raw, like float weights) is built into stores
under ``--dir``: with blocked frames of each ``--blocks`` size (``casfs.build(block=...)``; 64 KiB
is the default) and with whole frames (``block=0``). Each store's ssd tier is then filled with every chunk's
whole frame, so the mounts read from local disk only. Per round, in turn:

  erofs            ``mkfs.erofs`` image of the same file, mounted file-backed (fresh mount)
  casfs blocks     fresh mount of the blocked image (empty memory tiers, ssd tier full)
  casfs whole      fresh mount of the whole-frame image (same)

Before each run the backing files (the erofs image, the ssd tier's files) are dropped from the
page cache with ``posix_fadvise(DONTNEED)`` (no global drop: other work shares this machine),
and fio's ``--invalidate=1`` drops the file's own cached pages. The run is ``--seconds`` of
``fio --rw=randread --bs=4k --ioengine=psync --iodepth=1`` over the whole file.

Needs root, /dev/fuse, fio (``apt-get install fio``) and mkfs.erofs. Usage:
  python -m benchmarks.bench_random_read [--size-mib 1024] [--seconds 15] [--repeats 2] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks._common import MiB, describe_machine, machine_info, table, write_results

import casfs
from casfs.fuse.mount import control


def make_source(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def drop_tree_cache(root: str) -> None:
    """posix_fadvise(DONTNEED) every file under ``root`` (clean pages leave the page cache)."""
    for dp, _, fs in os.walk(root):
        for name in fs:
            p = os.path.join(dp, name)
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fio(path: str, size: int, seconds: int) -> dict:
    p = subprocess.run(["fio", "--name=randread", f"--filename={path}", "--rw=randread", "--bs=4k",
                        "--ioengine=psync", "--iodepth=1", f"--size={size}", f"--runtime={seconds}",
                        "--time_based", "--invalidate=1", "--randrepeat=0", "--output-format=json"],
                       capture_output=True, text=True, timeout=seconds + 120)
    if p.returncode:
        raise SystemExit(f"fio failed on {path}: {p.stderr.strip()[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]["read"]
    return {"iops": job["iops"], "bytes": job["io_bytes"], "p50_us": job["clat_ns"]["percentile"]["50.000000"] / 1e3,
            "p99_us": job["clat_ns"]["percentile"]["99.000000"] / 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default="/var/tmp", help="where the stores, ssd tiers and erofs image live")
    ap.add_argument("--blocks", default="65536", help="block sizes of the blocked images (comma-separated)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE and erofs mounts)")
    for tool in ("fio", "mkfs.erofs"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing (apt-get install {'fio' if tool == 'fio' else 'erofs-utils'})")
    started = time.time()
    machine = machine_info()
    print(describe_machine(machine))
    size = args.size_mib * MiB
    work = tempfile.mkdtemp(prefix="bench-rr-", dir=args.dir)
    os.environ["CASFS_RUNTIME_DIR"] = os.path.join(work, "run")
    src = os.path.join(work, "src")
    os.makedirs(src)
    fname = "weights.bin"
    mnt = os.path.join(work, "mnt")
    emnt = os.path.join(work, "erofs")
    os.makedirs(mnt)
    os.makedirs(emnt)
    rows: list[dict] = []
    chunk_size = 0
    try:
        make_source(os.path.join(src, fname), size)
        blocks = [int(b) for b in args.blocks.split(",")]
        variants = [(f"blocks{b}", b) for b in blocks] + [("whole", 0)]
        for variant, block in variants:
            store = casfs.open_store(os.path.join(work, f"store-{variant}"),
                                     cache_dir=os.path.join(work, f"cache-{variant}"))
            t0 = time.perf_counter()
            casfs.build(store, src, tag="bench", progress=False, block=block)
            image = store.open_image("bench")
            chunk_size = image.index.file_chunk_size(image.lookup(fname))
            for ref in image.file_chunks():  # fill the ssd tier with every whole frame
                store.ssd.put(ref, store.blob.get(ref))
            store.close()
            print(f"built and cached the {variant} image in {time.perf_counter() - t0:.1f} s", flush=True)
        eimg = os.path.join(work, "img.erofs")
        subprocess.run(["mkfs.erofs", eimg, src], check=True, capture_output=True)

        def erofs_run() -> dict:
            drop_tree_cache(eimg)
            subprocess.run(["mount", "-t", "erofs", "-o", "ro", eimg, emnt], check=True, capture_output=True)
            try:
                return fio(os.path.join(emnt, fname), size, args.seconds)
            finally:
                subprocess.run(["umount", emnt], check=True)

        def casfs_run(variant: str) -> dict:
            cache = os.path.join(work, f"cache-{variant}")
            drop_tree_cache(cache)
            store = casfs.open_store(os.path.join(work, f"store-{variant}"), cache_dir=cache)
            casfs.mount(store.open_image("bench"), mnt, replay_profile=False)
            try:
                got = fio(os.path.join(mnt, fname), size, args.seconds)
                st = control(mnt, "stats")
                tiers = {t["tier"]: t for t in st["tiers"]}
                got["ssd_bytes"] = tiers["ssd"]["bytes_read"]
                got["blob_bytes"] = tiers["blob"]["bytes_read"]
                got["fuse_reads"] = st["mount"]["reads"]
                return got
            finally:
                casfs.unmount(mnt)
                store.close()

        configs = [("erofs (file-backed)", erofs_run)]
        configs += [(f"casfs, blocked frames ({b >> 10} KiB)", lambda b=b: casfs_run(f"blocks{b}")) for b in blocks]
        configs.append(("casfs, whole frames (before)", lambda: casfs_run("whole")))
        samples: dict[str, list[dict]] = {name: [] for name, _ in configs}
        loads = []
        for rnd in range(args.repeats):
            loads.append(os.getloadavg()[0])
            for name, fn in configs:
                samples[name].append(fn())
            print(f"  round {rnd + 1}/{args.repeats}: " + ", ".join(
                f"{n.split(',')[0] if n.startswith('erofs') else n} {samples[n][-1]['iops']:.0f}" for n, _ in configs),
                flush=True)
        base = sorted(s["iops"] for s in samples[configs[0][0]])
        for name, _ in configs:
            got = samples[name]
            iops = [s["iops"] for s in got]
            ratios = [s["iops"] / e["iops"] for s, e in zip(got, samples[configs[0][0]])]
            row = {"fs": name, "IOPS (runs)": ", ".join(f"{x:.0f}" for x in iops),
                   "x erofs (same round)": ", ".join(f"{r:.3f}" for r in ratios),
                   "p50 us": sorted(s["p50_us"] for s in got)[len(got) // 2],
                   "p99 us": sorted(s["p99_us"] for s in got)[len(got) // 2]}
            if "ssd_bytes" in got[0]:
                served = sum(s["bytes"] for s in got)
                row["ssd bytes / served"] = round(sum(s["ssd_bytes"] for s in got) / max(1, served), 1)
                row["blob bytes"] = sum(s["blob_bytes"] for s in got)
            rows.append(row)
        del base
    finally:
        for m in (mnt, emnt):
            if os.path.ismount(m):
                subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(work, ignore_errors=True)
    cols = ["fs", "IOPS (runs)", "x erofs (same round)", "p50 us", "p99 us", "ssd bytes / served", "blob bytes"]
    print(f"random 4 KiB reads (fio psync QD1, {args.seconds} s a run) of a {args.size_mib} MiB file "
          f"in {chunk_size >> 20} MiB chunks; "
          f"load at round starts {loads}")
    print(table(rows, cols))
    path = write_results("bench_random_read", {"size_mib": args.size_mib, "seconds": args.seconds,
                                               "repeats": args.repeats, "load_at_rounds": loads,
                                               "chunk_size": chunk_size},
                         rows, started=started, out=args.out, machine=machine)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
