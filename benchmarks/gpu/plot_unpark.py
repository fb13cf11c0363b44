"""Plot the park/unpark cycles of bench_gpu_replica.py --park (issue 12): unpark to first token by
where the weights come from, each bar split into its phases (medians over the cycles).

    python benchmarks/gpu/plot_unpark.py benchmarks/gpu/results-2026-12-04-park/bench-0.6b.json \\
        --out docs/gpu_unpark.png

Prints per variant: n, min-max and median unpark seconds, and the median of each phase.
"""

from __future__ import annotations

import argparse
import json
import statistics

VARIANTS = {"base": "weights re-read\nfrom casfs", "shared": "shared pinned copy,\nregistered at unpark",
            "keep": "shared pinned copy,\nkept registered"}
PHASES = [("driver resume", "#3070b0"), ("weights (register + copy)", "#30a060"), ("first token", "#b08030"),
          ("rest (HTTP, checks, KV)", "#999999")]


def phases(c: dict) -> list[float]:
    u = c["unpark"]
    p = u["phases"]
    w = u["worker"]["weights"]
    rest = u["total"] - p["resume"] - w - p.get("first_token", 0.0)
    return [p["resume"], w, p.get("first_token", 0.0), rest]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("result")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    park = json.load(open(a.result))["park"]
    rows = []
    for k, label in VARIANTS.items():
        cs = (park.get(k) or {}).get("cycles") or []
        if not cs:
            continue
        tot = [c["unpark"]["total"] for c in cs]
        ph = [statistics.median(x) for x in zip(*[phases(c) for c in cs])]
        rows.append((label, tot, ph))
        print(f"{label.replace(chr(10), ' '):42s} n={len(tot):2d} {min(tot):.3f}-{max(tot):.3f} s median "
              f"{statistics.median(tot):.3f}  " + "  ".join(f"{n} {v:.3f}" for (n, _), v in zip(PHASES, ph)))
    if a.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        for i, (label, tot, ph) in enumerate(rows):
            bottom = 0.0
            for (name, color), v in zip(PHASES, ph):
                ax.bar(i, v, bottom=bottom, color=color, label=name if i == 0 else None, width=0.6)
                bottom += v
            ax.text(i, bottom + 0.01, f"median {statistics.median(tot):.2f} s\n({min(tot):.2f}-{max(tot):.2f}, n={len(tot)})",
                    ha="center", fontsize=8)
        ax.axhline(0.15, color="#b04040", linestyle="--", linewidth=1)
        ax.text(-0.45, 0.16, "issue 12 goal: 0.15 s", color="#b04040", fontsize=8, ha="left")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r[0] for r in rows], fontsize=8)
        ax.set_ylabel("unpark to first token (s), median phases")
        ax.set_ylim(0, max(max(r[1]) for r in rows) * 1.3)
        ax.set_title("Parked Qwen3-0.6B-shaped replica, H200: where the unpark time goes", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        fig.savefig(a.out, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
