"""GPU snapshot to disk through CRIU and casfs (issue 7 item 4), timed phase by phase.

One worker process (started here: setsid, stdio to /dev/null, its log opened O_APPEND) puts
``--mib`` MiB of bf16 weights on the GPU, captures a CUDA graph of a small matmul chain over
them, replays it once and records the output (a checksum, and a copy kept on the GPU). Then:

1. **in memory**: ``snapshot.gpu.suspend`` -> ``resume`` -> replay, compare;
2. **to disk**: ``suspend`` -> ``criu dump`` (the worker exits; it is reaped so its PID is free)
   -> the dump directory stored as a casfs image -> page cache dropped -> the image exported
   from casfs -> ``criu restore -d`` (same PID) -> ``resume`` -> replay, compare.

The worker replays when a file ``go-N`` appears in its control dir and answers with
``result-N.json`` (no pipes or sockets to the supervisor, nothing for CRIU to cut).
``--no-gpu`` runs the same CRIU/casfs path with a CPU-only worker (a smoke test for hosts
without a GPU). Writes one JSON file (``--out``); on a failure it records the phase and the
error text (CRIU's explained reasons and the log tail) and still writes it.

Run (device: see docs/benchmarks.md): ``CASFS_CRIU=.device/criu/criu python3
benchmarks/gpu/criu_disk_snapshot.py --out $OUT/criu_disk.json --logs $OUT``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


# ---------------------------------------------------------------------------------------------
# worker


def _write_json(path: str, obj: dict) -> None:
    """Write atomically and close at once: the worker holds no file open across a dump."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.rename(tmp, path)


