"""CPU snapshots (CRIU): time to a ready process, cold start vs restore from a casfs store.

The program imports numpy and torch, builds a small model and runs it (its "init"), calls
``snapshot.ready()``, then runs the model once more and appends a record with the wall-clock
time to a file: that record is "ready". Cold: the program run from scratch (no supervisor:
``ready()`` returns at once), same-run baseline, page cache warm (one untimed warm-up run).
Restore: from the call to ``snapshot.restore`` to the record, with the images

  (a) local  - a local store whose files are in the page cache;
  (b) ssd    - an http blob store (nginx, no delay) with an ssd cache tier holding every chunk:
               tags and the index come from the blob store, chunks from the ssd tier;
  (c) blob   - the same http store behind a delay relay (``--rtt`` ms round trip, split over
               both directions), no ssd tier, an empty memory tier each run;

and the image brought back by ``store`` (lazy: nothing unpacked; CRIU's metadata and the hot
pages of the startup profile written from the store, every other page served by the page server
from the store as the process touches it; the profile was recorded by one untimed restore),
by ``export`` (into a fresh per-host cache dir each run; for (a) also ``export-cached``: the
export of an earlier restore reused), eager or lazy (CRIU's lazy-pages daemon on the export),
or by ``mount`` (lazy: CRIU's lazy-pages daemon reads a casfs FUSE mount of a snapshot taken
in CRIU's own layout, so pages come from the store as the process touches them). Also measured: dump and store time
of the snapshot, and dedup of a second snapshot of a separate run (``spawn(deterministic=True)``)
at several chunk sizes.

Usage: python -m benchmarks.bench_cpu_snapshot [--repeats N] [--rtt MS] [--quick] [--out FILE]
Needs root and CRIU >= 4.2 (``make setup``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks._common import ROOT, describe_machine, machine_info, table, write_results


import casfs
import snapshot
from snapshot import cpu

PROGRAM = r'''
import json, os, sys, time
import numpy as np
import torch
import snapshot
out_path = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 16))
x = torch.randn(8, 256)
with torch.no_grad():
    before = model(x)
restored = snapshot.ready()
with torch.no_grad():
    out = model(x)
rec = {"t": time.time(), "restored": restored, "same": bool(torch.equal(out, before)),
       "sum": float(np.asarray(out).sum())}
with open(out_path, "a") as f:
    f.write(json.dumps(rec) + "\n")
'''


def _records(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.startswith("{")]
    except OSError:
        return []


def cold_run(prog: str, out: str) -> float:
    """Seconds from start to the program's ready record, without any supervisor."""
    env = {k: v for k, v in os.environ.items() if k != "CASFS_SNAPSHOT_READY"}
    n = len(_records(out))
    t0 = time.time()
    subprocess.run([sys.executable, prog, out], env=env, check=True, stdin=subprocess.DEVNULL)
    recs = _records(out)
    assert len(recs) == n + 1 and not recs[-1]["restored"]
    return recs[-1]["t"] - t0


def restore_run(store: casfs.Store, tag: str, out: str, *, lazy: bool, source: str,
                cache_dir: str) -> dict:
    n = len(_records(out))
    t0 = time.time()
    live = cpu.restore(tag, store, lazy=lazy, source=source, cache_dir=cache_dir)
    t_running = time.time() - t0
    while len(_records(out)) <= n:
        if live.poll() is not None and len(_records(out)) <= n:
            raise RuntimeError(f"restored process exited ({live.poll()}) without a record")
        time.sleep(0.001)
    rec = _records(out)[-1]
    assert rec["restored"] and rec["same"], rec
    rc = live.wait(120)
    live.lazy_done(120)
    assert rc == 0, rc
    return {"ready": rec["t"] - t0, "running": t_running, **{k: v for k, v in live.timings.items()
                                                               if k != "total"}}


