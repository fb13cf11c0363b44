#!/usr/bin/env python3
"""Cold container start: `import torch` from a ~1 GB venv image over an emulated network.

The blob store is a casfs store directory served by Debian's nginx (the ``http://`` backend)
behind a user-space delay relay (``tests.support.FaultProxy``: this kernel has no netem), so
every blob request pays the emulated round trip and bandwidth cap. Scenarios, each timed from
"nothing local" to the end of ``python -c "import torch; torch.ones(2).sum()"``:

  (a) pull + extract: ``casfs copy`` to a local store, ``casfs export``, run from the export
  (b) lazy mount, cold caches (empty ssd tier, page cache dropped), no profile replay
  (c) lazy mount, cold caches, startup profile replayed (recorded once beforehand)
  (d) lazy mount, warm ssd tier (page cache dropped)
  (e) native: the venv on local disk (page cache dropped)

The interpreter and the standard library come from the host in every scenario (a venv's
``bin/python`` links to its base interpreter); the image holds the venv's site-packages with
torch (what an inference image adds on top of a base). Prints a table and the ratios, and writes
JSON next to ``--out``.

Usage: python -m benchmarks.bench_cold_start [--venv DIR] [--rtt-ms 50] [--rate-mbit 1000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from tests.support import FaultProxy, nginx_static

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CASFS = [sys.executable, "-m", "casfs.cli.main"]
WORKLOAD = ["-c", "import torch; torch.ones(2).sum()"]


def drop_caches() -> bool:
    """Drop the page cache (root only). Returns False where that is not allowed."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def casfs(*args: str, env: dict | None = None) -> str:
    p = subprocess.run(CASFS + list(args), capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"casfs {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


def run_workload(root: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([os.path.join(root, "bin", "python")] + WORKLOAD, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    if p.returncode:
        raise SystemExit(f"workload failed in {root}: {p.stderr[-2000:]}")
    return time.perf_counter() - t0


def ensure_venv(path: str) -> str:
    if not os.path.exists(os.path.join(path, "bin", "python")):
        print(f"creating {path} with torch==2.13.0 (from local disk)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
        subprocess.run([os.path.join(path, "bin", "pip"), "install", "-q", "torch==2.13.0"], check=True)
    return path


def tree_stats(root: str) -> tuple[int, int]:
    n = size = 0
    for dp, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(dp, f)
            if not os.path.islink(p):
                n += 1
                size += os.lstat(p).st_size
    return n, size


def mounted_run(store_url: str, cache_dir: str, mnt: str, *extra: str) -> tuple[float, dict]:
    from casfs.fuse.mount import control

    t0 = time.perf_counter()
    casfs("--store", store_url, "--cache-dir", cache_dir, "mount", "torchvenv", mnt, *extra)
    t_mount = time.perf_counter() - t0
    run_workload(mnt)
    total = time.perf_counter() - t0
    stats = control(mnt, "stats")
    casfs("umount", mnt)
    return total, {"mount_s": t_mount, "stats": stats}


def blob_bytes(stats: dict) -> int:
    return sum(t.get("bytes_read", 0) for t in stats.get("tiers", []) if t.get("tier") == "blob")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default="/tmp/casfs-bench-torchvenv", help="venv with torch (created if missing)")
    ap.add_argument("--rtt-ms", type=float, default=50.0, help="emulated round trip to the blob store")
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="emulated bandwidth cap, each direction")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default=None, help="work directory (default: a new temp dir)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cold_start.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE mounts, dropping the page cache)")

    venv = ensure_venv(args.venv)
    work = args.work or tempfile.mkdtemp(prefix="casfs-coldstart-")
    local = os.path.join(work, "store")
    nfiles, nbytes = tree_stats(venv)
    print(f"image source: {venv}: {nfiles} files, {nbytes / 1e9:.2f} GB", flush=True)
    out = casfs("--store", local, "build", venv, "--tag", "torchvenv", "--no-progress")
    print(out.strip(), flush=True)
    stored = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(local) for f in fs)

    results: dict[str, list[float]] = {k: [] for k in "abcde"}
    detail: dict[str, list] = {k: [] for k in "abcde"}
    can_drop = drop_caches()
    with nginx_static(local) as base:
        port = int(base.rstrip("/").rsplit(":", 1)[1])
        with FaultProxy(port) as proxy:
            half = args.rtt_ms / 2000.0
            rate = args.rate_mbit * 1e6 / 8
            proxy.set_latency(up=half, down=half)
            proxy.set_rate(up=rate, down=rate)
            remote = f"http://127.0.0.1:{proxy.port}/"
            mnt = os.path.join(work, "mnt")
            os.makedirs(mnt, exist_ok=True)

            # record a startup profile once (against the local store: nginx then serves it)
            casfs("--store", local, "mount", "torchvenv", mnt, "--record-profile", "120", "--no-profile")
            run_workload(mnt)
            casfs("profile", "stop", mnt)
            casfs("umount", mnt)
            print(casfs("--store", local, "profile", "show", "torchvenv", "--limit", "0").strip()[-300:], flush=True)

            for r in range(args.repeat):
                # (e) native
                drop_caches()
                results["e"].append(run_workload(venv))
                # (a) pull + extract
                dst, exp = os.path.join(work, f"pull{r}"), os.path.join(work, f"export{r}")
                drop_caches()
                t0 = time.perf_counter()
                casfs("copy", "torchvenv", "--from", remote, "--to", dst, "--no-progress")
                t_copy = time.perf_counter() - t0
                casfs("--store", dst, "export", "torchvenv", exp, "--no-progress")
                t_export = time.perf_counter() - t0 - t_copy
                run_workload(exp)
                results["a"].append(time.perf_counter() - t0)
                detail["a"].append({"copy_s": t_copy, "export_s": t_export})
                shutil.rmtree(dst)
                shutil.rmtree(exp)
                # (b) lazy, cold, no profile
                cache_b = os.path.join(work, f"cache-b{r}")
                drop_caches()
                t, d = mounted_run(remote, cache_b, mnt, "--no-profile")
                results["b"].append(t)
                detail["b"].append({"mount_s": d["mount_s"], "blob_bytes": blob_bytes(d["stats"])})
                # (d) warm ssd (the cache (b) just filled), page cache dropped
                drop_caches()
                t, d = mounted_run(remote, cache_b, mnt, "--no-profile")
                results["d"].append(t)
                detail["d"].append({"mount_s": d["mount_s"], "blob_bytes": blob_bytes(d["stats"])})
                shutil.rmtree(cache_b)
                # (c) lazy, cold, profile replay
                cache_c = os.path.join(work, f"cache-c{r}")
                drop_caches()
                t, d = mounted_run(remote, cache_c, mnt)
                results["c"].append(t)
                detail["c"].append({"mount_s": d["mount_s"], "blob_bytes": blob_bytes(d["stats"])})
                shutil.rmtree(cache_c)
                print(f"round {r + 1}: " + "  ".join(f"({k}) {v[-1]:.2f}s" for k, v in sorted(results.items())), flush=True)
            proxy_stats = dict(proxy.stats) if hasattr(proxy, "stats") else {}

    med = {k: statistics.median(v) for k, v in results.items()}
    names = {"a": "pull + extract (copy + export) then run", "b": "lazy mount, cold caches",
             "c": "lazy mount, cold caches, profile replay", "d": "lazy mount, warm ssd tier",
             "e": "native local disk"}
    print(f"\nimport torch; torch.ones(2).sum()  — blob over http behind a {args.rtt_ms:.0f} ms RTT, "
          f"{args.rate_mbit:.0f} Mbit/s relay; page cache dropped before each run: {can_drop}")
    print(f"{'scenario':<44} {'median s':>9} {'runs':>18} {'vs (a)':>8} {'vs (e)':>8}")
    for k in "abcde":
        runs = ", ".join(f"{x:.2f}" for x in results[k])
        print(f"({k}) {names[k]:<40} {med[k]:>9.2f} {runs:>18} {med['a'] / med[k]:>7.1f}x {med[k] / med['e']:>7.2f}x")
    fr_b = statistics.median(x["blob_bytes"] for x in detail["b"]) / stored
    fr_c = statistics.median(x["blob_bytes"] for x in detail["c"]) / stored
    print(f"fraction of stored image bytes fetched from the blob tier: (b) {fr_b:.1%}, (c) {fr_c:.1%} "
          f"(stored {stored / 1e6:.0f} MB for {nbytes / 1e6:.0f} MB of files)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": platform.uname()._asdict(),
                   "cpus": os.cpu_count(), "rtt_ms": args.rtt_ms, "rate_mbit": args.rate_mbit,
                   "files": nfiles, "bytes": nbytes, "stored_bytes": stored, "results": results,
                   "median": med, "detail": detail, "page_cache_dropped": can_drop,
                   "proxy": proxy_stats}, f, indent=1, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
