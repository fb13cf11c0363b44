"""Plot and summarise benchmarks/gpu/bench_gpu_replica.py results: boot to first token per mode.

    python benchmarks/gpu/plot_gpu_replica.py benchmarks/gpu/results-2026-12-04/bench-0.6b.json \\
        benchmarks/gpu/results-2026-12-04/bench-8b.json --out docs/gpu_replica.png

Prints, per model and mode: n, min-max and median seconds, the ratios against the OFF boots of
the same run, and the park/unpark cycles' times (issue 12).
"""

from __future__ import annotations

import argparse
import json
import statistics

LABELS = {"off_cold": "OFF, cold compile cache", "off_warm": "OFF, warm compile cache",
          "on_host": "ON, host page cache", "on_ssd": "ON, ssd tier", "on_blob": "ON, blob tier only",
          "unpark": "unpark (parked replica)"}


def series(path: str) -> tuple[str, dict[str, list[float]]]:
    r = json.load(open(path))
    out: dict[str, list[float]] = {}
    for b in r["boots"]:
        for c in (b.get("park") or {}).get("cycles", []):
            out.setdefault("unpark", []).append(c["unpark"]["total"])
        if b.get("total") is None or b["kind"] not in LABELS:
            continue
        if b["kind"].startswith("on_") and b.get("mode") != "restore":
            continue  # a restore that fell back cold is not an ON boot
        out.setdefault(b["kind"], []).append(b["total"])
    return r["preset"], out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    data = [series(p) for p in a.results]
    for preset, s in data:
        print(f"== {preset}")
        cold = s.get("off_cold", [])
        warm = s.get("off_warm", [])
        for k in LABELS:
            v = s.get(k)
            if not v:
                continue
            line = f"  {LABELS[k]:28s} n={len(v):2d}  {min(v):7.2f}-{max(v):7.2f} s  median {statistics.median(v):7.2f}"
            if k.startswith("on_") or k == "unpark":
                if cold:
                    line += f"  vs cold {min(cold) / max(v):5.1f}-{max(cold) / min(v):5.1f}x"
                if warm:
                    line += f"  vs warm {min(warm) / max(v):5.1f}-{max(warm) / min(v):5.1f}x"
            print(line)
    if a.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(data), figsize=(6.2 * len(data), 4.2), squeeze=False)
        for ax, (preset, s) in zip(axes[0], data):
            keys = [k for k in LABELS if s.get(k)]
            med = [statistics.median(s[k]) for k in keys]
            lo = [m - min(s[k]) for m, k in zip(med, keys)]
            hi = [max(s[k]) - m for m, k in zip(med, keys)]
            colors = ["#b04040" if k.startswith("off") else "#3070b0" if k.startswith("on") else "#30a060"
                      for k in keys]
            ax.bar(range(len(keys)), med, yerr=[lo, hi], color=colors, capsize=4)
            for i, (m, k) in enumerate(zip(med, keys)):
                ax.text(i, m * 1.08, f"{m:.2f} s\nn={len(s[k])}", ha="center", fontsize=8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(keys)))
            short = {"off_cold": "OFF\ncold cache", "off_warm": "OFF\nwarm cache", "on_host": "ON\nhost cache",
                     "on_ssd": "ON\nssd tier", "on_blob": "ON\nblob only", "unpark": "unpark\n(parked)"}
            ax.set_xticklabels([short[k] for k in keys], fontsize=8)
            ax.set_ylim(top=max(med) * 4)
            ax.set_ylabel("boot to first token (s, log)")
            ax.set_title(f"Qwen3-{preset} shape, bf16, H200 (transformers engine)", fontsize=10)
        fig.tight_layout()
        fig.savefig(a.out, dpi=110)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
