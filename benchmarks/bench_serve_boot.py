"""Replica boot to first token: vLLM (CPU build) with CPU snapshots OFF vs ON.

For each vLLM configuration (``eager``: --enforce-eager plus the in-process model runner and
unpinned OpenMP threads; ``default``: vLLM's defaults, torch.compile and a separate model
worker process) this runs:

* OFF: ``--boots`` cold boots of ``casfs serve`` (GPU health -> lazy mount of the model image
  -> worker start, imports, engine, weights, warmup -> first token);
* one ``--snapshot TAG --create`` boot (cold, then CRIU dump + store + restore);
* ON: one restore with an empty snapshot cache (the snapshot image is first exported from the
  casfs store to local disk), then ``--boots`` restores with it cached.

Each boot is a fresh ``casfs serve`` process (.venv-vllm's python) on a tiny random Llama
(scripts/make_tiny_model.py) stored as a casfs image; the model image mount is fresh each
time (the store is local, its files in the page cache). Times: ``external`` is from spawning
``casfs serve`` to its boot report (printed once the first token of a streamed request came
back); ``total`` and the phases are the pipeline's own (serve/boot.py). The replica is stopped
between boots (not timed).

Usage: python -m benchmarks.bench_serve_boot [--boots 3] [--configs eager,default]
       [--plot docs/serve_boot.png] [--out benchmarks/results/serve_boot.json] [--quick]
``--quick``: eager only, 1 boot each.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks._common import ROOT, describe_machine, machine_info, table, write_results

VLLM_PY = os.path.join(ROOT, ".venv-vllm", "bin", "python")
CONFIGS = {"eager": ["--eager", "--fast-boot"], "default": []}
PHASES = ("gpu_health", "mount", "init", "weights", "warmup", "snapshot", "restore", "first_token")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def boot(store: str, workdir: str, args: list[str], env: dict[str, str], timeout: float = 900) -> dict:
    """One `casfs serve` boot; returns its report plus ``external`` seconds. Stops it after."""
    port = free_port()
    argv = [VLLM_PY, "-m", "casfs.cli.main", "--store", store, "serve", "tiny", "--listen",
            f"127.0.0.1:{port}", "--workdir", workdir, *args]
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf:
            if time.monotonic() > deadline:
                raise RuntimeError(f"boot did not finish in {timeout:.0f} s ({' '.join(args)})")
            r, _, _ = select.select([p.stdout], [], [], 0.5)
            if r:
                got = os.read(p.stdout.fileno(), 1 << 16)
                if not got:  # EOF: casfs serve exited without a report
                    p.wait()
                    raise RuntimeError(f"boot failed ({' '.join(args)}), status {p.returncode}: "
                                       f"{p.stderr.read().decode()[-3000:]}")
                buf += got
        external = time.perf_counter() - t0
        report = json.loads(buf.split(b"\n", 1)[0])
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    report["external"] = external
    return report


def summarize(reports: list[dict]) -> dict:
    ext = [r["external"] for r in reports]
    tot = [r["total"] for r in reports]
    phases = {}
    for ph in PHASES:
        vals = [r["phases"][ph] for r in reports if ph in r["phases"]]
        if vals:
            phases[ph] = statistics.median(vals)
    return {"n": len(reports), "external_median": statistics.median(ext), "external_min": min(ext),
            "external_max": max(ext), "total_median": statistics.median(tot), "phases_median": phases,
            "external": ext, "total": tot}


def compact(r: dict) -> dict:
    keep = {k: r[k] for k in ("mode", "external", "total", "phases", "first_token_text", "materialize")}
    if r.get("snapshot_create"):
        keep["snapshot_create"] = r["snapshot_create"]
    if r.get("details", {}).get("restore"):
        keep["restore"] = r["details"]["restore"]
    w = r.get("details", {}).get("worker", {})
    keep["worker_phases"] = w.get("phases")
    keep["vllm"] = w.get("vllm")
    return keep


def _bar_segments(s: dict, imports: float | None) -> list[tuple[str, float]]:
    segs = []
    for ph in PHASES:
        v = s["phases_median"].get(ph)
        if not v:
            continue
        if ph == "init" and imports:
            segs += [("init: import vLLM", min(imports, v)), ("init: engine start (EngineCore spawn + imports, KV cache, compile)", max(0.0, v - imports))]
        else:
            segs.append((ph, v))
    return segs


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    rows = []
    for cfg, res in results.items():
        imports = [b["worker_phases"].get("import") for b in res["boots"]["off"] if b.get("worker_phases")]
        imp = statistics.median([x for x in imports if x]) if any(imports) else None
        rows.append((f"{cfg}: snapshots OFF", res["off"], imp))
        first = res["on_first"]
        rows.append((f"{cfg}: ON, first restore\n(snapshot not yet on local disk)",
                     {"phases_median": first["phases"], "external_median": first["external"],
                      "external": [first["external"]]}, None))
        rows.append((f"{cfg}: ON (cached)", res["on"], None))
    colors = {"gpu_health": "#999999", "mount": "#8c564b", "init": "#1f77b4", "init: import vLLM": "#9ecae1",
              "init: engine start (EngineCore spawn + imports, KV cache, compile)": "#1f77b4", "weights": "#17becf", "warmup": "#2ca02c",
              "restore": "#d62728", "first_token": "#ff7f0e"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 2.0 + 0.75 * len(rows)), gridspec_kw={"width_ratios": [3, 2]})
    for i, (label, s, imp) in enumerate(rows):
        left = 0.0
        for name, v in _bar_segments(s, imp):
            ax.barh(i, v, left=left, color=colors.get(name, "#555"), label=name)
            left += v
        ax.text(left, i, f"  {s['external_median']:.1f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds to first token (median; bars: pipeline phases; label: spawn -> first token)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=7)
    ax.set_title("vLLM (CPU) replica boot to first token, tiny Llama, 2-core VM", fontsize=10)
    for i, (label, s, _) in enumerate(rows):
        ax2.scatter(s["external"], [i] * len(s["external"]), color="#d62728" if "ON" in label else "#1f77b4")
    ax2.set_xscale("log")
    ticks = [1, 2, 5, 10, 20, 50, 100, 200]
    ax2.xaxis.set_major_locator(FixedLocator(ticks))
    ax2.xaxis.set_major_formatter(ScalarFormatter())
    ax2.xaxis.set_minor_formatter(NullFormatter())
    ax2.set_yticks(range(len(rows)), [r[0].replace("\n", " ") for r in rows], fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlabel("each boot: spawn -> first token (s, log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--configs", default="eager,default")
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "serve_boot.png"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.boots, args.configs = 1, "eager"
    if not os.path.exists(VLLM_PY):
        print(f"bench_serve_boot: {VLLM_PY} is missing: run scripts/setup_vllm.sh", file=sys.stderr)
        return 2
    started = time.time()
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}")
    work = tempfile.mkdtemp(prefix="bench-serve-")
    results: dict = {}
    try:
        subprocess.run([VLLM_PY, os.path.join(ROOT, "scripts", "make_tiny_model.py"), f"{work}/model"],
                       check=True, capture_output=True)
        store = f"{work}/store"
        subprocess.run([VLLM_PY, "-m", "casfs.cli.main", "--store", store, "build", f"{work}/model", "-t", "tiny",
                        "--no-progress"], check=True, capture_output=True, cwd=ROOT)
        for cfg in args.configs.split(","):
            flags = CONFIGS[cfg]
            env = dict(os.environ, CASFS_SNAPSHOT_CACHE=f"{work}/snapcache-{cfg}")
            wd = f"{work}/work-{cfg}"
            off = []
            for i in range(args.boots):
                r = boot(store, wd, flags, env)
                off.append(r)
                print(f"[{cfg}] OFF boot {i + 1}: {r['external']:.2f} s "
                      f"({' '.join(f'{k}={v:.2f}' for k, v in r['phases'].items())})", flush=True)
            tag = f"tiny-{cfg}"
            created = boot(store, wd, [*flags, "--snapshot", tag, "--create"], env)
            sc = created["snapshot_create"]
            print(f"[{cfg}] create: {created['external']:.2f} s (dump {sc['timings']['dump']:.2f} s, store "
                  f"{sc['timings']['store']:.2f} s, {sc['pages_bytes'] / 2**30:.2f} GiB pages, "
                  f"{sc['timings']['new_bytes'] / 2**30:.2f} GiB new in the store)", flush=True)
            shutil.rmtree(env["CASFS_SNAPSHOT_CACHE"], ignore_errors=True)
            first = boot(store, wd, ["--snapshot", tag], env)
            print(f"[{cfg}] ON first restore (uncached): {first['external']:.2f} s "
                  f"({' '.join(f'{k}={v:.2f}' for k, v in first['phases'].items())})", flush=True)
            on = []
            for i in range(args.boots):
                r = boot(store, wd, ["--snapshot", tag], env)
                on.append(r)
                print(f"[{cfg}] ON boot {i + 1}: {r['external']:.2f} s "
                      f"({' '.join(f'{k}={v:.2f}' for k, v in r['phases'].items())})", flush=True)
            results[cfg] = {"flags": flags, "off": summarize(off), "on": summarize(on),
                            "on_first": compact(first), "create": compact(created),
                            "boots": {"off": [compact(r) for r in off], "on": [compact(r) for r in on]},
                            "speedup_median": summarize(off)["external_median"] / summarize(on)["external_median"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for cfg, res in results.items():
        for kind in ("off", "on"):
            s = res[kind]
            row = {"config": cfg, "snapshots": "OFF" if kind == "off" else "ON", "boots": s["n"],
                   "spawn->1st token median s": s["external_median"], "min": s["external_min"],
                   "max": s["external_max"]}
            row.update({ph: s["phases_median"].get(ph) for ph in PHASES if ph not in ("snapshot",)})
            rows.append(row)
    print(table(rows, list(rows[0])))
    for cfg, res in results.items():
        print(f"{cfg}: ON is {res['speedup_median']:.1f}x faster than OFF (median spawn -> first token)")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    path = write_results("serve_boot", {"boots": args.boots, "configs": args.configs}, results,
                         started=started, out=args.out, machine=machine)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
