"""Benchmark: safetensors to the GPU from a casfs store, against the peers, in one process.

One file of Llama-7B-shaped bf16 layers (``--size-gib``) is written as plain safetensors and
built into a local casfs store with ``casfs.build``'s defaults (per-file chunk sizes: the
.safetensors file gets 16 MiB raw chunks). Loaded, warm (page cache; one unmeasured run, then
``--repeats`` measured, median) and cold (``--drop-caches``: ``echo 3 > drop_caches`` before one
run), by:

  casfs               snapshot.weights.load_safetensors (fresh Store, no memory tier; every
                      chunk verified: blake3 of every byte), ``--concurrency`` workers
  casfs ssd           the chunks served by a filled ssd tier (no blob read)
  casfs pinned        the chunks held by a PinnedTier (the warm pool's case): H2D copies only
  load_file(cuda)     safetensors.torch.load_file(path, device="cuda")
  load_file+.cuda()   load_file(path) then .to("cuda") per tensor
  fastsafetensors     default: SafeTensorsFileLoader(nogds=False) (GDS, O_DIRECT reads where
                      GDS is absent); best documented without GDS: nogds=True with buffered
                      reads (FASTSAFETENSORS_ODIRECT=0), its README's mode for page-cached files
  runai streamer      default (direct reads); best documented for local files:
                      RUNAI_STREAMER_FS_STRATEGY=io_uring_buffered, RUNAI_STREAMER_CONCURRENCY=16
  pread->pinned xN    the ceiling: N threads pread the file into pinned buffers, async H2D,
                      nothing parsed, nothing verified
  H2D from pinned     the copy ceiling: one pinned buffer of the file's size copied to the GPU
  casfs read only     the store's verified read path alone (16 threads into pinned buffers)

Every casfs variant is checked bit-exact against load_file first. GB/s = 1e9 bytes/s of file.

Usage: python benchmarks/bench_weights.py --size-gib 4 --drop-caches --out results.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import load_file, save_file

import casfs
from snapshot.weights import LoadStats, load_safetensors

GiB = 1 << 30
DEV = "cuda"


def make_file(path: str, size_gib: float) -> int:
    """A safetensors file of Llama-7B-shaped bf16 layers, about ``size_gib`` GiB."""
    h, inter, vocab = 4096, 11008, 32000
    layer = 4 * h * h + 3 * h * inter + 2 * h
    n_layers = max(1, round((size_gib * GiB / 2 - 2 * vocab * h) / layer))
    g = torch.Generator(device=DEV).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=DEV, dtype=torch.bfloat16).mul_(0.02).cpu()

    t = {"model.embed_tokens.weight": r(vocab, h)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = r(h, h)
        t[p + "mlp.gate_proj.weight"] = r(inter, h)
        t[p + "mlp.up_proj.weight"] = r(inter, h)
        t[p + "mlp.down_proj.weight"] = r(h, inter)
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    t["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    t["lm_head.weight"] = r(vocab, h)
    save_file(t, path, metadata={"format": "pt"})
    return os.path.getsize(path)


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def done(out) -> None:
    torch.cuda.synchronize()
    del out
    gc.collect()
    torch.cuda.empty_cache()


def pread_pinned(path: str, threads: int, block: int = 16 << 20) -> torch.Tensor:
    """The ceiling: parallel pread into pinned buffers + async H2D into one device buffer."""
    size = os.path.getsize(path)
    out = torch.empty(size, dtype=torch.uint8, device=DEV)
    fd = os.open(path, os.O_RDONLY)
    blocks = list(range(0, size, block))
    lock = threading.Lock()

    def work(_: int) -> None:
        s = torch.cuda.Stream()
        bufs = [torch.empty(block, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        evs = [torch.cuda.Event(blocking=True), torch.cuda.Event(blocking=True)]
        k = 0
        while True:
            with lock:
                if not blocks:
                    break
                off = blocks.pop(0)
            n = min(block, size - off)
            b, e = bufs[k % 2], evs[k % 2]
            k += 1
            e.synchronize()
            mv = memoryview((ctypes.c_char * n).from_address(b.data_ptr())).cast("B")
            assert os.preadv(fd, [mv], off) == n
            with torch.cuda.stream(s):
                out[off:off + n].copy_(b[:n], non_blocking=True)
                e.record(s)
        s.synchronize()

    try:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(work, range(threads)))
    finally:
        os.close(fd)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--dir", default="/tmp/casfs-bench-weights")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", default="16,8,24", help="casfs workers; the first is the default")
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of method-name prefixes to leave out")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    conc = [int(c) for c in a.concurrency.split(",")]
    skip = [s for s in a.skip.split(",") if s]
    shutil.rmtree(a.dir, ignore_errors=True)
    src = os.path.join(a.dir, "src")
    os.makedirs(src)
    plain = os.path.join(src, "model.safetensors")
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv,
                 "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "kernel": platform.release(), "gpu": torch.cuda.get_device_name(0)},
                 "warm": {}, "cold": {}, "notes": {}}

    def save() -> None:
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)

    t0 = time.perf_counter()
    size = make_file(plain, a.size_gib)
    res["file_bytes"] = size
    res["make_file_s"] = time.perf_counter() - t0
    print(f"file: {size / 1e9:.2f} GB in {res['make_file_s']:.1f}s", flush=True)
    store_dir = os.path.join(a.dir, "store")
    with casfs.open_store(store_dir) as s:
        b = casfs.build(s, src, tag="bench", progress=False)  # the defaults: per-file policy
        im = s.open_image("bench")
        e = im.lookup("model.safetensors")
        refs = im.chunk_refs(e)
        res["build"] = {"seconds": b.seconds, "gb_per_s": size / 1e9 / b.seconds, "chunks": len(refs),
                        "chunk_size": im.file_chunk_size(e), "stored_bytes": b.pack.bytes_stored}
    print(f"build (defaults): {b.seconds:.1f}s, {len(refs)} chunks of {im.file_chunk_size(e) >> 20} MiB", flush=True)
    # an ssd tier holding every chunk (filled directly: the store's background fills are bounded)
    cache_dir = os.path.join(a.dir, "cache")
    with casfs.open_store(store_dir, cache_dir=cache_dir, memory_bytes=0) as s:
        for r in refs:
            s.ssd.put(r, s.blob.get(r))
    objects = casfs.open_store(store_dir).objects
    save()

    def ours(c: int, *, cache: str | None = None, pinned=None) -> dict:
        st = LoadStats()
        with casfs.Store(objects, cache_dir=cache, memory_bytes=0, pinned=pinned) as s:
            t = time.perf_counter()
            out = load_safetensors(s.open_image("bench"), "model.safetensors", device=DEV,
                                   concurrency=c, stats=st)
            torch.cuda.synchronize()
            el = time.perf_counter() - t
        done(out)
        return {"s": el, "tiers": {k: v.get("hits", 0) for k, v in st.tiers.items()},
                "pinned_bytes": st.pinned_bytes}

    def timed(fn) -> dict:
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        el = time.perf_counter() - t
        done(out)
        return {"s": el}

    def lf():
        return load_file(plain, device=DEV)

    def lf_cuda():
        return {k: v.to(DEV) for k, v in load_file(plain).items()}

    # fastsafetensors dlopens an unversioned libcudart.so: the caller puts one on LD_LIBRARY_PATH
    res["notes"]["LD_LIBRARY_PATH"] = os.environ.get("LD_LIBRARY_PATH", "")

    def fst(nogds: bool, odirect: str | None):
        from fastsafetensors import SafeTensorsFileLoader

        if odirect is None:
            os.environ.pop("FASTSAFETENSORS_ODIRECT", None)
        else:
            os.environ["FASTSAFETENSORS_ODIRECT"] = odirect
        loader = SafeTensorsFileLoader(None, f"{DEV}:0", nogds=nogds)  # it needs the device index
        try:
            loader.add_filenames({0: [plain]})
            fb = loader.copy_files_to_device()
            out = {k: fb.get_tensor(k) for k in loader.get_keys()}
            torch.cuda.synchronize()
            fb.close()  # a logical close: the owning tensors stay valid
        finally:
            loader.close()
        return out

    def runai(env: dict):
        from runai_model_streamer import SafetensorsStreamer

        for k in ("RUNAI_STREAMER_FS_STRATEGY", "RUNAI_STREAMER_CONCURRENCY"):
            os.environ.pop(k, None)
        os.environ.update(env)
        out = {}
        with SafetensorsStreamer() as st:
            st.stream_file(plain, device=DEV)
            for name, t in st.get_tensors():
                out[name] = t.to(DEV, non_blocking=True)
        return out

    pinned_tier = casfs.PinnedTier(size + (1 << 30))
    methods = {
        f"casfs c={conc[0]}": lambda: ours(conc[0]),
        **{f"casfs c={c}": (lambda c=c: ours(c)) for c in conc[1:]},
        f"casfs ssd c={conc[0]}": lambda: ours(conc[0], cache=cache_dir),
        f"casfs pinned c={conc[0]}": lambda: ours(conc[0], pinned=pinned_tier),
        "load_file(cuda)": lambda: timed(lf),
        "load_file+.cuda()": lambda: timed(lf_cuda),
        "fastsafetensors best (nogds, buffered)": lambda: timed(lambda: fst(True, "0")),
        "fastsafetensors default": lambda: timed(lambda: fst(False, None)),
        "runai best (io_uring_buffered, c=16)": lambda: timed(lambda: runai({"RUNAI_STREAMER_FS_STRATEGY": "io_uring_buffered",
                                                                             "RUNAI_STREAMER_CONCURRENCY": "16"})),
        "runai default": lambda: timed(lambda: runai({})),
        "pread->pinned x8 (ceiling)": lambda: timed(lambda: pread_pinned(plain, 8)),
        "pread->pinned x16": lambda: timed(lambda: pread_pinned(plain, 16)),
    }
    slow = {"fastsafetensors default", "runai default", "load_file(cuda)", "load_file+.cuda()"}
    methods = {k: v for k, v in methods.items() if not any(k.startswith(p) for p in skip)}

    # correctness first: every casfs path bit for bit what load_file gives
    ref = load_file(plain, device=DEV)
    res["bit_exact"] = {}
    for name, kw in (("default", {}), ("ssd", {"cache_dir": cache_dir}), ("pinned", {"pinned": pinned_tier})):
        with casfs.Store(objects, memory_bytes=0, **kw) as s:
            mine = load_safetensors(s.open_image("bench"), "model.safetensors", device=DEV, concurrency=conc[0])
        res["bit_exact"][name] = set(mine) == set(ref) and all(
            torch.equal(mine[k].view(-1).view(torch.uint8), ref[k].view(-1).view(torch.uint8)) for k in ref)
        del mine
    for name, fn in (("fastsafetensors best", lambda: fst(True, "0")), ("runai best", lambda: runai(
            {"RUNAI_STREAMER_FS_STRATEGY": "io_uring_buffered"}))):
        try:
            theirs = fn()
            res["bit_exact"][name] = all(torch.equal(theirs[k].reshape(-1).view(torch.uint8),
                                                     ref[k].reshape(-1).view(torch.uint8)) for k in ref)
            del theirs
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
            res["bit_exact"][name] = f"failed: {type(e).__name__}: {e}"[:300]
    done(ref)
    print(f"bit-exact vs load_file: {res['bit_exact']}", flush=True)
    save()

    # where the time goes: the read path alone, and the copy alone
    def read_only(threads: int) -> dict:
        with casfs.Store(objects, memory_bytes=0) as s:
            im = s.open_image("bench")
            local = threading.local()

            def one(r) -> int:
                buf = getattr(local, "buf", None)
                if buf is None:
                    t = local.t = torch.empty(max(x.raw_len for x in refs), dtype=torch.uint8, pin_memory=True)
                    buf = local.buf = memoryview((ctypes.c_char * t.numel()).from_address(t.data_ptr())).cast("B")
                return s.chunks.get_into(r, buf, im.index.pack_members, hash_threads=1)

            t = time.perf_counter()
            with ThreadPoolExecutor(threads) as ex:
                n = sum(ex.map(one, refs))
            return {"s": time.perf_counter() - t, "bytes": n}

    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)

    def h2d(streams: int) -> dict:
        dst = torch.empty(size, dtype=torch.uint8, device=DEV)
        ss = [torch.cuda.Stream() for _ in range(streams)]
        step = 16 << 20
        torch.cuda.synchronize()
        t = time.perf_counter()
        for k, off in enumerate(range(0, size, step)):
            with torch.cuda.stream(ss[k % streams]):
                dst[off:off + step].copy_(host[off:off + step], non_blocking=True)
        torch.cuda.synchronize()
        el = time.perf_counter() - t
        del dst
        return {"s": el}

    methods["casfs read only x16"] = lambda: read_only(16)
    methods["H2D from pinned, 1 stream"] = lambda: h2d(1)
    methods["H2D from pinned, 4 streams"] = lambda: h2d(4)

    for name, fn in methods.items():
        try:
            fn()  # warm the page cache, the allocators and (pinned) the tier
            reps = 1 if name in slow else a.repeats
            runs = [fn() for _ in range(reps)]
        except Exception as e:  # noqa: BLE001 - record and go on
            res["warm"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"warm {name}: FAILED {e}", flush=True)
            continue
        secs = [r["s"] for r in runs]
        med = statistics.median(secs)
        res["warm"][name] = {"runs_s": secs, "median_s": med, "gb_per_s": size / 1e9 / med,
                             "best_gb_per_s": size / 1e9 / min(secs), "detail": runs[-1]}
        print(f"warm {name:40s} {size / 1e9 / med:6.2f} GB/s  (runs {', '.join(f'{x:.3f}' for x in secs)} s)", flush=True)
        save()
    del host
    pinned_tier.free()
    if a.drop_caches:
        cold = [f"casfs c={conc[0]}", f"casfs ssd c={conc[0]}", "load_file(cuda)", "fastsafetensors best (nogds, buffered)",
                "runai best (io_uring_buffered, c=16)", "pread->pinned x8 (ceiling)"]
        if not drop_caches():
            res["cold"] = {"skipped": "cannot write /proc/sys/vm/drop_caches"}
        for name in cold if res["cold"] == {} else []:
            if name not in methods:
                continue
            drop_caches()
            try:
                r = methods[name]()
            except Exception as e:  # noqa: BLE001
                res["cold"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            res["cold"][name] = {"s": r["s"], "gb_per_s": size / 1e9 / r["s"]}
            print(f"cold {name:40s} {size / 1e9 / r['s']:6.2f} GB/s  ({r['s']:.2f} s)", flush=True)
            save()
    for kind in ("warm", "cold"):
        base = res[kind].get("load_file(cuda)", {}).get("gb_per_s")
        ceil = res[kind].get("pread->pinned x8 (ceiling)", {}).get("gb_per_s")
        res[f"ratios_{kind}"] = {k: {"x_load_file": v["gb_per_s"] / base if base else None,
                                     "x_ceiling": v["gb_per_s"] / ceil if ceil else None}
                                 for k, v in res[kind].items() if isinstance(v, dict) and "gb_per_s" in v}
    save()
    shutil.rmtree(a.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