def worker(ctl: str, mib: int, gpu: bool) -> None:
    t0 = time.time()
    if gpu:
        import torch

        torch.manual_seed(0)
        n = 4096
        layers = max(1, (mib << 20) // (n * n * 2))
        ws = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(layers)]
        x = torch.randn(64, n, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(x)
        weight = torch.arange(out.numel(), device="cuda", dtype=torch.int64).view(out.shape)

        def step() -> None:
            h = x
            for w in ws:
                h = torch.tanh(h @ w)
            out.copy_(h)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        ref = out.clone()

        def replay() -> dict:
            out.zero_()
            t = time.perf_counter()
            g.replay()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            chk = int((out.view(torch.int16).long() * weight).sum().item())
            return {"checksum": chk, "equal_to_ref": bool(torch.equal(out, ref)), "replay_s": dt}

        info = {"layers": layers, "weights_bytes": layers * n * n * 2,
                "gpu_mem_allocated": torch.cuda.memory_allocated(),
                "gpu_mem_reserved": torch.cuda.memory_reserved()}
    else:
        import hashlib
        import random

        data = bytearray(random.Random(0).randbytes(mib << 20))

        def replay() -> dict:
            t = time.perf_counter()
            h = hashlib.sha256(data).hexdigest()
            return {"checksum": h, "equal_to_ref": True, "replay_s": time.perf_counter() - t}

        info = {"bytes": len(data)}
    first = replay()
    _write_json(os.path.join(ctl, "ready.json"),
                {"pid": os.getpid(), "boot_s": time.time() - t0, "ref": first, **info})
    i = 0
    while not os.path.exists(os.path.join(ctl, "exit")):
        go = os.path.join(ctl, f"go-{i}")
        if os.path.exists(go):
            _write_json(os.path.join(ctl, f"result-{i}.json"), replay())
            i += 1
        time.sleep(0.002)


# ---------------------------------------------------------------------------------------------
# supervisor


def wait_file(path: str, timeout: float, alive=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        if alive is not None and not alive():
            raise RuntimeError(f"the worker exited before writing {os.path.basename(path)}")
        time.sleep(0.002)
    raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")


def ask_replay(ctl: str, i: int, timeout: float = 60.0) -> dict:
    t = time.perf_counter()
    open(os.path.join(ctl, f"go-{i}"), "w").close()
    r = wait_file(os.path.join(ctl, f"result-{i}.json"), timeout)
    r["round_trip_s"] = time.perf_counter() - t
    return r


def drop_caches() -> str:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "dropped"
    except OSError as e:
        return f"not dropped: {e}"


def du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for n in files:
            try:
                total += os.lstat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--logs", default=None, help="directory to copy CRIU and worker logs into")
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--mib", type=int, default=2048, help="weight bytes on the GPU (MiB)")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before the export (root; not on a shared box)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    gpu = not a.no_gpu
    if a.worker:
        worker(a.worker, a.mib, gpu)
        return

    import casfs
    from snapshot import criu as criumod

    gpumod = None
    if gpu:
        from snapshot import gpu as gpumod

    work = a.work or tempfile.mkdtemp(prefix="criu-disk-")
    os.makedirs(work, exist_ok=True)
    ctl, dump, restored, store_dir, logs = (os.path.join(work, n) for n in
                                            ("ctl", "dump", "restored", "store", "logs"))
    for d in (ctl, dump, logs):
        os.makedirs(d, exist_ok=True)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mib": a.mib, "gpu": gpu,
                 "phases": {}, "ok": False}
    ph = res["phases"]
    phase = "find_criu"
    proc = reaper = None
    rpid = None
    try:
        c = criumod.find_criu()
        res["criu"] = {"path": c.path, "version": c.version_text, "features": c.features}
        if gpu:
            from snapshot.compat import gpu_key
            res["gpu_key"] = gpu_key()

        phase = "boot"
        wlog = open(os.path.join(logs, "worker.log"), "ab")  # O_APPEND: CRIU restores it as is
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", ctl,
                                 "--mib", str(a.mib), "--out", "-"] + (["--no-gpu"] if not gpu else []),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=wlog,
                                start_new_session=True, close_fds=True, cwd=REPO)
        wlog.close()
        ready = wait_file(os.path.join(ctl, "ready.json"), 300, alive=lambda: proc.poll() is None)
        pid = ready["pid"]
        ph["boot"] = {"s": time.perf_counter() - t, "worker": ready}
        ref = ready["ref"]
        rnd = 0

        if gpu:
            phase = "memory_suspend"
            t = time.perf_counter()
            s = gpumod.suspend(pid)
            ph["memory_suspend"] = {"s": time.perf_counter() - t, "lock_s": s.lock_s,
                                    "checkpoint_s": s.checkpoint_s,
                                    "device_bytes_freed": s.total_device_bytes}
            phase = "memory_resume"
            t = time.perf_counter()
            r = gpumod.resume(s)
            ph["memory_resume"] = {"s": time.perf_counter() - t, "restore_s": r.restore_s,
                                   "unlock_s": r.unlock_s, "check_s": r.check_s}
            phase = "memory_replay"
            rep = ask_replay(ctl, rnd)
            rnd += 1
            rep["identical"] = rep["checksum"] == ref["checksum"] and rep["equal_to_ref"]
            ph["memory_replay"] = rep

            phase = "disk_suspend"
            t = time.perf_counter()
            s = gpumod.suspend(pid)
            ph["disk_suspend"] = {"s": time.perf_counter() - t, "lock_s": s.lock_s,
                                  "checkpoint_s": s.checkpoint_s,
                                  "device_bytes_freed": s.total_device_bytes}
            nv = [f["target"] for f in criumod.open_files(pid) if "/dev/nvidia" in f["target"]]
            ph["disk_suspend"]["nvidia_fds_after"] = nv

        phase = "criu_dump"
        res["tree_rule_problems"] = criumod.tree_rule_problems(pid)
        t = time.perf_counter()
        criumod.run(c, ["dump", "-t", str(pid), "-D", dump], log=os.path.join(logs, "dump.log"),
                    action="dump")
        t_dump = time.perf_counter() - t
        proc.wait(30)  # reap the original: its PID must be free for the restore
        ph["criu_dump"] = {"s": t_dump, "reaped_rc": proc.returncode, "image_bytes": du(dump),
                           "pages_bytes": sum(os.path.getsize(os.path.join(dump, n))
                                              for n in os.listdir(dump) if n.startswith("pages-"))}

        phase = "casfs_store"
        t = time.perf_counter()
        with casfs.open_store(store_dir) as st:
            b = casfs.build(st, dump, tag="gpu-snap", progress=False)
        ph["casfs_store"] = {"s": time.perf_counter() - t, "image_id": b.image_id,
                             "bytes_in": b.pack.bytes_in, "bytes_stored": b.pack.bytes_stored,
                             "chunks": b.pack.chunks_total, "store_on_disk": du(store_dir)}
        shutil.rmtree(dump)
        res["page_cache"] = drop_caches() if a.drop_caches else "warm (not dropped)"

        phase = "casfs_export"
        t = time.perf_counter()
        with casfs.open_store(store_dir) as st:
            img = st.open_image("gpu-snap")
            n = casfs.export(img, restored, progress=False).bytes
        ph["casfs_export"] = {"s": time.perf_counter() - t, "bytes": n,
                              "page_cache": res["page_cache"]}

        phase = "criu_restore"
        pidfile = os.path.join(work, "restored.pid")
        t = time.perf_counter()
        reaper = criumod.start_restore(c, ["restore", "-D", restored, "--pidfile", pidfile],
                                       log=os.path.join(logs, "restore.log"),
                                       stderr_path=os.path.join(logs, "restore.err"))
        deadline = time.monotonic() + 120
        while rpid is None:
            try:
                with open(pidfile) as f:
                    txt = f.read()
                if txt.strip().isdigit():
                    rpid = int(txt)
                    break
            except OSError:
                pass
            if reaper.poll() is not None or time.monotonic() > deadline:
                raise criumod.failure(f"criu restore failed (reaper exit {reaper.poll()})",
                                      os.path.join(logs, "restore.log"),
                                      extra=criumod.read_tail(os.path.join(logs, "restore.err")))
            time.sleep(0.001)
        ph["criu_restore"] = {"s": time.perf_counter() - t, "pid": rpid, "same_pid": rpid == pid}

        if gpu:
            phase = "disk_resume"
            ph["disk_resume"] = {"state_before": gpumod.get_state(rpid).name}
            t = time.perf_counter()
            s.pid = rpid
            r = gpumod.resume(s)
            ph["disk_resume"].update({"s": time.perf_counter() - t, "restore_s": r.restore_s,
                                      "unlock_s": r.unlock_s, "check_s": r.check_s})
        phase = "disk_replay"
        rep = ask_replay(ctl, rnd)
        rep["identical"] = rep["checksum"] == ref["checksum"] and rep["equal_to_ref"]
        ph["disk_replay"] = rep
        keys = ["criu_dump", "casfs_store", "casfs_export", "criu_restore"]
        if gpu:
            keys = ["disk_suspend"] + keys + ["disk_resume"]
            res["memory_total_s"] = ph["memory_suspend"]["s"] + ph["memory_resume"]["s"]
        res["disk_total_s"] = sum(ph[k]["s"] for k in keys)
        res["disk_restore_path_s"] = sum(ph[k]["s"] for k in keys if k in
                                         ("casfs_export", "criu_restore", "disk_resume"))
        res["ok"] = bool(rep["identical"] and (not gpu or ph["memory_replay"]["identical"]))
    except BaseException as e:  # noqa: BLE001 - record what failed and where, then write the JSON
        res["failed_phase"] = phase
        res["error"] = f"{type(e).__name__}: {e}"
        res["criu_reasons"] = getattr(e, "reasons", None)
        res["traceback"] = traceback.format_exc()[-3000:]
    finally:
        open(os.path.join(ctl, "exit"), "w").close()
        for p in (proc, reaper):
            if p is None:
                continue
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if rpid is not None:
            try:
                os.kill(rpid, 9)
            except ProcessLookupError:
                pass
        for n in ("dump.log", "restore.log", "restore.err", "worker.log"):
            p = os.path.join(logs, n)
            if os.path.exists(p):
                res.setdefault("log_tails", {})[n] = criumod.read_tail(p, 1500)
                if a.logs:
                    os.makedirs(a.logs, exist_ok=True)
                    shutil.copy(p, os.path.join(a.logs, "criu_disk_" + n))
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1, default=str)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in res.items() if k not in ("log_tails", "traceback")},
                     indent=1, default=str))
    if res.get("traceback"):
        print(res["traceback"], file=sys.stderr)


if __name__ == "__main__":
    main()
