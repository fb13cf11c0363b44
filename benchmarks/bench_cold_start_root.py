#!/usr/bin/env python3
"""Realistic cold start: a Debian root with Python and the vLLM CPU venv, started with
``casfs run`` from a blob-only store behind the delay relay, against pull + extract.

The image: a ``debootstrap --variant=minbase`` bookworm root (through the package mirror), plus
the interpreter the venv links to (``/root/.pyenv/versions/3.11.7``: bin, libpython, the
standard library without site-packages and tests) and the vLLM CPU venv (``.venv-vllm``, torch
2.13 CPU, vLLM 0.32, transformers ...: ~3.5 GB), both copied to the same paths inside the root,
so the venv's absolute links resolve there. Built once into ``--root`` (reused afterwards).

The blob store is a casfs store directory served by Debian's nginx behind the user-space delay
relay (``tests.support.FaultProxy``: this kernel has no netem): ``--rtt-ms`` round trip and
``--rate-mbit`` each way. Page cache dropped before every scenario. The workload
(``--workload``): ``torch`` = ``python -c "import torch; torch.ones(2).sum()"`` (default), or
``vllm`` = ``python -c "import vllm.entrypoints.openai.api_server"`` (the API server's imports:
torch, transformers, fastapi, vLLM). Why not vLLM's /health: on these 2 cores a boot to
/health takes 40-110 s of compilation and model setup (DESIGN.md), which no filesystem can
shorten, and it needs a model directory; the imports are the part of a boot that reads the
image.

Scenarios, each timed from "nothing local" to the workload's exit:

  (a) pull + extract: ``casfs copy`` to a local store, ``casfs export`` to a directory, then the
      workload in it (``unshare -mpf --root --mount-proc``: its own namespaces and /proc like a
      container, without runc, which is cheaper, so it favours the baseline)
  (b) ``casfs run`` lazily, cold caches (empty ssd tier), no profile
  (c) ``casfs run`` lazily, cold caches, the startup profile replayed (recorded once before)
  (d) ``casfs run`` with the ssd tier (b) left behind (warm ssd), page cache dropped
  (e) native: the workload in the root on local disk (``unshare`` as in (a))
  (f) a small-file start: ``casfs run ... -- cat /etc/os-release``, cold, no profile

Bytes: "touched" is what the kernel read through FUSE (``--stats-json``: the mount's
``read_bytes``, kernel readahead included); "fetched" is what the blob tier served.

Needs root, debootstrap, nginx, runc, /dev/fuse. Usage:
  python -m benchmarks.bench_cold_start_root [--root /var/tmp/casfs-vllm-root] [--repeat 2]
      [--workload torch|vllm] [--rtt-ms 50] [--rate-mbit 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks._common import describe_machine, machine_info, write_results
from benchmarks.bench_cold_start import drop_caches, tree_stats

from tests.support import FaultProxy, nginx_static

HERE = os.path.dirname(os.path.abspath(__file__))
CASFS = [sys.executable, "-m", "casfs.cli.main"]
PYHOME = "/root/.pyenv/versions/3.11.7"
VENV = "/work/main/.venv-vllm"
WORKLOADS = {
    "torch": [f"{VENV}/bin/python", "-c", "import torch; torch.ones(2).sum()"],
    "vllm": [f"{VENV}/bin/python", "-c", "import vllm.entrypoints.openai.api_server"],
}
SMALL = ["cat", "/etc/os-release"]
INCLUDE = ("libssl3,libffi8,libsqlite3-0,zlib1g,libbz2-1.0,liblzma5,libreadline8,libncursesw6,"
           "libgomp1,libstdc++6,ca-certificates")


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-1500:]}")
    return p


def casfs(*args: str) -> str:
    return sh(CASFS + list(args)).stdout


def mirror() -> str:
    try:
        with open("/etc/apt/sources.list.d/debian.sources") as f:
            for line in f:
                if line.startswith("URIs:"):
                    return line.split()[1]
    except OSError:
        pass
    return "http://deb.debian.org/debian"


def make_root(root: str) -> None:
    """debootstrap + the interpreter + the venv, at their own paths inside the root (once)."""
    if os.path.exists(os.path.join(root, ".casfs-bench-ready")):
        return
    for need in ("debootstrap", "rsync"):
        if not shutil.which(need):
            raise SystemExit(f"{need} is missing: apt-get install {need}")
    if not os.path.exists(os.path.join(VENV, "bin", "python")):
        raise SystemExit(f"{VENV} is missing (scripts/setup_vllm.sh builds it)")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(root, "etc", "os-release")):
        print(f"debootstrap minbase bookworm into {root} ...", flush=True)
        sh(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", "bookworm", root, mirror()], timeout=1800)
    print("copying the interpreter and the vLLM venv into the root ...", flush=True)
    dst = root + PYHOME
    os.makedirs(dst, exist_ok=True)
    sh(["rsync", "-a", "--exclude", "lib/python3.11/site-packages/*", "--exclude", "lib/python3.11/test/",
        "--exclude", "lib/python3.11/idlelib/", "--exclude", "lib/python3.11/tkinter/",
        PYHOME + "/bin", PYHOME + "/lib", dst + "/"], timeout=1800)
    os.makedirs(root + os.path.dirname(VENV), exist_ok=True)
    sh(["rsync", "-a", "--exclude", "__pycache__/*.pyc.*", VENV + "/", root + VENV + "/"], timeout=3600)
    open(os.path.join(root, ".casfs-bench-ready"), "w").close()
    print(f"root ready in {time.perf_counter() - t0:.0f} s", flush=True)


def chroot_run(root: str, cmd: list[str]) -> float:
    t0 = time.perf_counter()
    # its own mount and PID namespaces with a /proc, like the container (no runc: cheaper)
    p = subprocess.run(["unshare", "-mpf", f"--root={root}", "--mount-proc"] + cmd, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": "/root"})
    if p.returncode:
        raise SystemExit(f"workload failed in {root}: {p.stderr[-2000:]}")
    return time.perf_counter() - t0


def lazy_run(store: str, cache: str, cmd: list[str], stats: str, *extra: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    p = subprocess.run(CASFS + ["--store", store, "--cache-dir", cache, "run", "--stats-json", stats, *extra,
                                "vllmroot", "--", *cmd], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"casfs run failed: {p.stderr[-2000:]}")
    with open(stats) as f:
        st = json.load(f)
    tiers = {t["tier"]: t for t in st["tiers"]}
    return dt, {"touched": st["mount"]["read_bytes"], "fetched": tiers["blob"]["bytes_read"],
                "ssd": tiers.get("ssd", {}).get("bytes_read", 0), "fuse_reads": st["mount"]["reads"],
                "lookups": st["mount"]["lookups"], "opens": st["mount"]["opens"],
                "block_reads": st["mount"].get("block_reads", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/var/tmp/casfs-vllm-root", help="the prepared root (built once)")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="torch")
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default=None, help="work directory (default: a new dir under /var/tmp)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (debootstrap, FUSE, runc, dropping the page cache)")
    started = time.time()
    machine = machine_info()
    print(describe_machine(machine), flush=True)
    cmd = WORKLOADS[args.workload]
    make_root(args.root)
    nfiles, nbytes = tree_stats(args.root)
    work = args.work or tempfile.mkdtemp(prefix="casfs-rootstart-", dir="/var/tmp")
    local = os.path.join(work, "store")
    t0 = time.perf_counter()
    casfs("--store", local, "build", args.root, "--tag", "vllmroot", "--no-progress")
    t_build = time.perf_counter() - t0
    stored = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(local) for f in fs)
    print(f"image: {nfiles} files, {nbytes / 1e9:.2f} GB; stored {stored / 1e9:.2f} GB; built in {t_build:.0f} s",
          flush=True)
    res: dict[str, list[float]] = {k: [] for k in "abcdef"}
    det: dict[str, list[dict]] = {k: [] for k in "abcdef"}
    try:
        with nginx_static(local) as base:
            port = int(base.rstrip("/").rsplit(":", 1)[1])
            with FaultProxy(port) as proxy:
                half = args.rtt_ms / 2000.0
                rate = args.rate_mbit * 1e6 / 8
                proxy.set_latency(up=half, down=half)
                proxy.set_rate(up=rate, down=rate)
                remote = f"http://127.0.0.1:{proxy.port}/"
                # the startup profile, recorded once through the local store (nginx then serves it)
                rec = os.path.join(work, "cache-rec")
                sh(CASFS + ["--store", local, "--cache-dir", rec, "run", "--record-profile", "900",
                            "vllmroot", "--", *cmd])
                shutil.rmtree(rec)
                print(casfs("--store", local, "profile", "show", "vllmroot", "--limit", "0").strip()[-300:], flush=True)
                for r in range(args.repeat):
                    drop_caches()
                    res["e"].append(chroot_run(args.root, cmd))
                    dst, exp = os.path.join(work, f"pull{r}"), os.path.join(work, f"export{r}")
                    drop_caches()
                    t0 = time.perf_counter()
                    casfs("copy", "vllmroot", "--from", remote, "--to", dst, "--no-progress")
                    t_copy = time.perf_counter() - t0
                    casfs("--store", dst, "export", "vllmroot", exp, "--no-progress")
                    t_export = time.perf_counter() - t0 - t_copy
                    chroot_run(exp, cmd)
                    res["a"].append(time.perf_counter() - t0)
                    det["a"].append({"copy_s": t_copy, "export_s": t_export})
                    shutil.rmtree(dst)
                    shutil.rmtree(exp)
                    cache_b = os.path.join(work, f"cache-b{r}")
                    drop_caches()
                    t, d = lazy_run(remote, cache_b, cmd, os.path.join(work, "stats.json"), "--no-profile")
                    res["b"].append(t)
                    det["b"].append(d)
                    drop_caches()
                    t, d = lazy_run(remote, cache_b, cmd, os.path.join(work, "stats.json"), "--no-profile")
                    res["d"].append(t)
                    det["d"].append(d)
                    shutil.rmtree(cache_b)
                    cache_c = os.path.join(work, f"cache-c{r}")
                    drop_caches()
                    t, d = lazy_run(remote, cache_c, cmd, os.path.join(work, "stats.json"))
                    res["c"].append(t)
                    det["c"].append(d)
                    shutil.rmtree(cache_c)
                    cache_f = os.path.join(work, f"cache-f{r}")
                    drop_caches()
                    t, d = lazy_run(remote, cache_f, SMALL, os.path.join(work, "stats.json"), "--no-profile")
                    res["f"].append(t)
                    det["f"].append(d)
                    shutil.rmtree(cache_f)
                    print(f"round {r + 1}: " + "  ".join(f"({k}) {v[-1]:.2f}s" for k, v in sorted(res.items())),
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    names = {"a": "pull + extract (copy + export), then run", "b": "casfs run, cold caches, no profile",
             "c": "casfs run, cold caches, profile replayed", "d": "casfs run, warm ssd tier",
             "e": "native: the root on local disk", "f": "casfs run -- cat /etc/os-release, cold"}
    print(f"\nworkload {args.workload}: {' '.join(cmd)}; blob over http behind a {args.rtt_ms:.0f} ms RTT, "
          f"{args.rate_mbit:.0f} Mbit/s relay; page cache dropped before each run")
    print(f"{'scenario':<48} {'median s':>9} {'runs':>16} {'(a)/this':>9} {'this/(e)':>9} {'touched MB':>11} {'fetched MB':>11}")
    for k in "abcdef":
        runs = ", ".join(f"{x:.2f}" for x in res[k])
        tb = statistics.median(d["touched"] for d in det[k]) / 1e6 if det[k] and "touched" in det[k][0] else float("nan")
        fb = statistics.median(d["fetched"] for d in det[k]) / 1e6 if det[k] and "fetched" in det[k][0] else float("nan")
        print(f"({k}) {names[k]:<44} {med[k]:>9.2f} {runs:>16} {med['a'] / med[k]:>8.1f}x {med[k] / med['e']:>8.2f}x "
              f"{tb:>11.1f} {fb:>11.1f}")
    path = write_results("cold_start_root", {
        "workload": args.workload, "cmd": cmd, "rtt_ms": args.rtt_ms, "rate_mbit": args.rate_mbit,
        "repeat": args.repeat, "files": nfiles, "bytes": nbytes, "stored_bytes": stored, "build_s": t_build},
        {"seconds": res, "median": med, "detail": det}, started=started, out=args.out, machine=machine)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
