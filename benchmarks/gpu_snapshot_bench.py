"""Benchmark: time to first token from a fresh start vs from a GPU snapshot (driver checkpoint).

The worker (``benchmarks/gpu/snap_worker.py``) is a ~1.1 GB Llama-shaped decoder that streams
its weights from a casfs image, captures one CUDA graph per decode batch size (optionally after
``torch.compile``) and generates greedily. For each variant this supervisor:

1. starts the worker and takes its time to first token (process start -> first token on the
   host: Python and torch imports, CUDA init, weights, compile, graph capture, one prompt);
2. ``repeats`` times: ``snapshot.gpu.suspend(pid)`` (lock + checkpoint: the GPU is freed),
   then ``resume`` and a one-token generation; the time from the resume call to the first
   token is the snapshot's time to first token; every batch size's 16 greedy tokens are then
   compared with the ones generated before the first suspend.

Variants: ``eager`` (graphs over eager kernels), ``compiled`` (``--compile``), ``vmm`` (weights
in CUDA VMM memory: released before the suspend and streamed back from casfs into the same
addresses after the resume, so the checkpoint holds graphs and buffers only).

The snapshot stays in the process's host memory ("in-memory snapshot"): no CRIU here, so the
time a CRIU restore of the host process would add is not in these numbers.

Usage: python benchmarks/gpu_snapshot_bench.py --out gpu_snapshot.json [--compile] [--vmm]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from snapshot import compat, gpu  # noqa: E402

WORKER = os.path.join(ROOT, "benchmarks", "gpu", "snap_worker.py")


class Worker:
    def __init__(self, args: list[str], log) -> None:
        self.t0 = time.time()
        self.p = subprocess.Popen([sys.executable, WORKER, *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=log, text=True)
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.q.put(json.loads(line))
        self.q.put(None)

    def recv(self, timeout: float) -> dict:
        msg = self.q.get(timeout=timeout)
        if msg is None:
            raise RuntimeError(f"worker exited (rc={self.p.wait()}); see the log")
        return msg

    def ask(self, cmd: dict, timeout: float = 120) -> tuple[dict, float]:
        t = time.perf_counter()
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        msg = self.recv(timeout)
        return msg, time.perf_counter() - t

    def close(self) -> None:
        try:
            if self.p.poll() is None:
                self.ask({"cmd": "exit"}, timeout=30)
        except Exception:  # noqa: BLE001
            pass
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=30)


def run_variant(name: str, flags: list[str], a, log) -> dict:
    out: dict = {"variant": name, "flags": flags, "rounds": []}
    w = Worker(["--store", a.store, "--batch-sizes", a.batch_sizes, *flags], log)
    try:
        ready = w.recv(timeout=a.boot_timeout)
        assert ready["event"] == "ready", ready
        marks = ready["marks"]
        out["fresh"] = {"marks": marks, "spawn_delay_s": ready["t_start"] - w.t0,
                        "ttft_s": ready["t_start"] - w.t0 + marks["total_to_first_token"],
                        "gpu_mem_reserved": ready["gpu_mem_reserved"], "weights_bytes": ready["weights_bytes"]}
        refs = {int(k): v for k, v in ready["refs"].items()}
        print(f"[{name}] fresh: first token after {out['fresh']['ttft_s']:.2f}s  {marks}", flush=True)
        pid = ready["pid"]
        for r in range(a.repeats):
            rd: dict = {}
            if "--vmm" in flags:
                msg, _ = w.ask({"cmd": "release"})
                rd["release_s"], rd["released_bytes"] = msg["s"], msg["bytes"]
            s = gpu.suspend(pid)
            rd.update(lock_s=s.lock_s, checkpoint_s=s.checkpoint_s, device_bytes=s.total_device_bytes)
            time.sleep(0.5)
            t = time.perf_counter()
            res = gpu.resume(s)
            rd.update(check_s=res.check_s, restore_s=res.restore_s, unlock_s=res.unlock_s)
            if "--vmm" in flags:
                msg, el = w.ask({"cmd": "reload"})
                rd["reload_s"] = el
            msg, _ = w.ask({"cmd": "generate", "batch": 1, "new": 1})
            rd["ttft_s"] = time.perf_counter() - t
            rd["first_token_s"] = msg["ttft_s"]
            ok = msg["tokens"][0][0] == refs[1][0][0]
            for B, ref in refs.items():
                m, _ = w.ask({"cmd": "generate", "batch": B, "new": 16})
                ok = ok and m["tokens"] == ref
            rd["correct"] = ok
            out["rounds"].append(rd)
            print(f"[{name}] round {r}: suspend {s.lock_s + s.checkpoint_s:.2f}s "
                  f"({s.total_device_bytes / 2**30:.2f} GiB off the GPU), resume->first token "
                  f"{rd['ttft_s']:.3f}s (restore {res.restore_s:.3f}s), outputs identical: {ok}", flush=True)
        snaps = [r["ttft_s"] for r in out["rounds"]]
        out["snapshot_ttft_median_s"] = statistics.median(snaps)
        out["speedup"] = out["fresh"]["ttft_s"] / out["snapshot_ttft_median_s"]
        out["all_correct"] = all(r["correct"] for r in out["rounds"])
    except Exception as e:  # noqa: BLE001 - keep the other variants' results
        out["error"] = f"{type(e).__name__}: {e}"
        print(f"[{name}] FAILED: {out['error']}", flush=True)
    finally:
        w.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="/tmp/casfs-snapbench/store")
    ap.add_argument("--out", default=None)
    ap.add_argument("--log", default="/tmp/casfs-snapbench/worker.log")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,2,4,8,16")
    ap.add_argument("--compile", action="store_true", help="also run the torch.compile variant")
    ap.add_argument("--vmm", action="store_true", help="also run the weights-out-graphs-in variant")
    ap.add_argument("--boot-timeout", type=float, default=300)
    a = ap.parse_args()
    os.makedirs(os.path.dirname(a.log), exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv,
                 "key": compat.snapshot_key(gpu=True), "variants": []}

    def save() -> None:
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)

    with open(a.log, "a") as log:
        t = time.perf_counter()
        subprocess.run([sys.executable, WORKER, "--store", a.store, "--prepare"], check=True,
                       stderr=log, stdout=subprocess.DEVNULL, timeout=300)
        res["prepare_s"] = time.perf_counter() - t
        variants = [("eager", [])]
        if a.vmm:
            variants.append(("vmm", ["--vmm"]))
        if a.compile:  # last: its compile time is the least predictable
            variants.append(("compiled", ["--compile"]))
        for name, flags in variants:
            res["variants"].append(run_variant(name, flags, a, log))
            save()
    print("\nvariant    fresh TTFT   snapshot TTFT   speedup   correct")
    for v in res["variants"]:
        if "error" in v:
            print(f"{v['variant']:10s} error: {v['error'][:80]}")
        else:
            print(f"{v['variant']:10s} {v['fresh']['ttft_s']:9.2f}s  {v['snapshot_ttft_median_s']:12.3f}s  "
                  f"{v['speedup']:7.1f}x   {v['all_correct']}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
