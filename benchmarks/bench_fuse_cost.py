#!/usr/bin/env python3
"""Where a lazy start's time goes without any network: a start from a local store through the
FUSE mount against the same root on local disk, with the mount daemon's CPU split by thread.

The image is the root of ``bench_cold_start_root.py`` (Debian + Python + the vLLM CPU venv,
built once into ``--root``). The workload runs chrooted in its own mount and PID namespaces
(``unshare -mpf``, the host's /dev bound in, a fresh /proc; no runc) with the page cache dropped
before each run:

  native        the root on local disk
  lazy, local   a fresh ``casfs.mount`` of the image from a local store (zstd frames, no ssd
                tier: every chunk is read, decompressed and verified from the store's files)
  lazy, warm ssd   the same with an ssd tier filled by a first run (the host keeps frames
                raw: nothing to decompress)

For each mount: the daemon's CPU seconds (``/proc/<pid>/task/*/stat``) split into its main
thread (the pyfuse3/trio loop and the handlers) and its other threads (chunk fetches: reads,
zstd, blake3), the handlers' own time per request kind (``stats()["mount"]["seconds"]``) and
the request counts. What is left of the main thread's CPU after the handlers is pyfuse3's and
trio's per-request cost.

Needs root, /dev/fuse. Usage:
  python -m benchmarks.bench_fuse_cost [--root /var/tmp/casfs-vllm-root] [--repeat 2] [--workload torch]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks._common import describe_machine, machine_info, table, write_results
from benchmarks.bench_cold_start_root import WORKLOADS, drop_caches, make_root

import casfs
from casfs.fuse.mount import control

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError, ValueError):
            continue
    return out


def run_in(root: str, cmd: list[str]) -> float:
    t0 = time.perf_counter()
    # private mount + PID namespaces; the host's /dev bound in (FUSE mounts are nodev), a /proc,
    # a writable /tmp (as a container gets)
    script = ('r=$1; shift; mount --bind /dev "$r/dev" && mount -t proc proc "$r/proc" && '
              'mount -t tmpfs tmpfs "$r/tmp" && exec chroot "$r" "$@"')
    p = subprocess.run(["unshare", "-mpf", "/bin/sh", "-c", script, "sh", root] + cmd, capture_output=True,
                       text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"})
    if p.returncode:
        raise SystemExit(f"workload failed in {root}: {p.stderr[-2000:]}")
    return time.perf_counter() - t0


def lazy(store_dir: str, cache: str | None, mnt: str, cmd: list[str]) -> dict:
    store = casfs.open_store(store_dir, cache_dir=cache)
    t0 = time.perf_counter()
    info = casfs.mount(store.open_image("root"), mnt, replay_profile=False)
    t_mount = time.perf_counter() - t0
    try:
        before = thread_cpu(info.pid)
        wall = run_in(mnt, cmd) + t_mount
        after = thread_cpu(info.pid)
        st = control(mnt, "stats")
    finally:
        casfs.unmount(mnt)
        store.close()
    main_cpu = after.get(info.pid, 0.0) - before.get(info.pid, 0.0)
    other = sum(v - before.get(t, 0.0) for t, v in after.items() if t != info.pid)
    m = st["mount"]
    handlers = sum(v for k, v in m["seconds"].items() if k != "fetch_wait")
    requests = sum(m[k] for k in ("lookups", "getattrs", "opens", "reads", "readdirs", "forgets",
                                  "flushes", "getxattrs"))
    return {"wall": wall, "main_cpu": main_cpu, "fetch_cpu": other, "handlers": handlers,
            "loop": max(0.0, main_cpu - handlers), "requests": requests, "per_request_us":
            1e6 * max(0.0, main_cpu) / max(1, requests), "fetch_wait": m["seconds"]["fetch_wait"],
            "lookups": m["lookups"], "getattrs": m["getattrs"], "opens": m["opens"], "reads": m["reads"],
            "read_MB": m["read_bytes"] / 1e6, "fetches": m["fetches"], "block_reads": m["block_reads"],
            "seconds": m["seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/var/tmp/casfs-vllm-root")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="torch")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default=None, help="work directory; a store built there before is reused")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE, unshare, dropping the page cache)")
    started = time.time()
    machine = machine_info()
    print(describe_machine(machine), flush=True)
    make_root(args.root)
    cmd = WORKLOADS[args.workload]
    work = args.work or tempfile.mkdtemp(prefix="casfs-fusecost-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    os.environ["CASFS_RUNTIME_DIR"] = os.path.join(work, "run")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    store_dir = os.path.join(work, "store")
    rows: dict[str, list[dict]] = {"native": [], "lazy, local store": [], "lazy, warm ssd (raw)": []}
    try:
        if not os.path.isdir(store_dir):
            with casfs.open_store(store_dir) as s:
                casfs.build(s, args.root, tag="root", progress=False)
        cache = os.path.join(work, "cache")
        shutil.rmtree(cache, ignore_errors=True)
        lazy(store_dir, cache, mnt, cmd)  # fills the ssd tier
        for r in range(args.repeat):
            drop_caches()
            rows["native"].append({"wall": run_in(args.root, cmd)})
            drop_caches()
            rows["lazy, local store"].append(lazy(store_dir, None, mnt, cmd))
            drop_caches()
            rows["lazy, warm ssd (raw)"].append(lazy(store_dir, cache, mnt, cmd))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['wall']:.2f}s" for k, v in rows.items()), flush=True)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", mnt], check=False)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out = []
    nat = statistics.median(x["wall"] for x in rows["native"])
    for name, runs in rows.items():
        row = {"scenario": name, "wall s (runs)": ", ".join(f"{x['wall']:.2f}" for x in runs),
               "x native": round(statistics.median(x["wall"] for x in runs) / nat, 2)}
        if "main_cpu" in runs[0]:
            for k in ("main_cpu", "handlers", "loop", "fetch_cpu", "fetch_wait", "requests", "per_request_us",
                      "lookups", "getattrs", "opens", "reads", "read_MB", "fetches", "block_reads"):
                row[k] = round(statistics.median(x[k] for x in runs), 3)
        out.append(row)
    cols = ["scenario", "wall s (runs)", "x native", "main_cpu", "handlers", "loop", "fetch_cpu", "fetch_wait",
            "requests", "per_request_us", "lookups", "getattrs", "opens", "reads", "read_MB", "fetches", "block_reads"]
    print(f"workload {args.workload}: {' '.join(cmd)}; page cache dropped before each run")
    print(table(out, cols))
    path = write_results("fuse_cost", {"workload": args.workload, "repeat": args.repeat}, {"rows": out, "runs": rows},
                         started=started, out=args.out, machine=machine)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
