#!/usr/bin/env python3
"""Plots for the mount benchmarks: the readahead sweep and the cold-start comparison.

Reads benchmarks/results/bench_readahead.json and benchmarks/results/cold_start.json (written by
bench_readahead.py and bench_cold_start.py) and writes docs/readahead_sweep.png and
docs/cold_start.png.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DOCS = os.path.join(os.path.dirname(HERE), "docs")


def readahead() -> None:
    d = json.load(open(os.path.join(RESULTS, "bench_readahead.json")))
    rows = [r for r in d["results"] if r["fs"] == "casfs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for mb in sorted({r["max_background"] for r in rows}):
        pts = sorted((r["read_ahead_kb"], r["cold median"]) for r in rows if r["max_background"] == mb)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"casfs cold, max_background={mb}")
    for r in d["results"]:
        if r["fs"] != "casfs" and "no user" not in r["fs"]:
            ax.axhline(r["cold median"], linestyle="--", linewidth=1, color="grey")
            ax.text(130, r["cold median"] * 1.02, f"{r['fs']} cold", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("read_ahead_kb")
    ax.set_ylabel("GiB/s (median)")
    ax.set_title(f"1 GiB sequential read through the mount ({d['machine']['cores']} cores, "
                 f"load {d['params']['load_at_rounds'][0]:.0f}-{max(d['params']['load_at_rounds']):.0f})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "readahead_sweep.png"), dpi=110)


def cold_start() -> None:
    d = json.load(open(os.path.join(RESULTS, "cold_start.json")))
    names = {"a": "(a) pull + extract", "b": "(b) lazy, cold", "c": "(c) lazy, profile",
             "d": "(d) lazy, warm ssd", "e": "(e) native disk"}
    keys = list("abcde")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    med = [d["median"][k] for k in keys]
    ax.barh([names[k] for k in keys], med, color=["#999", "#4a7", "#2a5", "#287", "#555"])
    for i, k in enumerate(keys):
        for x in d["results"][k]:
            ax.plot(x, i, "k|", markersize=12)
        ax.text(med[i] + 0.2, i, f"{med[i]:.1f} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds to finish `import torch; torch.ones(2).sum()` (bars: median, ticks: runs)")
    ax.set_title(f"cold start from a {d['bytes'] / 1e9:.2f} GB venv image, blob over http, "
                 f"{d['rtt_ms']:.0f} ms RTT, {d['rate_mbit']:.0f} Mbit/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "cold_start.png"), dpi=110)


if __name__ == "__main__":
    readahead()
    cold_start()
    print("wrote docs/readahead_sweep.png and docs/cold_start.png")
    sys.exit(0)
