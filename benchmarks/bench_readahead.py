"""Benchmark: sequential reads through a casfs mount per kernel readahead setting, against erofs
and the local disk on the same bytes.

A ``--size`` file (default 1 GiB, random bytes: stored raw, like float weights) is built into an
image with 4 MiB chunks in a store under ``--store-dir`` (default /dev/shm: RAM-backed, so the
numbers are about the read path, not the disk). Then for each ``read_ahead_kb`` x
``max_background`` pair, in ``--repeats`` interleaved rounds (best and median kept):

  cold   a fresh mount (nothing in casfs's memory tier or the mount's page cache; the store's
         files are in RAM) read start to end with 1 MiB ``readinto`` calls
  warm   the same file read again on the same mount (keep_cache: served by the page cache)
  mem-hot  read a third time after ``posix_fadvise(DONTNEED)`` of the mount's file: the page
         cache is cold but every chunk sits in the daemon's memory tier (sized to hold the
         file), so this is the FUSE path alone, without the store's fetch and verification

Baselines measured in the same run the same way:

  erofs  ``mkfs.erofs`` image of the same file in the same directory, mounted file-backed
         (the kernel's own read-only image filesystem: Nydus's in-kernel path); cold = fresh mount
  disk   the source file on the local disk; cold = after ``posix_fadvise(DONTNEED)`` of that file
         only (no global cache drop: other work shares this machine)

Caveats: 2-core VMs shared with other work; freshly allocated page cache is slow to touch the
first time here (see DESIGN.md), which caps every cold number, the baselines' too.

Needs root and /dev/fuse. Usage:
  python -m benchmarks.bench_readahead [--size-mib 1024] [--repeats 2] [--ra 128,1024,4096,32768]
      [--bg 12,64] [--store-dir /dev/shm]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks._common import MiB, describe_machine, machine_info, table, write_results

import casfs
from casfs.fuse.mount import control

GiB = 1 << 30


def read_file(path: str, block: int = MiB) -> float:
    """Seconds to read ``path`` start to end with ``block``-sized readinto calls."""
    buf = bytearray(block)
    mv = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(mv):
            pass
    return time.perf_counter() - t0


def drop_file_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_source(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())  # clean pages: posix_fadvise(DONTNEED) can then drop them


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ra", default="128,1024,4096,32768", help="read_ahead_kb values")
    ap.add_argument("--bg", default="12,64", help="max_background values")
    ap.add_argument("--store-dir", default="/dev/shm")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    started = time.time()
    machine = machine_info()
    print(describe_machine(machine))
    size = args.size_mib * MiB
    work = tempfile.mkdtemp(prefix="bench-ra-")
    shm = tempfile.mkdtemp(prefix="bench-ra-", dir=args.store_dir)
    os.environ["CASFS_RUNTIME_DIR"] = os.path.join(work, "run")
    mnt = os.path.join(work, "mnt")
    emnt = os.path.join(work, "erofs")
    os.makedirs(mnt)
    os.makedirs(emnt)
    src = os.path.join(work, "src")
    os.makedirs(src)
    fname = "weights.bin"
    rows: list[dict] = []
    params_load: list[float] = []
    try:
        make_source(os.path.join(src, fname), size)
        store = casfs.open_store(os.path.join(shm, "store"))
        t0 = time.perf_counter()
        casfs.build(store, src, tag="bench", progress=False)
        print(f"built {args.size_mib} MiB image in {time.perf_counter() - t0:.1f} s")
        image = store.open_image("bench")
        store.close()
        gib = size / GiB

        disk = os.path.join(src, fname)
        eimg = os.path.join(shm, "img.erofs")
        have_erofs = bool(shutil.which("mkfs.erofs"))
        if have_erofs:
            subprocess.run(["mkfs.erofs", "-d0", eimg, src], check=True, capture_output=True)

        def disk_round() -> tuple[float, float, float, float]:
            drop_file_cache(disk)
            cold = read_file(disk)
            return cold, read_file(disk), 0.0, 0.0

        def erofs_round() -> tuple[float, float, float, float]:
            subprocess.run(["mount", "-t", "erofs", "-o", "ro", eimg, emnt], check=True, capture_output=True)
            try:
                cold = read_file(os.path.join(emnt, fname))
                return cold, read_file(os.path.join(emnt, fname)), 0.0, 0.0
            finally:
                subprocess.run(["umount", emnt], check=True)

        def casfs_round(ra: int, bg: int, user_ra: bool) -> tuple[float, float, float, float]:
            # a memory tier that holds the whole file, so that the third read measures FUSE alone
            image = casfs.open_store(os.path.join(shm, "store"), memory_bytes=size + 256 * MiB).open_image("bench")
            casfs.mount(image, mnt, read_ahead_kb=ra, max_background=bg, readahead=user_ra, replay_profile=False)
            try:
                path = os.path.join(mnt, fname)
                cold = read_file(path)
                s = control(mnt, "stats")["mount"]
                warm = read_file(path)
                drop_file_cache(path)  # the mount's page cache only: chunks stay in the memory tier
                hot = read_file(path)
                return cold, warm, s["read_bytes"] / max(1, s["reads"]), hot
            finally:
                casfs.unmount(mnt)

        # every configuration once per round, rounds repeated: load changes on a shared machine
        # then spread over all configurations instead of favouring whichever ran in a quiet spell
        configs: list[tuple[dict, object]] = [
            ({"fs": "disk (ext4)", "read_ahead_kb": "default", "max_background": ""}, disk_round)]
        if have_erofs:
            configs.append(({"fs": "erofs (file-backed)", "read_ahead_kb": "default", "max_background": ""},
                            erofs_round))
        for ra in map(int, args.ra.split(",")):
            for bg in map(int, args.bg.split(",")):
                configs.append(({"fs": "casfs", "read_ahead_kb": ra, "max_background": bg},
                                lambda ra=ra, bg=bg: casfs_round(ra, bg, True)))
        configs.append(({"fs": "casfs (no user readahead)", "read_ahead_kb": 1024, "max_background": 64},
                        lambda: casfs_round(1024, 64, False)))
        samples: list[list[tuple[float, float, float, float]]] = [[] for _ in configs]
        loads = []
        for rnd in range(args.repeats):
            loads.append(os.getloadavg()[0])
            for k, (_, fn) in enumerate(configs):
                samples[k].append(fn())  # type: ignore[operator]
            print(f"  round {rnd + 1}/{args.repeats} done (load {os.getloadavg()[0]:.1f})", flush=True)
        for (row, _), got in zip(configs, samples):
            colds = sorted(gib / g[0] for g in got)
            warms = sorted(gib / g[1] for g in got)
            row = dict(row)
            row.update({"cold GiB/s": colds[-1], "cold median": colds[len(colds) // 2],
                        "warm GiB/s": warms[-1], "warm median": warms[len(warms) // 2]})
            if row["fs"].startswith("casfs"):
                hots = sorted(gib / g[3] for g in got)
                row["mem-hot GiB/s"] = hots[-1]
                row["mem-hot median"] = hots[len(hots) // 2]
                row["avg request KiB"] = sum(g[2] for g in got) / len(got) / 1024
            rows.append(row)
        params_load = loads
    finally:
        if os.path.ismount(emnt):
            subprocess.run(["umount", emnt], check=False)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    cols = ["fs", "read_ahead_kb", "max_background", "cold GiB/s", "cold median", "warm GiB/s", "warm median",
            "mem-hot GiB/s", "mem-hot median", "avg request KiB"]
    print(f"sequential read of a {args.size_mib} MiB file: best and median of {args.repeats} interleaved rounds; "
          f"store in {args.store_dir}; load at round starts {params_load}")
    print(table(rows, cols))
    path = write_results("bench_readahead", {"size_mib": args.size_mib, "repeats": args.repeats,
                                             "store_dir": args.store_dir, "load_at_rounds": params_load},
                         rows, started=started,
                         out=args.out, machine=machine)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
