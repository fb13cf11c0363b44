#!/usr/bin/env python3
"""Plot of the weights benchmark: GB/s to the GPU per loader, warm and cold, with the ceilings.

Reads the JSON ``benchmarks/bench_weights.py --out`` wrote (default: the H200 run of
2026-12-04 in benchmarks/gpu/results-2026-12-04-weights/) and writes docs/weights_h200.png.
Usage: python -m benchmarks.plot_weights [RESULTS.json] [OUT.png]
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_IN = os.path.join(HERE, "gpu", "results-2026-12-04-weights", "weights.json")
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "docs", "weights_h200.png")
# the run of 2026-12-04 measured two read paths; main keeps the one labelled "unfused" there
LABELS = {"casfs unfused c=16": "casfs (main: whole-chunk hash), 16 workers",
          "casfs c=16": "casfs, piece-wise hash (dropped), 16 workers",
          "casfs ssd c=16": "casfs from the ssd tier (piece-wise hash)",
          "casfs pinned c=16": "casfs, chunks in the pinned tier"}
SKIP = ("casfs c=8", "casfs c=24", "casfs read only", "H2D from pinned, 4")


def main() -> int:
    src = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_IN
    out = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_OUT
    d = json.load(open(src))
    warm = {k: v["gb_per_s"] for k, v in d["warm"].items() if "gb_per_s" in v and not k.startswith(SKIP)}
    cold = {k: v["gb_per_s"] for k, v in d["cold"].items() if "gb_per_s" in v}
    names = sorted(warm, key=warm.get)
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(names) + 1.6))
    ys = range(len(names))
    ax.barh([y + 0.2 for y in ys], [warm[n] for n in names], height=0.4, label="warm (page cache)", color="#3b75af")
    ax.barh([y - 0.2 for y in ys], [cold.get(n, 0) for n in names], height=0.4, label="cold (caches dropped)",
            color="#e1812c")
    for y, n in zip(ys, names):
        ax.text(warm[n] + 0.3, y + 0.2, f"{warm[n]:.1f}", va="center", fontsize=7)
        if n in cold:
            ax.text(cold[n] + 0.3, y - 0.2, f"{cold[n]:.1f}", va="center", fontsize=7)
    ax.set_yticks(list(ys), [LABELS.get(n, n) for n in names], fontsize=8)
    base = d["warm"].get("load_file(cuda)", {}).get("gb_per_s")
    if base:
        ax.axvline(base, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("GB/s of file bytes to the GPU (median)")
    ax.set_title(f"{d['file_bytes'] / 1e9:.1f} GB bf16 safetensors -> {d['host']['gpu']}, one process, "
                 f"{d['date'][:10]}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
