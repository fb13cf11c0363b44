"""Host memory of parked replicas, N = 1, 2, 4 of one model: one shared copy of the weights
against one copy per replica (issue 12, item 2), measured in the same run.

Runs on the CPU (CI box or a laptop): real transformers replicas (serve.boot, the ``small``
preset of scripts/make_model.py: float32, ~230 MB of weights, or ``--preset``) booted from a
casfs store, parked (weights and KV cache released), unparked once from the weights' host copy
(``serve.shared_weights``: a sealed memfd each worker maps) with a greedy completion checked
against the cold answer, and parked again. Then every parked worker's host memory is read from
/proc/PID/smaps_rollup: PSS divides each page among the processes that map it, RSS does not.

* **shared**: the first N replicas map one ``HostWeights`` (one copy for all);
* **per replica** (baseline): each of the N replicas maps a ``HostWeights`` of its own (N copies:
  what N workers each holding a private pinned copy would cost).

A CPU replica has no GPU state: the pool's suspend/resume step is skipped (``CpuOnly``); on the
H200 the same measurement with the driver is benchmarks/gpu/bench_gpu_replica.py --park-n.

    .venv-vllm/bin/python benchmarks/bench_pool_memory.py --work /tmp/pm --out benchmarks/results/pool_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


class CpuOnly:
    """The GPU layer of a CPU replica: it has no device state, so there is nothing to suspend
    or resume (a park is the worker's own release of its weights and KV cache)."""

    def suspend(self, pid: int) -> object:
        return type("NoDeviceState", (), {"device_bytes": {}, "to_dict": lambda self: {}})()

    def resume(self, state: object) -> object:
        return object()

    def memory(self) -> dict:
        return {"used": 0, "free": 1 << 40}


def _listen() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _complete(rep, model: str) -> list:
    body = json.dumps({"model": model, "prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{rep.listen}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)["choices"][0]["text"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--n", default="1,2,4", help="replica counts (the largest is booted)")
    a = ap.parse_args()
    import casfs
    import make_model

    from serve.boot import BootConfig, boot_replica
    from serve.pool import ParkedReplica, Reservations, _weights_of, park, unpark
    from serve.shared_weights import HostWeights, host_memory

    ns = [int(x) for x in a.n.split(",")]
    work = os.path.abspath(a.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    tag = f"qwen3-{a.preset}"
    summary = make_model.build(os.path.join(work, "model"), a.preset)
    with casfs.open_store(os.path.join(work, "store")) as s:
        casfs.build(s, os.path.join(work, "model"), tag=tag, progress=False)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": os.uname().nodename, "cpus": os.cpu_count(),
                 "model": {k: summary[k] for k in ("preset", "parameters", "weight_bytes", "dtype")}, "runs": []}
    gpu = CpuOnly()
    reps = []
    try:
        for i in range(max(ns)):
            reps.append(boot_replica(BootConfig(image=tag, listen=_listen(), store=os.path.join(work, "store"),
                                                engine="transformers", workdir=os.path.join(work, "serve"),
                                                max_model_len=128, python=sys.executable,
                                                env={"PYTHONPATH": os.environ.get("PYTHONPATH", ROOT)})))
        want = _complete(reps[0], tag)
        weights = _weights_of(reps[0])
        ps = [ParkedReplica(r, weights=weights) for r in reps]
        for mode in ("shared", "per_replica"):
            for n in ns:
                copies = [HostWeights(weights)] if mode == "shared" else [HostWeights(weights) for _ in range(n)]
                run: dict = {"mode": mode, "n": n, "copy_bytes": copies[0].nbytes, "identical": []}
                for i, p in enumerate(ps[:n]):
                    p.shared = copies[0 if mode == "shared" else i].spec()
                    park(p, gpu)
                    u = unpark(p, gpu, Reservations(gpu), probe=False)
                    run.setdefault("unpark_weights", []).append(u.get("shared_weights"))
                    run["identical"].append(_complete(p.replica, tag) == want)
                for p in ps[:n]:
                    park(p, gpu)
                time.sleep(0.2)
                mem = [host_memory(p.replica.pid) for p in ps[:n]]
                run["parked"] = mem
                run["pss_per_replica"] = sum(m["pss"] for m in mem) / n
                run["pss_shmem_per_replica"] = sum(m["pss_shmem"] for m in mem) / n
                run["pss_total"] = sum(m["pss"] for m in mem)
                run["rss_per_replica"] = sum(m["rss"] for m in mem) / n
                res["runs"].append(run)
                print(f"{mode:12s} N={n}: PSS/replica {run['pss_per_replica'] / 2**20:7.1f} MiB "
                      f"(weights share {run['pss_shmem_per_replica'] / 2**20:6.1f} MiB of a "
                      f"{run['copy_bytes'] / 2**20:.1f} MiB copy), RSS/replica {run['rss_per_replica'] / 2**20:7.1f} MiB, "
                      f"PSS all {run['pss_total'] / 2**20:7.1f} MiB identical={run['identical']}", flush=True)
                for p in ps[:n]:  # back to serving, detached from this run's copies
                    p.shared = None
                    unpark(p, gpu, Reservations(gpu), probe=False)
                for c in copies:
                    c.close()
        by = {(r["mode"], r["n"]): r for r in res["runs"]}
        res["saved_per_replica"] = {n: by[("per_replica", n)]["pss_per_replica"] - by[("shared", n)]["pss_per_replica"]
                                    for n in ns}
    finally:
        for r in reps:
            r.stop(timeout=30)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
