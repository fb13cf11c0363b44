"""What checking a snapshot's per-host export costs a restore (snapshot.verify).

Snapshots a process that imported torch and numpy (the shape of a real replica's host side),
restores it once (export + stamps), then times, in one run: a restore from the cached export
(which includes the default stamp check), the stamp check alone, and the full check (every
file hashed against the image's chunk digests, ``CASFS_SNAPSHOT_VERIFY=full``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/snapshot_verify.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import casfs
from snapshot import cpu, verify

PROGRAM = r'''
import sys, numpy, torch, snapshot
x = torch.randn(1024, 1024)
snapshot.ready()
sys.exit(0)
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="casfs-verify-bench-")
    prog = os.path.join(tmp, "prog.py")
    with open(prog, "w") as f:
        f.write(PROGRAM)
    store = casfs.open_store(os.path.join(tmp, "store"))
    proc = cpu.spawn([sys.executable, prog])
    ref = cpu.checkpoint(proc, store, "bench", ready_timeout=300)
    proc.wait(10)
    cache = os.path.join(tmp, "cache")
    cpu.restore("bench", store, cache_dir=cache).wait(60)  # export + stamps
    export = os.path.join(cache, ref.image_id)
    image = store.open_image("bench")
    size = sum(st.size for _, st in image.walk("") if st.is_file)
    restore, stamps, full = [], [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        cpu.restore("bench", store, cache_dir=cache).wait(60)
        restore.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert verify.check(image, export, full=False) == []
        stamps.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert verify.check(image, export, full=True) == []
        full.append(time.perf_counter() - t)
    med = statistics.median
    print(f"export {size / 2**20:.0f} MiB, {args.repeat} repeats (min-max, median):")
    print(f"  restore from the cached export until the process exited (stamp check included): {min(restore):.3f}-{max(restore):.3f} s, "
          f"median {med(restore):.3f}")
    print(f"  stamp check alone: {min(stamps) * 1000:.2f}-{max(stamps) * 1000:.2f} ms = "
          f"{med(stamps) / med(restore) * 100:.2f}% of a restore")
    print(f"  full check (every file hashed): {min(full):.3f}-{max(full):.3f} s = {med(full) / med(restore):.2f}x a "
          f"restore, {size / med(full) / 2**30:.2f} GiB/s")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