def med(vals: list[float]) -> float:
    return statistics.median(vals)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rtt", type=float, default=100.0, help="blob round trip in ms (default 100)")
    ap.add_argument("--quick", action="store_true", help="1 repeat, no dedup section")
    ap.add_argument("--tiers", default="local,ssd,blob", help="comma-separated subset of local,ssd,blob")
    ap.add_argument("--no-dedup", action="store_true", help="skip the dedup section")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    started = time.time()
    machine = machine_info()
    crit = snapshot.find_criu()
    print(f"machine: {describe_machine(machine)}; CRIU {crit.version_text} ({crit.path})")
    from tests.support import FaultProxy, nginx_static

    work = tempfile.mkdtemp(prefix="bench-cpu-snap-")
    results: dict = {"cases": []}
    try:
        prog = os.path.join(work, "prog.py")
        with open(prog, "w") as f:
            f.write(PROGRAM)
        out = os.path.join(work, "out.jsonl")
        # cold baseline (one warm-up, so the page cache holds python, numpy and torch)
        cold_run(prog, out)
        cold = [cold_run(prog, out) for _ in range(max(repeats, 3))]
        cold_med = med(cold)
        results["cold"] = {"ready": cold}
        print(f"cold start to ready: median {cold_med:.3f} s  (runs: {', '.join(f'{c:.2f}' for c in cold)})")

        blobdir = os.path.join(work, "store")
        store = casfs.open_store(blobdir)
        proc = cpu.spawn([sys.executable, prog, out], stdout=os.path.join(work, "stdout.log"))
        t0 = time.time()
        ref = cpu.checkpoint(proc, store, "bench", ready_timeout=300)
        proc.wait(10)
        results["checkpoint"] = {"pages_bytes": ref.meta["pages_bytes"], **ref.timings,
                                 "total": time.time() - t0}
        print(f"checkpoint: pages {ref.meta['pages_bytes'] / 2**20:.1f} MiB, dump "
              f"{ref.timings['dump']:.2f} s, store {ref.timings['store']:.2f} s")
        # the same program snapshotted in CRIU's own layout, for the FUSE-mount rows (a mount
        # serves CRIU's pages files as they are; the default window layout needs the page server)
        proc = cpu.spawn([sys.executable, prog, out], stdout=os.path.join(work, "stdout.log"))
        cpu.checkpoint(proc, store, "bench-criu", ready_timeout=300, layout="criu")
        proc.wait(10)

        def run_case(tier: str, src: str, lazy: bool, store_fn, cache_for_run) -> None:
            runs = []
            for _ in range(repeats):
                s = store_fn()
                try:
                    runs.append(restore_run(s, "bench-criu" if src == "mount" else "bench", out, lazy=lazy,
                                            source=src.split("-")[0], cache_dir=cache_for_run()))
                finally:
                    s.close()
            row = {"tier": tier, "source": src, "mode": "lazy" if lazy else "eager",
                   "ready_s": med([r["ready"] for r in runs]),
                   "min_s": min(r["ready"] for r in runs),
                   "running_s": med([r["running"] for r in runs]),
                   "open_s": med([r["open"] for r in runs]), "fetch_s": med([r["fetch"] for r in runs]),
                   "lazy_start_s": med([r["lazy_start"] for r in runs]),
                   "criu_s": med([r["criu"] for r in runs])}
            row["speedup"] = f"{cold_med / row['ready_s']:.1f}x"
            results["cases"].append(row | {"runs": runs})
            print(f"  {tier:<6} {src:<14} {row['mode']:<5} ready {row['ready_s']:.3f} s "
                  f"({row['speedup']} vs cold)", flush=True)

        def fresh_dir() -> str:
            return tempfile.mkdtemp(prefix="exp-", dir=work)

        cached = os.path.join(work, "export-cache")
        restore_run(store, "bench", out, lazy=False, source="export", cache_dir=cached)  # warm
        # the first restore from the store records the startup profile (and its hot pages image)
        restore_run(store, "bench", out, lazy=True, source="store", cache_dir=cached)
        tiers = set(args.tiers.split(","))
        if "local" in tiers:
            run_case("local", "store", True, lambda: casfs.open_store(blobdir), fresh_dir)
        for lazy in ((False, True) if "local" in tiers else ()):
            run_case("local", "export", lazy, lambda: casfs.open_store(blobdir), fresh_dir)
            run_case("local", "export-cached", lazy, lambda: casfs.open_store(blobdir), lambda: cached)
        if "local" in tiers:
            run_case("local", "mount", True, lambda: casfs.open_store(blobdir), fresh_dir)

        with nginx_static(blobdir) if tiers & {"ssd", "blob"} else contextlib.nullcontext() as url:
            ssd = os.path.join(work, "ssd")
            if "ssd" in tiers:
                with casfs.open_store(url, cache_dir=ssd) as s:  # fill the ssd tier
                    for tag in ("bench", "bench-criu", f"snapshot-hot.{ref.image_id}"):
                        casfs.export(s.open_image(tag), os.path.join(fresh_dir(), "tree"), progress=False)
            if "ssd" in tiers:
                for src, lazy in (("store", True), ("export", False), ("export", True), ("mount", True)):
                    run_case("ssd", src, lazy,
                             lambda: casfs.open_store(url, cache_dir=ssd), fresh_dir)
            port = int(url.rstrip("/").rsplit(":", 1)[1]) if "blob" in tiers else 0
            with FaultProxy(port) if port else contextlib.nullcontext() as proxy:
                if proxy is not None:
                    proxy.set_latency(up=args.rtt / 2000, down=args.rtt / 2000)
                    purl = proxy.url + "/"
                if port:
                    for src, lazy in (("store", True), ("export", False), ("export", True), ("mount", True)):
                        run_case("blob", src, lazy,
                                 lambda: casfs.open_store(purl, cache_dir=""), fresh_dir)

        if not (args.quick or args.no_dedup):
            results["dedup"] = dedup(prog, work)

        cols = ["tier", "source", "mode", "ready_s", "min_s", "speedup", "running_s", "open_s",
                "fetch_s", "lazy_start_s", "criu_s"]
        print()
        print(table(results["cases"], cols))
        params = {"repeats": repeats, "rtt_ms": args.rtt, "criu": crit.version_text,
                  "pages_bytes": ref.meta["pages_bytes"]}
        path = write_results("cpu_snapshot", params, results, started=started, out=args.out,
                             machine=machine)
        print(f"\nresults: {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def dedup(prog: str, work: str) -> list[dict]:
    """New bytes stored for a second snapshot of a separate run, by chunk size and spawn mode."""
    rows = []
    for deterministic in (False, True):
        dumps = []
        for i in range(2):
            d = os.path.join(work, f"dump-{deterministic}-{i}")
            proc = cpu.spawn([sys.executable, prog, os.path.join(work, "dd.jsonl")],
                             deterministic=deterministic)
            with casfs.open_store(os.path.join(work, f"dd-scratch-{deterministic}-{i}")) as s:
                cpu.checkpoint(proc, s, None, dump_dir=d)
            proc.wait(10)
            dumps.append(d)
        for cs in (4 << 20, 1 << 20, 256 << 10, 64 << 10):
            with casfs.open_store(os.path.join(work, f"dd-{deterministic}-{cs}")) as s:
                casfs.build(s, dumps[0], tag="first", chunk_size=cs, progress=False)
                r = casfs.build(s, dumps[1], tag="second", chunk_size=cs, progress=False)
            row = {"deterministic": deterministic, "chunk_kib": cs >> 10,
                   "bytes": r.pack.bytes_in, "new_bytes": r.pack.bytes_new_raw,
                   "stored_pct": round(100 * r.pack.bytes_new_raw / r.pack.bytes_in, 1)}
            rows.append(row)
            print(f"  dedup deterministic={deterministic} chunk {cs >> 10} KiB: second snapshot "
                  f"stored {row['new_bytes'] / 1e6:.1f} of {row['bytes'] / 1e6:.1f} MB "
                  f"({row['stored_pct']}%)", flush=True)
        for d in dumps:
            shutil.rmtree(d, ignore_errors=True)
    return rows


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
