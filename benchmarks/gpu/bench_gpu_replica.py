"""GPU replica boot to first token through `casfs serve`'s pipeline: snapshots OFF vs ON (issue 18).

One model preset (scripts/make_model.py: Qwen3-0.6B or -8B shape, random bf16 weights) is built
here into a local casfs store ("blob": a directory) with an ssd tier beside it, then booted:

* **OFF, cold compile cache**: a cold boot (transformers engine: weights streamed from casfs,
  torch.compile of the decode step, CUDA graphs) with empty inductor/triton caches;
* **OFF, warm compile cache**: the same with the caches a previous boot filled (users keep them);
* **ON**: one ``--snapshot --create`` boot makes the GPU snapshot, then restores from it:
  (a) **host**: the snapshot's export and the weights in the host page cache;
  (b) **ssd**: export dropped and page cache dropped, chunks in the ssd tier (on disk);
  (c) **blob**: export, ssd tier and page cache dropped: everything from the blob directory.

Every boot: its report (phases, restore breakdown, the worker's own timings), GPU memory used
and the worker's resident memory after it, and one greedy completion with log-probabilities,
compared with the first cold boot's (tokens and log-probabilities must be identical). Results
are written to ``--out`` after every boot, so a timeout keeps what was measured.

Park/unpark cycles (issue 12) run last when ``--park N`` is given (serve.pool).

Run on the GPU machine (see docs/benchmarks.md for the exact command)::

    CASFS_CRIU=.criu-carry/criu python3 benchmarks/gpu/bench_gpu_replica.py --preset 0.6b \\
        --work /tmp/bench --out $OUT/bench-0.6b.json --cold 1 --warm 3 --on 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import traceback
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

PROMPT = "The quick brown fox jumps over the lazy dog and then"


def listen() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def drop_page_cache() -> str:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "dropped"
    except OSError as e:
        return f"not dropped: {e}"


def probe(addr: str, model: str) -> dict:
    """One greedy completion with the top-5 log-probabilities of every token."""
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "logprobs": 5}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/completions", body, {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        c = json.load(r)["choices"][0]
    return {"text": c["text"], "tokens": c["logprobs"]["tokens"], "token_logprobs": c["logprobs"]["token_logprobs"],
            "top_logprobs": c["logprobs"]["top_logprobs"], "seconds": time.perf_counter() - t}


def build_model(preset: str, work: str, res: dict) -> str:
    import make_model

    import casfs

    tag = f"qwen3-{preset}"
    blob = os.path.join(work, "blob")
    try:
        with casfs.open_store(blob) as s:
            s.open_image(tag)
            return tag
    except casfs.CasfsError:
        pass
    t = time.perf_counter()
    mdir = os.path.join(work, f"model-{preset}")
    shutil.rmtree(mdir, ignore_errors=True)
    summary = make_model.build(mdir, preset, max_len=4096)
    t1 = time.perf_counter()
    with casfs.open_store(blob) as s:
        r = casfs.build(s, mdir, tag=tag, chunk_size=16 << 20, progress=False)
    shutil.rmtree(mdir, ignore_errors=True)
    res["model"] = {**summary, "image_id": r.image_id, "make_s": t1 - t, "pack_s": time.perf_counter() - t1}
    return tag


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work = os.path.abspath(a.work)
        os.makedirs(self.work, exist_ok=True)
        self.res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "preset": a.preset, "boots": [],
                          "args": vars(a)}
        self.ref: dict | None = None

    def save(self) -> None:
        tmp = self.a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.res, f, indent=1, default=str)
        os.replace(tmp, self.a.out)

    def boot(self, kind: str, tag: str, *, inductor: str, snapshot: str | None = None, create: bool = False,
             prep: str = "") -> dict:
        from serve.boot import BootConfig, boot_replica

        env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(self.work, inductor, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(self.work, inductor, "triton"),
               "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        cfg = BootConfig(image=tag, listen=listen(), store=os.path.join(self.work, "blob"),
                         cache_dir=os.path.join(self.work, "ssd"), engine="transformers", eager=self.a.eager,
                         max_model_len=self.a.max_model_len, workdir=os.path.join(self.work, "serve"),
                         snapshot=snapshot, create_snapshot=create, boot_timeout=900, env=env)
        entry: dict = {"kind": kind, "prep": prep}
        t = time.perf_counter()
        try:
            rep = boot_replica(cfg)
        except BaseException as e:  # noqa: BLE001 - recorded, the benchmark goes on
            entry.update(error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t)
            self.res["boots"].append(entry)
            self.save()
            print(f"[{kind}] FAILED: {entry['error'][:2000]}", flush=True)
            return entry
        try:
            r = rep.report.to_dict()
            entry.update(total=r["total"], mode=r["mode"], phases=r["phases"], restore=r["details"].get("restore"),
                         memory=r["details"].get("memory"), snapshot_create=r.get("snapshot_create"),
                         snapshot_failed=r["details"].get("snapshot_failed"),
                         snapshot_refused=r["details"].get("snapshot_refused"),
                         worker={k: r["details"].get("worker", {}).get(k) for k in
                                 ("phases", "engine_timings", "engine_config", "device_release", "after_restore")})
            out = probe(cfg.listen, tag)
            entry["probe"] = out
            if self.ref is None and kind.startswith("off"):
                self.ref = out
            if self.ref is not None:
                entry["identical_to_cold"] = {
                    "tokens": out["tokens"] == self.ref["tokens"],
                    "logprobs": out["token_logprobs"] == self.ref["token_logprobs"]
                    and out["top_logprobs"] == self.ref["top_logprobs"]}
            if self.a.park and kind == "on_create":
                entry["park"] = self.park_cycles(rep)
        finally:
            rep.stop()
        entry["wall_s"] = time.perf_counter() - t
        self.res["boots"].append(entry)
        self.save()
        ph = " ".join(f"{k}={v:.2f}" for k, v in (entry.get("phases") or {}).items())
        print(f"[{kind}] {entry.get('mode')} total={entry.get('total', 0):.2f}s {ph} "
              f"identical={entry.get('identical_to_cold')} failed={entry.get('snapshot_failed')}", flush=True)
        return entry

    def park_cycles(self, rep) -> dict:
        try:
            from serve.pool import park_cycles
        except ImportError as e:
            return {"error": f"no serve.pool: {e}"}
        return park_cycles(rep, self.a.park, probe=lambda: probe(rep.listen, rep.report.image), reference=self.ref)

    def run(self) -> None:
        a = self.a
        import snapshot

        try:
            self.res["gpu_key"] = snapshot.gpu_key()
            self.res["criu"] = snapshot.find_criu().version_text
        except Exception as e:  # noqa: BLE001
            self.res["env_error"] = f"{type(e).__name__}: {e}"
        tag = build_model(a.preset, self.work, self.res)
        self.save()
        print(f"model {tag}: {self.res.get('model', 'reused')}", flush=True)
        for i in range(a.cold):  # the first one fills the warm cache
            self.boot("off_cold", tag, inductor="ind-warm" if i == 0 else f"ind-cold-{i}", prep="empty compile caches")
        for _ in range(a.warm):
            self.boot("off_warm", tag, inductor="ind-warm", prep="compile caches from an earlier boot")
        if not a.on:
            return
        snap = f"{tag}-gpu"
        self.boot("on_create", tag, inductor="ind-warm", snapshot=snap, create=True)
        import casfs

        with casfs.open_store(os.path.join(self.work, "blob")) as s:
            snap_id = s.open_image(snap).id
        for tier in a.tiers.replace("+", ",").split(","):
            for _ in range(a.on):
                if tier == "host":
                    prep = "export and weights in the page cache"
                elif tier == "ssd":
                    snapshot.drop_export(snap_id)
                    prep = "export dropped, page cache " + drop_page_cache() + "; chunks in the ssd tier"
                else:
                    snapshot.drop_export(snap_id)
                    shutil.rmtree(os.path.join(self.work, "ssd"), ignore_errors=True)
                    prep = "export and ssd tier dropped, page cache " + drop_page_cache() + "; blob only"
                self.boot(f"on_{tier}", tag, inductor="ind-warm", snapshot=snap, prep=prep)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="0.6b")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cold", type=int, default=1)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--on", type=int, default=3)
    ap.add_argument("--tiers", default="host,ssd,blob")
    ap.add_argument("--park", type=int, default=0, help="park/unpark cycles after the snapshot boot (issue 12)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--eager", action="store_true", help="no torch.compile (graphs of the eager step)")
    a = ap.parse_args()
    os.environ.setdefault("CASFS_SNAPSHOT_CACHE", os.path.join(os.path.abspath(a.work), "snapcache"))
    b = Bench(a)
    try:
        b.run()
    except BaseException as e:  # noqa: BLE001
        b.res["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        print(b.res["error"], flush=True)
    b.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
