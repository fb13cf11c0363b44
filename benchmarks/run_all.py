"""Run the benchmarks one after another (``make bench``), each with its default arguments.

Each benchmark prints its own tables (with same-run baselines) and writes
``benchmarks/results/<name>.json``. This runner adds nothing but order, a header per
benchmark, and an exit status: nonzero when any benchmark failed.

Usage: python -m benchmarks.run_all [NAME ...] [--list] [--markdown]
   NAME: a benchmark name from the list below (default: all of DEFAULT), e.g. ``index tiers``.
   Extra arguments for one benchmark: ``--args NAME="--repeats 5"`` (repeatable).
   ``--markdown`` runs nothing: it prints the tables of docs/benchmarks.md's "Core" section
   from benchmarks/results/{index,build,tiers}.json (to refresh the docs after a run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> script. Benchmarks that need hardware this machine may lack (GPUs) are left to their
# own scripts; add a CPU benchmark here to make `make bench` run it.
BENCHMARKS = {
    "index": "bench_index.py",
    "build": "bench_build.py",
    "tiers": "bench_tiers.py",
}
DEFAULT = ["index", "build", "tiers"]


def _load(name: str) -> dict | None:
    try:
        with open(os.path.join(HERE, "results", f"{name}.json")) as f:
            return json.load(f)
    except OSError:
        return None


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def _header(doc: dict) -> str:
    m = doc["machine"]
    load = f"load {m['loadavg'][0]:.1f} at start"
    if "loadavg_end" in m:
        load += f", {m['loadavg_end'][0]:.1f} at end"
    return (f"`{doc['command']}` ({doc['started']}, {doc['seconds']:.0f} s, commit {m['git_commit']}, "
            f"{load})")


def markdown() -> str:
    """The Core section's tables, rendered from the latest results JSON."""
    out = []
    d = _load("index")
    if d:
        r = d["results"]
        out += [f"Index load: {_header(d)}", "",
                f"{r['entries']} entries ({r['dirs']} dirs, {r['files']} files, {r['symlinks']} symlinks), "
                f"{r['chunks']} chunks; index {_mib(r['index_bytes'])}, stored frame {_mib(r['frame_bytes'])}, "
                f"the same tree as JSON {_mib(r['json_bytes'])}.", "",
                "| step | min ms | median ms | p90 ms | median vs json.loads |", "| --- | --- | --- | --- | --- |"]
        for label, key in (("`Store.load_index`, new Store (fetch + decode + verify + parse)", "load_index_ms"),
                           ("  fetch the frame (page cache)", "fetch_ms"),
                           ("  decode (zstd) + verify (blake3)", "decode_verify_ms"),
                           ("  `Index.parse`", "parse_ms"),
                           ("`json.loads` of the same tree (baseline)", "json_loads_ms")):
            v = r[key]
            out.append(f"| {label} | {v['min']:.1f} | {v['median']:.1f} | {v['p90']:.1f} | "
                       f"{v['median'] / r['json_loads_ms']['median']:.3f}x |")
        out += ["", f"Path lookup: `Index.lookup` {r['lookup_ns'] / 1e3:.1f} us/op vs {r['json_lookup_ns'] / 1e3:.1f} "
                f"us/op walking the JSON tree's dicts ({r['lookup_ns'] / r['json_lookup_ns']:.1f}x; mean depth "
                f"{r['lookup_mean_depth']:.1f}); `Index.walk` {r['walk_ns_per_entry']:.0f} ns/entry; "
                f"`serialize` {r['serialize_ms']:.0f} ms.", ""]
    d = _load("build")
    if d:
        r = d["results"]
        t, b = r["tree_info"], r["baselines"]
        out += [f"Build: {_header(d)}", "",
                f"Tree: {t['files']} files, {t['bytes'] / 1e9:.2f} GB, {t['dirs']} dirs, {t['symlinks']} symlinks; "
                f"{t['small_files']} files <= 64 KiB ({t['small_bytes'] / 1e6:.0f} MB); median file "
                f"{t['median_file']} B, largest {_mib(t['largest_file'])}. Baselines: `cat` {b['cat_MBps']:.0f} MB/s, "
                f"`tar cf - . | zstd -1 -T0` {b['tar_zstd1_MBps']:.0f} MB/s ({b['tar_zstd1_MB_per_cpu_s']:.0f} MB per "
                f"CPU-s) to {_mib(b['tar_zstd1_bytes'])} "
                f"({b['tar_zstd1_bytes'] / t['bytes']:.3f} of raw). Rebuild: one byte flipped in "
                f"`{r['changed_file']['path']}` ({_mib(r['changed_file']['bytes'])}).", "",
                "| chunk size | build MB/s (vs tar\\|zstd) | build MB per CPU-s (vs tar\\|zstd) | stored / raw | "
                "objects: packs + loose | rebuild: new raw, store growth | read every file MB/s (vs cat), MB per CPU-s | "
                "cold 4 KiB read p50 / p99 ms (CPU p50) |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in r["builds"]:
            rb = (f"{_mib(x['rebuild_new_raw_bytes'])}, {_mib(x['rebuild_store_growth_bytes'])}"
                  if "rebuild_new_raw_bytes" in x else "")
            rd = (f"{x['read_all_MBps']:.0f} ({x['read_vs_cat']:.2f}x), {x['read_all_MB_per_cpu_s']:.0f}"
                  if "read_all_MBps" in x else "")
            rn = f"{x['rand4k_ms']['median']:.1f} / {x['rand4k_ms']['p99']:.1f}" if "rand4k_ms" in x else ""
            if "rand4k_cpu_ms" in x:
                rn += f" (CPU {x['rand4k_cpu_ms']['median']:.1f})"
            out.append(f"| {_mib(x['chunk_size'])} | {x['build_MBps']:.0f} ({x['vs_tar_zstd']:.2f}x) | "
                       f"{x['build_MB_per_cpu_s']:.0f} ({x['cpu_vs_tar_zstd']:.2f}x) | "
                       f"{x['stored_vs_raw']:.3f} | {x['packs']} + {x['loose']} | {rb} | {rd} | {rn} |")
        if "rand4k_pread_ms" in r:
            out += ["", f"os.pread of the same 4 KiB (page cache): p50 {r['rand4k_pread_ms']['median'] * 1e3:.1f} us."]
        out.append("")
    d = _load("tiers")
    if d:
        out += [f"Tiers: {_header(d)}", ""]
        for note in d["results"].get("notes", []):
            out += [f"Note: {note}", ""]
        for kind, k in d["results"]["kinds"].items():
            rows = k["tiers"]
            base = next(x for x in rows if x["tier"].startswith("os.pread"))
            out += [f"{kind}: {_mib(k['size'])} stored as {_mib(k['stored_bytes'])} "
                    f"({k.get('packs', '?')} packs, {k.get('loose', '?')} loose chunks).", "",
                    "| tier | sequential 4 MiB reads MB/s (vs pread), MB per CPU-s | 4 KiB random p50 / p99 us (CPU p50) | "
                    "4 KiB ops/s (vs pread) | served by |", "| --- | --- | --- | --- | --- |"]
            for x in rows:
                served = ", ".join(f"{a} {n}" for a, n in x["served_by"].items())
                out.append(f"| {x['tier']} | {x['seq_MBps']:.0f} ({x['seq_MBps'] / base['seq_MBps']:.3g}x), "
                           f"{x.get('seq_MB_per_cpu_s', 0):.0f} | "
                           f"{x['rand']['median'] * 1e3:.1f} / {x['rand']['p99'] * 1e3:.1f}"
                           f"{' (%.1f)' % (x['rand_cpu']['median'] * 1e3) if 'rand_cpu' in x else ''} | "
                           f"{x['rand_ops']:.0f} ({x['rand_ops'] / base['rand_ops']:.2g}x) | {served} |")
            out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: %s)" % " ".join(DEFAULT))
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--markdown", action="store_true",
                    help="print the docs tables from benchmarks/results/*.json and exit")
    ap.add_argument("--args", action="append", default=[], metavar='NAME="ARGS"',
                    help="extra command-line arguments for one benchmark")
    args = ap.parse_args()
    if args.markdown:
        print(markdown())
        return 0
    if args.list:
        for name, script in BENCHMARKS.items():
            print(f"{name:8s} benchmarks/{script}{'  (default)' if name in DEFAULT else ''}")
        return 0
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, _, rest = item.partition("=")
        extra.setdefault(name, []).extend(shlex.split(rest))
    names = args.names or DEFAULT
    unknown = [n for n in names + list(extra) if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    failed = []
    for name in names:
        module = "benchmarks." + BENCHMARKS[name].removesuffix(".py")
        cmd = [sys.executable, "-m", module, *extra.get(name, [])]
        print(f"\n===== {name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=os.path.dirname(HERE))  # from the repo root: see benchmarks/_common.py
        print(f"===== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f} s",
              flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
