"""Snapshots across GPUs and a tensor-parallel replica, on a two-GPU machine (issue 16).

Parts (``--parts``, in this order; results written to ``--out`` after every step, so a timeout
keeps what was measured):

* **restore**: ``casfs serve``'s GPU-snapshot pipeline (transformers engine, CRIU + the driver):
  one ``--snapshot --create`` boot on the first GPU, then restores of that snapshot alternating
  **same** (the GPU it was made on) and **cross** (``--restore-gpu`` = another GPU of the same
  model), ``--restores`` of each, order swapped every round. Per boot: time to first token
  (the boot report's total), its phases, the driver resume, the device map, where NVML lists
  the worker afterwards, and whether the greedy completion (tokens, log-probabilities) is
  identical to the create boot's. Goal: cross within 10% of same (median).
* **park**: the same replica parked (GPU memory released, driver suspend) and unparked without
  CRIU, alternating onto the same GPU and the other one (``serve.pool`` through
  ``serve.gpu_placement.PlacedGpu``): the driver's cross-GPU cost on its own.
* **tp**: ``serve.tp.TpReplica`` (two ranks, NCCL, eager) of the model: cold boot to first
  token vs unpark (``snapshot.resume_group`` + new communicators) to first token, outputs
  compared with the cold boot's. Goal: restore >= 20x faster than the cold boot. (The TP
  replica is parked in host memory: a CRIU dump of the ranks to disk is not built yet.)

Ratios are computed from runs in the same call. On the GPU machine (docs/multigpu.md has the
device call)::

    CASFS_CRIU=.criu-carry/criu python3 benchmarks/gpu/bench_multigpu.py --preset 0.6b \\
        --work /tmp/mg --out $OUT/multigpu.json --restores 3 --parks 3 --tp-cold 2 --tp-parks 3

``--cpu-check`` runs every part on a CPU host with the tiny model, FAKE GPU layers
(tests/fake_gpu.py, tests/fake_driver.py) and gloo: it checks the script, it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from benchmarks.gpu.bench_gpu_replica import build_model, listen, probe  # noqa: E402

TP_PROMPT = list(range(1, 33))


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}-{max(xs):.3f} s (median {statistics.median(xs):.3f}, n={len(xs)})" if xs else "none"


class Run:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work = os.path.abspath(a.work)
        os.makedirs(self.work, exist_ok=True)
        self.res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "args": vars(a), "parts": {}}
        self.gpus: list[dict] = []
        self.fake_gpus: list[dict] = []
        if a.cpu_check:
            from tests.fake_driver import fake_uuid

            self.fake_gpus = [{"index": i, "name": "FAKE GPU", "uuid": fake_uuid(i), "memory_free": 1 << 40,
                               "memory_total": 1 << 40} for i in range(2)]

    def save(self) -> None:
        tmp = self.a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.res, f, indent=1, default=str)
        os.replace(tmp, self.a.out)

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    # -- the GPU layer ---------------------------------------------------------------------------

    def layer(self, target: str | None):
        """The GPU layer a boot uses: the driver's (or, --cpu-check, a fake one with two fake GPUs),
        placed on ``target`` (None: where the snapshot was made)."""
        from serve.gpu_placement import PlacedGpu
        from serve.gpu_snapshots import DriverGpu

        if self.a.cpu_check:
            from tests.fake_gpu import FakeGpu

            inner = FakeGpu(gpus=self.fake_gpus)
        else:
            inner = DriverGpu()
        return PlacedGpu(inner, target or "same")

    def devices(self) -> list[dict]:
        if self.a.cpu_check:
            return self.fake_gpus
        import snapshot

        return snapshot.gpu_devices()

    # -- restore: same GPU vs another GPU ----------------------------------------------------------

    def boot(self, tag: str, *, snap: str, create: bool = False, target: str | None = None, kind: str) -> dict:
        from serve.boot import BootConfig, boot_replica

        env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(self.work, "ind", "inductor"),
               "TRITON_CACHE_DIR": os.path.join(self.work, "ind", "triton"),
               "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        cfg = BootConfig(image=tag, listen=listen(), store=os.path.join(self.work, "blob"),
                         cache_dir=os.path.join(self.work, "ssd"), engine="transformers", eager=True,
                         max_model_len=self.a.max_model_len, workdir=os.path.join(self.work, "serve"),
                         snapshot=snap, create_snapshot=create, boot_timeout=900, env=env,
                         gpu_snapshot=True, python=self.a.python, gpu_check=not self.a.cpu_check,
                         device="cpu" if self.a.cpu_check else "auto")
        gpu = self.layer(target)
        entry: dict = {"kind": kind, "target": target}
        t = time.perf_counter()
        try:
            rep = boot_replica(cfg, gpu=gpu)
        except BaseException as e:  # noqa: BLE001 - recorded, the run goes on
            entry.update(error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t)
            self.say(f"[{kind}] FAILED: {entry['error'][:1500]}")
            return entry
        try:
            r = rep.report.to_dict()
            restore = r["details"].get("restore") or {}
            entry.update(total=r["total"], mode=r["mode"], phases=r["phases"], restore=restore,
                         placement=r["details"].get("gpu_placement"), snapshot_failed=r["details"].get("snapshot_failed"),
                         snapshot_create=r.get("snapshot_create"))
            if not self.a.cpu_check:
                from snapshot import gpu as sgpu

                entry["nvml_lists_worker_on"] = sgpu.where_listed(rep.pid, self.devices())
            entry["probe"] = probe(cfg.listen, tag)
        finally:
            rep.stop()
        entry["wall_s"] = time.perf_counter() - t
        return entry

    def part_restore(self, tag: str) -> None:
        part: dict = {"boots": []}
        self.res["parts"]["restore"] = part
        snap = f"{tag}-mg"
        made = self.boot(tag, snap=snap, create=True, kind="create")
        part["boots"].append(made)
        self.save()
        if "error" in made or made.get("snapshot_failed"):
            part["error"] = "the snapshot could not be made: " + str(made.get("error") or made.get("snapshot_failed"))
            return
        ref = made.get("probe")
        stored = (made.get("snapshot_create") or {}).get("gpu_state") or {}
        src = [g["uuid"] for g in stored.get("gpus") or []]
        if self.a.cpu_check and not src:
            src = [self.fake_gpus[0]["uuid"]]
        name = next((d["name"] for d in self.devices() if src and d["uuid"] == src[0]), None)
        others = [d for d in self.devices() if d["name"] == name and d["uuid"] not in src]
        part["snapshot_gpus"] = src
        if len(src) != 1 or not others:
            part["error"] = f"needs a one-GPU snapshot and another GPU of its model: made on {src}, GPUs {self.devices()}"
            return
        other = others[0]["uuid"]
        part["other_gpu"] = other
        same_t: list[float] = []
        cross_t: list[float] = []
        for i in range(self.a.restores):
            order = [("same", None), ("cross", other)]
            for kind, target in (order if i % 2 == 0 else order[::-1]):
                e = self.boot(tag, snap=snap, target=target, kind=kind)
                if ref is not None and "probe" in e:
                    e["identical_to_create_boot"] = (e["probe"]["tokens"] == ref["tokens"]
                                                     and e["probe"]["token_logprobs"] == ref["token_logprobs"]
                                                     and e["probe"]["top_logprobs"] == ref["top_logprobs"])
                part["boots"].append(e)
                if e.get("mode") == "restore":
                    (same_t if kind == "same" else cross_t).append(e["total"])
                self.say(f"[restore {kind}] mode={e.get('mode')} total={e.get('total', 0):.2f}s "
                         f"placement={e.get('placement')} "
                         f"on={e.get('nvml_lists_worker_on')} identical={e.get('identical_to_create_boot')} "
                         f"failed={e.get('snapshot_failed') or e.get('error')}")
                self.save()
        part["same_s"], part["cross_s"] = same_t, cross_t
        if same_t and cross_t:
            part["cross_over_same"] = median(cross_t) / median(same_t)
        self.say(f"restore to first token: same GPU {spread(same_t)}; other GPU {spread(cross_t)}; "
                 f"ratio {part.get('cross_over_same')} (goal <= 1.10)")

    # -- park: the driver's cross-GPU cost without CRIU ----------------------------------------------

    def part_park(self, tag: str) -> None:
        from serve.boot import BootConfig, boot_replica
        from serve.pool import ParkedReplica, Reservations, _weights_of, park, unpark

        part: dict = {"cycles": []}
        self.res["parts"]["park"] = part
        cfg = BootConfig(image=tag, listen=listen(), store=os.path.join(self.work, "blob"),
                         cache_dir=os.path.join(self.work, "ssd"), engine="transformers", eager=True,
                         max_model_len=self.a.max_model_len, workdir=os.path.join(self.work, "serve"),
                         boot_timeout=900, python=self.a.python, gpu_check=not self.a.cpu_check,
                         device="cpu" if self.a.cpu_check else "auto",
                         env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        rep = boot_replica(cfg)
        try:
            ref = probe(rep.listen, tag)
            gpu = self.layer(None)
            p = ParkedReplica(rep, weights=_weights_of(rep))
            res = Reservations(gpu)
            same_t: list[float] = []
            cross_t: list[float] = []
            for i in range(2 * self.a.parks):
                kind = "same" if i % 2 == 0 else "cross"
                pr = park(p, gpu)
                here = [g["uuid"] for g in getattr(p.state, "gpus", [])] or [self.fake_gpus[0]["uuid"]]
                other = next((d["uuid"] for d in self.devices() if d["uuid"] not in here), None)
                gpu.target = other if kind == "cross" and other else "same"
                ur = unpark(p, gpu, res, model=tag)
                out = probe(rep.listen, tag)
                same = out["tokens"] == ref["tokens"] and out["token_logprobs"] == ref["token_logprobs"]
                (same_t if kind == "same" else cross_t).append(ur["total"])
                part["cycles"].append({"kind": kind, "park": pr, "unpark": ur, "placement": gpu.last,
                                       "identical": same})
                self.say(f"[park {kind}] unpark {ur['total']:.3f}s phases={ur['phases']} map={gpu.last} "
                         f"identical={same}")
                self.save()
            part["same_s"], part["cross_s"] = same_t, cross_t
            if same_t and cross_t:
                part["cross_over_same"] = median(cross_t) / median(same_t)
            self.say(f"unpark to first token: same GPU {spread(same_t)}; other GPU {spread(cross_t)}; "
                     f"ratio {part.get('cross_over_same')}")
        finally:
            rep.stop()

    # -- tp: TP=2 cold boot vs unpark ------------------------------------------------------------------

    def part_tp(self) -> None:
        import make_model

        from serve.tp import TpReplica

        part: dict = {"cold": [], "unpark": []}
        self.res["parts"]["tp"] = part
        mdir = os.path.join(self.work, f"tp-model-{self.a.preset}")
        if not os.path.exists(os.path.join(mdir, "config.json")):
            make_model.build(mdir, self.a.preset, max_len=4096)
        cold_t: list[float] = []
        back_t: list[float] = []
        ref = None
        for c in range(self.a.tp_cold):
            t0 = time.perf_counter()
            tp = TpReplica(mdir, world=2, device="cpu" if self.a.cpu_check else "cuda", python=self.a.python,
                           log_dir=os.path.join(self.work, f"tp-logs-{c}"), timeout_s=600)
            try:
                boot = tp.start()
                if self.a.cpu_check:
                    self._fake_driver_for(tp)
                first = tp.generate(TP_PROMPT, 1)
                ttft = time.perf_counter() - t0
                out = tp.generate(TP_PROMPT, 16)
                ref = ref or out
                cold_t.append(ttft)
                part["cold"].append({"ttft_s": ttft, "boot_s": boot["boot_s"], "first_token_s": first["seconds"],
                                     "rank_phases": [r["phases"] for r in boot["ranks"]],
                                     "identical_to_first_cold": out["tokens"] == ref["tokens"]
                                     and out["logprobs"] == ref["logprobs"]})
                self.say(f"[tp cold {c}] to first token {ttft:.2f}s phases={boot['ranks'][0]['phases']}")
                self.save()
                for _ in range(self.a.tp_parks):
                    pk = tp.park()
                    t1 = time.perf_counter()
                    up = tp.unpark()
                    first = tp.generate(TP_PROMPT, 1)
                    ttft = time.perf_counter() - t1
                    out = tp.generate(TP_PROMPT, 16)
                    same = out["tokens"] == ref["tokens"] and out["logprobs"] == ref["logprobs"]
                    back_t.append(ttft)
                    part["unpark"].append({"ttft_s": ttft, "park": pk, "unpark": up, "identical": same})
                    self.say(f"[tp unpark] to first token {ttft:.3f}s {up['phases']} identical={same}")
                    self.save()
            except Exception as e:  # noqa: BLE001 - recorded
                part.setdefault("errors", []).append(f"{type(e).__name__}: {e}")
                self.say(f"[tp] FAILED: {e}")
            finally:
                tp.stop()
        part["cold_s"], part["unpark_s"] = cold_t, back_t
        if cold_t and back_t:
            part["cold_over_unpark"] = median(cold_t) / median(back_t)
        self.say(f"TP=2 to first token: cold {spread(cold_t)}; unpark {spread(back_t)}; "
                 f"ratio {part.get('cold_over_unpark')} (goal >= 20)")

    def _fake_driver_for(self, tp) -> None:
        """--cpu-check: a FAKE driver and NVML that know the ranks (checks the script only)."""
        import snapshot.compat as compat
        import snapshot.gpu as sgpu
        from tests.fake_driver import FakeDriver, FakeGpuDevice, FakeNvml

        drv = FakeDriver([FakeGpuDevice(d["uuid"], d["name"], d["memory_total"]) for d in self.fake_gpus])
        for r, pid in enumerate(tp.pids):
            drv.add(pid, [self.fake_gpus[r]["uuid"]], 1 << 30)
        nv = FakeNvml(drv)
        sgpu._drv = drv
        compat._nvml = sgpu._nvml = lambda: nv

    def run(self) -> None:
        parts = self.a.parts.split(",")
        if not self.a.cpu_check:
            import snapshot

            try:
                self.res["gpu_key"] = snapshot.gpu_key()
                self.res["devices"] = snapshot.gpu_devices()
            except Exception as e:  # noqa: BLE001
                self.res["env_error"] = f"{type(e).__name__}: {e}"
        tag = None
        if "restore" in parts or "park" in parts:
            tag = build_model(self.a.preset, self.work, self.res)
            self.save()
        for name in parts:
            t = time.perf_counter()
            try:
                if name == "restore":
                    self.part_restore(tag)
                elif name == "park":
                    self.part_park(tag)
                elif name == "tp":
                    self.part_tp()
                else:
                    raise ValueError(f"unknown part {name!r}")
            except BaseException as e:  # noqa: BLE001 - the next part still runs
                self.res["parts"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                self.say(f"[{name}] FAILED: {e}")
            self.res["parts"].setdefault(name, {})["part_s"] = time.perf_counter() - t
            self.save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="0.6b", help="scripts/make_model.py preset (tiny with --cpu-check)")
    ap.add_argument("--work", required=True, help="scratch directory (model, store, snapshots)")
    ap.add_argument("--out", required=True, help="JSON results, rewritten after every step")
    ap.add_argument("--parts", default="restore,park,tp", help="comma list of restore, park, tp")
    ap.add_argument("--restores", type=int, default=3, help="restores onto each GPU (alternating)")
    ap.add_argument("--parks", type=int, default=3, help="unparks onto each GPU (alternating)")
    ap.add_argument("--tp-cold", type=int, default=2, help="TP=2 cold boots")
    ap.add_argument("--tp-parks", type=int, default=3, help="park/unpark cycles after each TP cold boot")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--python", default=sys.executable, help="interpreter with torch and transformers")
    ap.add_argument("--cpu-check", action="store_true", help="check the script on a CPU host (fake GPUs; measures nothing)")
    a = ap.parse_args()
    os.environ.setdefault("CASFS_SNAPSHOT_CACHE", os.path.join(os.path.abspath(a.work), "snapcache"))
    r = Run(a)
    try:
        r.run()
    except BaseException as e:  # noqa: BLE001
        r.res["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        print(r.res["error"], flush=True)
    r.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
