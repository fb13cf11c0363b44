"""Benchmark: mount latency of a 50,000-entry image (what a replica waits for before its first read).

The tree of ``bench_index.py`` (``--entries`` entries, default 50,000) is stored as an image in a
local store; its chunks are never read. ``--repeats`` times each (median reported):

  index load          ``Store.load_index`` in a fresh process (the part a mount blocks on)
  cli mount           wall time of ``casfs mount NAME MNT`` as a subprocess: interpreter start,
                      imports, index load, fork, FUSE mount, FUSE_INIT, kernel tuning, and the
                      caller's stat of the mount point; then the time of the first ``stat`` of a
                      path inside (it must answer from the index alone)
  api mount           ``casfs.mount(image, MNT)`` in an already running process with the index
                      loaded: fork + daemon start (trio/pyfuse3 imports) + FUSE mount
  mount -> first stat the cli time plus the first stat: the number to hold against ~100 ms

Needs root and /dev/fuse. Usage: python -m benchmarks.bench_mount [--entries 50000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks._common import Samples, describe_machine, machine_info, table, write_results
from benchmarks.bench_index import make_tree

import casfs
from casfs.index import serialize


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    started = time.time()
    machine = machine_info()
    print(describe_machine(machine))
    work = tempfile.mkdtemp(prefix="bench-mount-")
    os.environ["CASFS_RUNTIME_DIR"] = os.path.join(work, "run")
    try:
        entries, chunks = make_tree(args.entries)
        store = casfs.open_store(os.path.join(work, "store"))
        data = serialize(entries, chunks, 4 << 20)
        store.tag("bench", store.put_index(data))
        probe = next(e.path for e in reversed(entries) if e.path.count("/") >= 2)
        mnt = os.path.join(work, "mnt")
        os.makedirs(mnt)
        py = sys.executable
        load, cli, first, total, api = Samples(), Samples(), Samples(), Samples(), Samples()
        code = ("import time,casfs;s=casfs.open_store(%r);t=time.perf_counter();s.load_index(s.resolve('bench'));"
                "print(time.perf_counter()-t)") % store.url
        for k in range(args.repeats + 1):
            out = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout
            t0 = time.perf_counter()
            subprocess.run([py, "-m", "casfs.cli.main", "--store", store.url, "mount", "bench", mnt],
                           check=True, capture_output=True)
            t1 = time.perf_counter()
            os.stat(os.path.join(mnt, probe))
            t2 = time.perf_counter()
            casfs.unmount(mnt)
            image = store.open_image("bench")
            t3 = time.perf_counter()
            casfs.mount(image, mnt, replay_profile=False)
            t4 = time.perf_counter()
            os.stat(os.path.join(mnt, probe))
            casfs.unmount(mnt)
            if k:  # the first round warms the page cache
                load.add(float(out))
                cli.add(t1 - t0)
                first.add(t2 - t1)
                total.add(t2 - t0)
                api.add(t4 - t3)
        rows = [{"step": n, "median ms": s.median * 1e3, "min ms": s.min * 1e3, "max ms": max(s.values) * 1e3}
                for n, s in (("index load (in process)", load), ("cli `casfs mount` (subprocess)", cli),
                             ("first stat after it returns", first), ("mount -> first stat", total),
                             ("casfs.mount() with index loaded", api))]
        print(f"{args.entries} entries, index {len(data) / 1e6:.1f} MB serialized")
        print(table(rows, ["step", "median ms", "min ms", "max ms"]))
        path = write_results("bench_mount", {"entries": args.entries, "repeats": args.repeats,
                                             "index_bytes": len(data)},
                             {r["step"]: r for r in rows}, started=started, out=args.out, machine=machine)
        print(f"results: {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
