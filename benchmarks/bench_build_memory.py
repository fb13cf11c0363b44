"""Benchmark: the memory a build holds per entry, and the CPU a sparse tar costs.

Memory: ``casfs build`` runs as a subprocess (its own interpreter, so peak RSS is the build's)
over four sources of ``--entries`` entries: a directory of empty files, a directory of small
files (a few bytes each, all different: one chunk each), and the same two as plain tars. The
baseline, measured in the same run, is a build of an empty directory (interpreter, imports,
store): the figure is (peak RSS - baseline) / entries, in KiB. ``casfs build --help`` states
these figures as its limits; ``tests/test_build_limits.py`` checks them at the bound.

Sparse: a GNU tar of a 1 TiB sparse file (4 bytes at each end; a ~20 KiB archive) is built
with 64 MiB chunks; the figure is its build time against the baseline build.

Usage: python -m benchmarks.bench_build_memory [--entries 200000] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from benchmarks._common import describe_machine, machine_info, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_kib(src: str, store: str) -> tuple[float, float]:
    """(peak RSS in KiB, seconds) of ``casfs build src`` into a fresh store."""
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "casfs.cli.main", "--store", store,
                        "build", src, "--tag", "bench", "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if p.returncode != 0:
        raise SystemExit(f"build of {src} failed: {p.stderr[-500:]}")
    return float(p.stderr.strip().splitlines()[-1]), time.perf_counter() - t0


def _make_dir(root: str, n: int, content: bool) -> None:
    for i in range(n):
        d = os.path.join(root, f"d{i // 1000:04d}")
        if i % 1000 == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"file_{i:06d}.py"), "w") as f:
            if content:
                f.write(f"{i}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=200_000)
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/build_memory.json)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="casfs-bench-mem-")
    started = time.time()
    machine = machine_info()
    results: dict = {"rows": []}
    try:
        os.makedirs(f"{work}/empty")
        base, base_s = _peak_rss_kib(f"{work}/empty", f"{work}/store")
        print(f"{describe_machine(machine)}\nbaseline (empty directory): {base / 1024:.0f} MiB peak RSS, {base_s:.2f} s")
        print(f"{'SOURCE':<28} {'PEAK RSS':>10} {'PER ENTRY':>10} {'SECONDS':>8}")
        for kind, content in (("empty files", False), ("small files", True)):
            d = f"{work}/dir-{content}"
            _make_dir(d, a.entries, content)
            t = f"{work}/tar-{content}.tar"
            with tarfile.open(t, "w", format=tarfile.GNU_FORMAT) as tf:
                tf.add(d, arcname=".")
            for label, src in ((f"directory of {kind}", d), (f"tar of {kind}", t)):
                peak, secs = _peak_rss_kib(src, f"{work}/store")
                per = (peak - base) / (a.entries + a.entries // 1000 + 1)
                print(f"{label:<28} {peak / 1024:>7.0f} MiB {per:>6.2f} KiB {secs:>8.1f}")
                results["rows"].append({"source": label, "peak_rss_kib": peak, "kib_per_entry": per,
                                        "seconds": secs})
            shutil.rmtree(d)
            os.unlink(t)
        sp = f"{work}/sparse"
        os.makedirs(sp)
        with open(f"{sp}/sp", "wb") as f:
            f.write(b"head")
            f.truncate(1 << 40)
            f.seek((1 << 40) - 4)
            f.write(b"tail")
        subprocess.run(["tar", "--sparse", "--format=posix", "-cf", f"{work}/sp.tar", "-C", sp, "sp"], check=True)
        os.unlink(f"{sp}/sp")
        shutil.rmtree(f"{work}/store", ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", f"{work}/store", "build",
                        f"{work}/sp.tar", "--tag", "sp", "--chunk-size", "64M", "--no-progress"], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": ROOT})
        secs = time.perf_counter() - t0
        size = os.path.getsize(f"{work}/sp.tar")
        print(f"sparse tar ({size / 1024:.0f} KiB archive, 1 TiB file): {secs:.2f} s "
              f"({secs / base_s:.1f}x the empty build)")
        results["sparse_tar"] = {"archive_bytes": size, "seconds": secs, "baseline_seconds": base_s}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("results:", write_results("build_memory", {"entries": a.entries}, results, started=started,
                                    out=a.out, machine=machine))


if __name__ == "__main__":
    main()
