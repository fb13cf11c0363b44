"""Replica boot to first token: vLLM (CPU build) with CPU snapshots OFF vs ON.

For each vLLM configuration (``eager``: --enforce-eager plus the in-process model runner and
unpinned OpenMP threads; ``default``: vLLM's defaults, torch.compile and a separate model
worker process) this runs:

* OFF: ``--boots`` cold boots of ``casfs serve`` (GPU health -> lazy mount of the model image
  -> worker start, imports, engine, weights, warmup -> first token), local store;
* one ``--snapshot TAG --create`` boot (cold, then release of the KV cache and freed heap,
  CRIU dump + store + restore); its page counts before and after the release;
* ON, restores from the store (``--snapshot-source store``: nothing unpacked, pages served by
  the page server as the replica touches them), the store being the same blob directory
  served over HTTP by nginx:
  - ``never seen``: a host that has never seen the snapshot: an empty ssd cache (blob local);
  - ``cached``: ``--boots`` restores with that ssd cache warm (the snapshot cached on the host);
  - ``blob``: an empty ssd cache, nginx behind a delay relay of ``--rtt`` ms round trip;
* ON, ``--snapshot-source export`` (eager, the snapshot exported on the host, cached): the
  previous way, as a same-run baseline;
* dedup: a snapshot of a second model (another seed and size) of the same engine: how much of
  it the store already held.

Each boot is a fresh ``casfs serve`` process (.venv-vllm's python) on a tiny random Llama
(scripts/make_tiny_model.py) stored as a casfs image; the model image mount is fresh each
time. Times: ``external`` is from spawning ``casfs serve`` to its boot report (printed once the
first token of a streamed request came back); ``total`` and the phases are the pipeline's own
(serve/boot.py). The replica is stopped between boots (not timed).

Usage: python -m benchmarks.bench_serve_boot [--boots 3] [--configs eager,default] [--rtt 50]
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
LAZY_SETTLE_S = 8.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def boot(store: str, workdir: str, args: list[str], env: dict[str, str], timeout: float = 900,
         cache_dir: str = "", image: str = "tiny") -> dict:
    """One `casfs serve` boot; returns its report plus ``external`` seconds. Stops it after
    (waiting for a lazy restore to have all its pages first, so the next boot does not share
    the machine with this one's background transfer)."""
    port = free_port()
    argv = [VLLM_PY, "-m", "casfs.cli.main", "--store", store, "--cache-dir", cache_dir, "serve", image,
            "--listen", f"127.0.0.1:{port}", "--workdir", workdir, "--no-gpu-check", *args]
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
        if (report.get("details", {}).get("restore") or {}).get("source") == "store":
            time.sleep(LAZY_SETTLE_S)  # the rest of memory streams in behind the first token
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
        for kind, label in (("on_export", "ON, eager from an export\n(the previous way)"),
                            ("on_blob", "ON, blob tier 50 ms RTT\n(ssd cold)"),
                            ("on_first", "ON, never seen on this host\n(ssd cold, blob local)")):
            r = res[kind]
            rows.append((f"{cfg}: {label}", {"phases_median": r["phases"], "external_median": r["external"],
                                              "external": [r["external"]]}, None))
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


def _line(label: str, r: dict) -> str:
    ph = " ".join(f"{k}={v:.2f}" for k, v in r["phases"].items())
    pages = ((r.get("details", {}).get("restore") or {}).get("pages_at_first_token") or {})
    extra = f"; page server by first token: {pages.get('faults')} faults, {pages.get('pages')} pages" if pages else ""
    return f"{label}: {r['external']:.2f} s ({ph}{extra})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--configs", default="eager,default")
    ap.add_argument("--rtt", type=float, default=50.0, help="blob round trip in ms for the blob case")
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "serve_boot.png"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.boots, args.configs = 1, "eager"
    if not os.path.exists(VLLM_PY):
        print(f"bench_serve_boot: {VLLM_PY} is missing: run scripts/setup_vllm.sh", file=sys.stderr)
        return 2
    from tests.support import FaultProxy, nginx_static

    started = time.time()
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}")
    work = tempfile.mkdtemp(prefix="bench-serve-")
    results: dict = {}
    try:
        store = f"{work}/store"
        for name, extra in (("tiny", []), ("tiny2", ["--seed", "1", "--hidden", "192"])):
            subprocess.run([VLLM_PY, os.path.join(ROOT, "scripts", "make_tiny_model.py"), f"{work}/{name}", *extra],
                           check=True, capture_output=True)
            subprocess.run([VLLM_PY, "-m", "casfs.cli.main", "--store", store, "build", f"{work}/{name}", "-t", name,
                            "--no-progress"], check=True, capture_output=True, cwd=ROOT)
        for cfg in args.configs.split(","):
            flags = CONFIGS[cfg]
            env = dict(os.environ, CASFS_SNAPSHOT_CACHE=f"{work}/snapcache-{cfg}")
            wd = f"{work}/work-{cfg}"
            off = []
            for i in range(args.boots):
                r = boot(store, wd, flags, env)
                off.append(r)
                print(_line(f"[{cfg}] OFF boot {i + 1}", r), flush=True)
            tag = f"tiny-{cfg}"
            created = boot(store, wd, [*flags, "--snapshot", tag, "--create"], env)
            sc = created["snapshot_create"]
            rel = (created["details"].get("worker") or {}).get("released_for_snapshot") or {}
            lay = sc.get("layout") or {}
            print(f"[{cfg}] create: {created['external']:.2f} s (dump {sc['timings']['dump']:.2f} s, store "
                  f"{sc['timings']['store']:.2f} s; pages {sc['pages_bytes'] / 2**20:.0f} MiB after releasing "
                  f"{rel.get('kv_cache_bytes', 0) / 2**20:.0f} MiB of KV cache, so "
                  f"{(sc['pages_bytes'] + rel.get('kv_cache_bytes', 0)) / 2**20:.0f} MiB before; "
                  f"{lay.get('lazy_pages', 0)} lazy + {lay.get('eager_pages', 0)} eager pages; "
                  f"{sc['timings']['new_bytes'] / 2**20:.0f} MiB new in the store)", flush=True)
            second = boot(store, wd, [*flags, "--snapshot", f"{tag}-second-model", "--create"], env, image="tiny2")
            sc2 = second["snapshot_create"]
            dedup = {"bytes": sc2["timings"]["bytes"], "new_bytes": sc2["timings"]["new_bytes"],
                     "stored_pct": round(100 * sc2["timings"]["new_bytes"] / sc2["timings"]["bytes"], 1)}
            print(f"[{cfg}] a second model's snapshot: {dedup['new_bytes'] / 2**20:.0f} of "
                  f"{dedup['bytes'] / 2**20:.0f} MiB new in the store ({dedup['stored_pct']}%)", flush=True)
            with nginx_static(store) as url:
                port = int(url.rstrip("/").rsplit(":", 1)[1])
                ssd = f"{work}/ssd-{cfg}"
                first = boot(url, wd, ["--snapshot", tag, "--snapshot-source", "store"], env, cache_dir=ssd)
                print(_line(f"[{cfg}] ON, a host that never saw it (ssd cold, blob local)", first), flush=True)
                on = []
                for i in range(args.boots):
                    r = boot(url, wd, ["--snapshot", tag, "--snapshot-source", "store"], env, cache_dir=ssd)
                    on.append(r)
                    print(_line(f"[{cfg}] ON, cached on the host, boot {i + 1}", r), flush=True)
                with FaultProxy(port) as proxy:
                    proxy.set_latency(up=args.rtt / 2000, down=args.rtt / 2000)
                    blob = boot(proxy.url + "/", wd, ["--snapshot", tag, "--snapshot-source", "store"], env, cache_dir=f"{work}/ssd-blob-{cfg}")
                print(_line(f"[{cfg}] ON, blob tier behind {args.rtt:.0f} ms RTT (ssd cold)", blob), flush=True)
            exp = [boot(store, wd, ["--snapshot", tag, "--snapshot-source", "export"], env) for _ in range(2)]
            print(_line(f"[{cfg}] ON, eager from the host's export (cached; the previous way)", exp[-1]), flush=True)
            results[cfg] = {"flags": flags, "off": summarize(off), "on": summarize(on),
                            "on_first": compact(first), "on_blob": compact(blob), "on_export": compact(exp[-1]),
                            "create": compact(created), "dedup_second_model": dedup,
                            "released_for_snapshot": rel,
                            "boots": {"off": [compact(r) for r in off], "on": [compact(r) for r in on]},
                            "speedup_median": summarize(off)["external_median"] / summarize(on)["external_median"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for cfg, res in results.items():
        for kind in ("off", "on"):
            s = res[kind]
            row = {"config": cfg, "snapshots": "OFF" if kind == "off" else "ON (cached)", "boots": s["n"],
                   "spawn->1st token median s": s["external_median"], "min": s["external_min"],
                   "max": s["external_max"]}
            row.update({ph: s["phases_median"].get(ph) for ph in PHASES if ph not in ("snapshot",)})
            rows.append(row)
        for kind, label in (("on_first", "ON (never seen)"), ("on_blob", f"ON (blob {args.rtt:.0f} ms)"),
                            ("on_export", "ON (export, eager)")):
            r = res[kind]
            row = {"config": cfg, "snapshots": label, "boots": 1, "spawn->1st token median s": r["external"],
                   "min": r["external"], "max": r["external"]}
            row.update({ph: r["phases"].get(ph) for ph in PHASES if ph not in ("snapshot",)})
            rows.append(row)
    print(table(rows, list(rows[0])))
    for cfg, res in results.items():
        off = res["off"]["external_median"]
        print(f"{cfg}: ON is {res['speedup_median']:.1f}x faster than OFF (median spawn -> first token); "
              f"never seen {off / res['on_first']['external']:.1f}x, blob {off / res['on_blob']['external']:.1f}x, "
              f"export {off / res['on_export']['external']:.1f}x")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    path = write_results("serve_boot", {"boots": args.boots, "configs": args.configs, "rtt_ms": args.rtt},
                         results, started=started, out=args.out, machine=machine)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
