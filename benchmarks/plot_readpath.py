#!/usr/bin/env python3
"""Plots for the read-path benchmarks (issue 14): the realistic cold start and random reads.

Reads benchmarks/results/cold_start_root.json (bench_cold_start_root.py) and
benchmarks/results/bench_random_read.json (bench_random_read.py) and writes
docs/cold_start_root.png and docs/random_read.png. Run: python -m benchmarks.plot_readpath
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DOCS = os.path.join(os.path.dirname(HERE), "docs")


def cold_start_root() -> None:
    path = os.path.join(RESULTS, "cold_start_root.json")
    if not os.path.exists(path):
        return
    d = json.load(open(path))
    r = d["results"]
    names = {"a": "(a) pull + extract", "b": "(b) casfs run, cold", "c": "(c) casfs run, profile",
             "d": "(d) casfs run, warm ssd", "e": "(e) native disk"}
    keys = list("abcde")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    med = [r["median"][k] for k in keys]
    ax.barh([names[k] for k in keys], med, color=["#999", "#4a7", "#2a5", "#287", "#555"])
    for i, k in enumerate(keys):
        for x in r["seconds"][k]:
            ax.plot(x, i, "k|", markersize=12)
        ax.text(med[i] + 0.3, i, f"{med[i]:.1f} s", va="center", fontsize=8)
    ax.invert_yaxis()
    p = d["params"]
    ax.set_xlabel(f"seconds to finish the workload ({p['workload']}); bars: median, ticks: runs", fontsize=8)
    ax.set_title(f"Debian root + vLLM CPU venv ({p['bytes'] / 1e9:.1f} GB, {p['files']} files), "
                 f"blob over http, {p['rtt_ms']:.0f} ms RTT", fontsize=9)
    det = r["detail"]
    labels, touched, fetched = [], [], []
    for k, label in (("b", "(b) cold"), ("c", "(c) profile"), ("f", "(f) cat /etc/os-release")):
        if det.get(k):
            labels.append(label)
            touched.append(statistics.median(x["touched"] for x in det[k]) / 1e6)
            fetched.append(statistics.median(x["fetched"] for x in det[k]) / 1e6)
    ys = range(len(labels))
    bx.barh([y - 0.2 for y in ys], touched, height=0.4, label="touched (read through FUSE)", color="#48c")
    bx.barh([y + 0.2 for y in ys], fetched, height=0.4, label="fetched (blob tier)", color="#c84")
    bx.set_yticks(list(ys))
    bx.set_yticklabels(labels, fontsize=8)
    bx.invert_yaxis()
    bx.set_xscale("log")
    bx.set_xlabel("MB (median)", fontsize=8)
    bx.legend(fontsize=7)
    bx.set_title("bytes touched vs fetched", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "cold_start_root.png"), dpi=110)


def random_read() -> None:
    path = os.path.join(RESULTS, "bench_random_read.json")
    if not os.path.exists(path):
        return
    d = json.load(open(path))
    rows = d["results"]
    fig, ax = plt.subplots(figsize=(7, 3))
    for i, row in enumerate(rows):
        runs = [float(x) for x in row["IOPS (runs)"].split(", ")]
        ax.barh(i, statistics.median(runs), color="#555" if row["fs"].startswith("erofs") else "#4a7")
        for x in runs:
            ax.plot(x, i, "k|", markersize=12)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["fs"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    p = d["params"]
    ax.set_xlabel("IOPS, random 4 KiB reads (fio psync QD1); bars: median, ticks: runs", fontsize=8)
    ax.set_title(f"{p['size_mib']} MiB file, chunks in the ssd tier, cold mount", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(DOCS, "random_read.png"), dpi=110)


def main() -> int:
    cold_start_root()
    random_read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
