"""Run the benchmarks one after another (``make bench``), each with its default arguments.

Each benchmark prints its own tables (with same-run baselines) and writes
``benchmarks/results/<name>.json``. This runner adds nothing but order, a header per
benchmark, and an exit status: nonzero when any benchmark failed.

Usage: python benchmarks/run_all.py [NAME ...] [--list]
   NAME: a benchmark name from the list below (default: all of DEFAULT), e.g. ``index tiers``.
   Extra arguments for one benchmark: ``--args NAME="--repeats 5"`` (repeatable).
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("names", nargs="*", help="benchmarks to run (default: %s)" % " ".join(DEFAULT))
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--args", action="append", default=[], metavar='NAME="ARGS"',
                    help="extra command-line arguments for one benchmark")
    args = ap.parse_args()
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
        cmd = [sys.executable, os.path.join(HERE, BENCHMARKS[name]), *extra.get(name, [])]
        print(f"\n===== {name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
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
