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

Park/unpark cycles (issue 12) run on the snapshot-creating replica when ``--park N`` is given
(serve.pool): ``--park-base K`` cycles re-reading the weights from casfs (the first shift's
path, the same-run baseline), ``--park N`` cycles copying them from the host's one shared pinned
copy (serve.shared_weights), ``--park-n M``: M replicas parked at once (M-1 more booted cold,
eager) and every parked worker's host memory (PSS: the shared copy counts 1/M in each), and
``--park-keep K`` cycles with the shared copy kept registered while parked.

``--source`` picks where ON restores read the snapshot (auto: serve's default, the export for GPU
snapshots; store: lazily from the casfs store, no export; export: the eager export path);
``--export-baseline`` adds one host and one blob restore through the export path after the others. ``--deadline S`` (seconds from the
start) skips steps that would not fit, recording them as skipped, so a device call's time
limit never cuts a step in half.

Run on the GPU machine (see docs/benchmarks.md for the exact command)::

    CASFS_CRIU=.criu-carry/criu python3 benchmarks/gpu/bench_gpu_replica.py --preset 0.6b \\
        --work /tmp/bench --out $OUT/bench-0.6b.json --cold 1 --warm 3 --on 3
"""

from __future__ import annotations

import argparse
import contextlib
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


KEEP_PAGE_CACHE = False  # --keep-page-cache (dry runs on a shared CPU box)


def drop_page_cache() -> str:
    if KEEP_PAGE_CACHE:
        return "kept (--keep-page-cache)"
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


def _weights(rep) -> dict:
    from serve.pool import _weights_of

    return _weights_of(rep)


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


T0 = time.monotonic()


class NoGpu:
    """--no-gpu (a dry run of this script on a CPU host): CPU replicas have no GPU state, so
    suspend and resume do nothing and no GPU memory is reported. Never used for H200 figures."""

    def suspend(self, pid: int) -> object:
        return type("NoState", (), {"device_bytes": {}, "to_dict": lambda self: {}})()

    def resume(self, state: object) -> object:
        return object()

    def memory(self) -> dict:
        return {"used": 0, "free": 1 << 40}

    def host_register_read_only(self) -> bool:
        return True

# rough seconds a step takes on the H200 (0.6B), for --deadline
COST = {"on_host": 8, "on_blob": 14, "park_cycle": 2.0, "park_n_boot": 35}


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work = os.path.abspath(a.work)
        os.makedirs(self.work, exist_ok=True)
        self.res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "preset": a.preset, "boots": [],
                          "args": vars(a)}
        self.ref: dict | None = None

    def left(self) -> float:
        """Seconds left before --deadline (inf without one)."""
        return float("inf") if not self.a.deadline else self.a.deadline - (time.monotonic() - T0)

    def fits(self, what: str, need: float, reserve: float = 0.0) -> bool:
        """Whether ``need`` seconds (plus ``reserve`` kept for later steps) are left; records a skip."""
        if self.left() >= need + reserve:
            return True
        self.res.setdefault("skipped", []).append(f"{what}: {self.left():.0f} s left, needs ~{need:.0f} s")
        self.save()
        print(f"[skip] {what} ({self.left():.0f} s left)", flush=True)
        return False

    def save(self) -> None:
        tmp = self.a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.res, f, indent=1, default=str)
        os.replace(tmp, self.a.out)

    def boot(self, kind: str, tag: str, *, inductor: str, snapshot: str | None = None, create: bool = False,
             prep: str = "", source: str | None = None) -> dict:
        from serve.boot import BootConfig, boot_replica

        env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(self.work, inductor, "inductor"),
               "TRITON_CACHE_DIR": os.path.join(self.work, inductor, "triton"),
               "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        cfg = BootConfig(image=tag, listen=listen(), store=os.path.join(self.work, "blob"),
                         cache_dir=os.path.join(self.work, "ssd"), engine="transformers", eager=self.a.eager,
                         max_model_len=self.a.max_model_len, workdir=os.path.join(self.work, "serve"),
                         snapshot=snapshot, create_snapshot=create, boot_timeout=900, env=env,
                         snapshot_source=source or self.a.source)
        entry: dict = {"kind": kind, "prep": prep, "source": source or self.a.source}
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
            if self.ref is None and (kind.startswith("off") or kind == "on_create"):
                self.ref = out  # without an OFF boot: the snapshot-creating boot's first answer
                self.res["reference"] = kind
            if self.ref is not None:
                entry["identical_to_cold"] = {
                    "tokens": out["tokens"] == self.ref["tokens"],
                    "logprobs": out["token_logprobs"] == self.ref["token_logprobs"]
                    and out["top_logprobs"] == self.ref["top_logprobs"]}
            if (self.a.park or self.a.park_base) and kind == "on_create":
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
        from serve.gpu_snapshots import DriverGpu
        from serve.pool import park_cycles, shared_weights

        a, gpu, out = self.a, (NoGpu() if self.a.no_gpu else DriverGpu()), {}
        self.res["park"] = out

        def cycles(name: str, n: int, reserve: float = 0.0, **kw) -> None:
            if n and self.fits(f"park {name} x{n}", n * COST["park_cycle"], reserve):
                try:
                    out[name] = park_cycles(rep, n, probe=lambda: probe(rep.listen, rep.report.image),
                                            reference=self.ref, gpu=gpu, **kw)
                except BaseException as e:  # noqa: BLE001 - recorded; the benchmark goes on
                    out[name] = {"error": f"{type(e).__name__}: {e}"}
                self.save()
                summary(name, out[name])

        def summary(name: str, r: dict) -> None:
            cs = r.get("cycles") or []
            un = [c["unpark"]["total"] for c in cs]
            print(f"[park {name}] {len(cs)} cycles unpark {min(un, default=0):.3f}-{max(un, default=0):.3f}s "
                  f"identical={[c['identical'] for c in cs]} {r.get('error', '')}", flush=True)

        try:
            hw = shared_weights(_weights(rep), gpu, pin="unpark")
            out["shared_setup"] = {**hw.report(), "read_only_register": gpu.host_register_read_only()}
        except BaseException as e:  # noqa: BLE001
            hw = None
            out["shared_setup"] = {"error": f"{type(e).__name__}: {e}"}
        self.save()
        print(f"[park] shared copy: {out['shared_setup']}", flush=True)
        # the shared cycles come first; the rest only where the --reserve for the restores is left
        if hw is not None:
            cycles("shared", a.park, shared=hw)
        cycles("base", a.park_base, a.reserve)
        if hw is not None and a.park_n > 1 and self.fits(f"park-n {a.park_n}", COST["park_n_boot"] * (a.park_n - 1),
                                                          a.reserve):
            out["n_replicas"] = self.park_n(rep, hw, gpu)
            self.save()
        if hw is not None:
            cycles("keep", a.park_keep, a.reserve, shared=hw, pin="always")
        if hw is not None:
            hw.close()
        return out

    def park_n(self, rep, hw, gpu) -> dict:
        """park_n replicas at once (rep + cold eager extras), each attached to the shared copy:
        every parked worker's host memory, the supervisor's too."""
        from serve.boot import BootConfig, boot_replica
        from serve.pool import ParkedReplica, Reservations, _weights_of, park, unpark
        from serve.shared_weights import host_memory

        res: dict = {"n": self.a.park_n, "shared_bytes": hw.nbytes}
        extras, parked = [], []
        spec = hw.spec()
        try:
            for i in range(self.a.park_n - 1):
                t = time.perf_counter()
                cfg = BootConfig(image=rep.report.image, listen=listen(), store=os.path.join(self.work, "blob"),
                                 cache_dir=os.path.join(self.work, "ssd"), engine="transformers", eager=True,
                                 max_model_len=self.a.max_model_len, workdir=os.path.join(self.work, "serve"),
                                 boot_timeout=300, env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
                extras.append(boot_replica(cfg))
                res.setdefault("extra_boot_s", []).append(time.perf_counter() - t)
            ps = [ParkedReplica(r, weights=_weights_of(r), shared=spec) for r in [rep, *extras]]
            resv = Reservations(gpu)
            for p in ps:  # attach: one unpark from the shared copy each, then all park
                park(p, gpu)
                res.setdefault("attach_unpark", []).append(unpark(p, gpu, resv, probe=False).get("shared_weights"))
            reports = []
            for p in ps:
                reports.append(park(p, gpu))
                parked.append(p)
            time.sleep(0.2)
            res["parked"] = [{"pid": p.replica.pid, "host_memory": host_memory(p.replica.pid),
                              "gpu_bytes": r.get("process_gpu_bytes_while_parked"),
                              "device_state_bytes": r.get("device_state_bytes")} for p, r in zip(ps, reports)]
            res["supervisor"] = host_memory(os.getpid())
            for p in list(parked):
                unpark(p, gpu, resv, probe=False)
                parked.remove(p)
        except BaseException as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"
        finally:
            import signal

            for p in parked:  # still parked: the extras are killed (GPU state in host memory),
                if p.replica is rep:  # the benchmark's replica is unparked for what follows
                    with contextlib.suppress(BaseException):
                        unpark(p, gpu, Reservations(gpu), probe=False)
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.replica.pid, signal.SIGKILL)
            for r in extras:
                r.stop(timeout=30)
        pm = [x["host_memory"] for x in res.get("parked", [])]
        print(f"[park-n] {len(pm)} parked: pss {[round(m.get('pss', 0) / 2**30, 2) for m in pm]} GiB, "
              f"pss_shmem {[round(m.get('pss_shmem', 0) / 2**30, 2) for m in pm]} GiB, rss "
              f"{[round(m.get('rss', 0) / 2**30, 2) for m in pm]} GiB {res.get('error', '')}", flush=True)
        return res

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
        made = self.boot("on_create", tag, inductor="ind-warm", snapshot=snap, create=True)
        failed = (made.get("restore") or {}).get("store_failed")
        if failed and a.source != "export":  # the store path does not work here: do not pay it 6 more times
            self.res["source_switched"] = f"the create boot's store restore failed ({failed}): ON boots use the export"
            a.source = "export"
        import casfs

        with casfs.open_store(os.path.join(self.work, "blob")) as s:
            snap_id = s.open_image(snap).id
        tiers = a.tiers.replace("+", ",").split(",")
        plan = [(tier, None) for _ in range(a.on) for tier in tiers]  # interleaved: a short call gets each
        if a.export_baseline:
            plan += [("host", "export"), ("blob", "export")]
        for tier, source in plan:
            if not self.fits(f"on_{tier} ({source or a.source})", COST.get(f"on_{tier}", 14)):
                continue
            if tier == "host":
                prep = "snapshot chunks (and export, if any) and weights in the page cache"
            elif tier == "ssd":
                snapshot.drop_export(snap_id)
                prep = "export dropped, page cache " + drop_page_cache() + "; chunks in the ssd tier"
            else:
                snapshot.drop_export(snap_id)
                shutil.rmtree(os.path.join(self.work, "ssd"), ignore_errors=True)
                prep = "export and ssd tier dropped, page cache " + drop_page_cache() + "; blob only"
            if source == "export" and tier == "host":  # export it first, outside the timed boot
                from snapshot.exports import materialize

                with casfs.open_store(os.path.join(self.work, "blob")) as s:
                    materialize(s.open_image(snap_id), None)
                prep = "export made before the boot; export and weights in the page cache"
            self.boot(f"on_{tier}" + ("_export" if source else ""), tag, inductor="ind-warm", snapshot=snap,
                      prep=prep, source=source)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="0.6b")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cold", type=int, default=1)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--on", type=int, default=3)
    ap.add_argument("--tiers", default="host,ssd,blob")
    ap.add_argument("--park", type=int, default=0,
                    help="park/unpark cycles from the shared pinned weights after the snapshot boot (issue 12)")
    ap.add_argument("--park-base", type=int, default=0, help="cycles re-reading the weights from casfs (baseline)")
    ap.add_argument("--park-n", type=int, default=0, help="replicas parked at once for the host-memory measurement")
    ap.add_argument("--park-keep", type=int, default=0, help="cycles keeping the shared weights registered while parked")
    ap.add_argument("--source", default="auto", choices=("auto", "store", "export"), help="where ON restores read the snapshot")
    ap.add_argument("--export-baseline", action="store_true", help="one host and one blob restore through the export too")
    ap.add_argument("--reserve", type=float, default=0,
                    help="seconds kept for the ON restores when deciding the optional park steps")
    ap.add_argument("--no-gpu", action="store_true", help="dry run on a CPU host (park cycles without a GPU layer)")
    ap.add_argument("--deadline", type=float, default=0, help="seconds from the start after which no step starts")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--eager", action="store_true", help="no torch.compile (graphs of the eager step)")
    ap.add_argument("--keep-page-cache", action="store_true", help="never drop the page cache (dry runs)")
    a = ap.parse_args()
    global KEEP_PAGE_CACHE
    KEEP_PAGE_CACHE = a.keep_page_cache
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
