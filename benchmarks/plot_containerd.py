#!/usr/bin/env python3
"""Plot of ``bench_containerd`` results: cold ``ctr run`` to first output, pull + unpack vs the
casfs snapshotter, one group per results file (median bar, min-max whisker).

Usage: python -m benchmarks.plot_containerd [RESULTS.json ...] [--out docs/containerd_cold_run.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = [os.path.join(HERE, "results", f"containerd_debian_{n}.json")
           for n in ("python", "python_100ms", "scipy")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="*", default=DEFAULT)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs", "containerd_cold_run.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for path in args.results:
        with open(path) as f:
            doc = json.load(f)
        p, rounds = doc["params"], doc["results"]["rounds"]
        size = p["bytes"] / 2**20
        label = f"{p['files']:,} files, {size:,.0f} MiB\n{p['rtt_ms']:.0f} ms RTT"
        vals = {w: [r[w]["total_s"] for r in rounds] for w in ("plain", "casfs")}
        groups.append((label, vals, [r["ratio"] for r in rounds]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for k, (which, name, color) in enumerate((("plain", "ctr pull + unpack (overlayfs)", "#999999"),
                                               ("casfs", "casfs snapshotter", "#2a7ab0"))):
        xs = [i + (k - 0.5) * width for i in range(len(groups))]
        med = [statistics.median(g[1][which]) for g in groups]
        lo = [m - min(g[1][which]) for m, g in zip(med, groups)]
        hi = [max(g[1][which]) - m for m, g in zip(med, groups)]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=4, label=name, color=color)
        for x, m in zip(xs, med):
            ax.text(x, m, f"{m:.1f} s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g[0]}\n{min(g[2]):.1f}-{max(g[2]):.1f}x" for g in groups], fontsize=8)
    ax.set_ylabel("seconds to the container's first output")
    ax.set_title("cold `ctr run` of Debian + Python from a registry behind a delay relay\n"
                 "(2-core VM under load; median bar, min-max whisker; ratio range per round)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
