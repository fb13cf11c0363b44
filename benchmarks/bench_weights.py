"""Benchmark: safetensors from a casfs store to the GPU (or CPU), against safetensors itself.

One file of transformer-shaped bf16 tensors (Llama-7B layer shapes, as many layers as the size
asks for) is written as plain safetensors, built into one local casfs store per ``--stores``
entry (chunk size in MiB and the build's compress policy, e.g. ``4:auto,16:auto,4:always``;
``auto`` stores the .safetensors file raw), and loaded by:

  casfs            snapshot.weights.load_safetensors(image, path, device) (a fresh Store per run,
                   so nothing comes from an in-process cache: chunks are read from the store's
                   files with Image.read_into, verified in pinned slots, copied to the device)
  load_file        safetensors.torch.load_file(path, device=device)
  load_file+cuda   safetensors.torch.load_file(path) then .to(device) per tensor
  pread->pinned    the hardware ceiling: N threads pread the plain file into pinned buffers with
                   async copies into one device buffer (no parsing, no verification)
  casfs-read       the store's read path alone: N threads read every chunk (verified) with
                   get_into into a per-thread buffer (``get_into``) or with get() (``get``)

Page cache warm: one unmeasured run of each first, then ``--repeats`` measured runs (median).
Cold (``--drop-caches``, root): ``sync; echo 3 > /proc/sys/vm/drop_caches`` before each run.

Usage: python -m benchmarks.bench_weights --size-gib 6 --stores 4:auto,16:auto --drop-caches --out results.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
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


def make_file(path: str, size_gib: float, device: str) -> int:
    """Write a safetensors file of Llama-7B-shaped bf16 layers, about ``size_gib`` GiB."""
    h, inter, vocab = 4096, 11008, 32000
    layer = 4 * h * h + 3 * h * inter + 2 * h
    n_layers = max(1, round((size_gib * GiB / 2 - 2 * vocab * h) / layer))
    gen_dev = device if device.startswith("cuda") else "cpu"
    g = torch.Generator(device=gen_dev).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=gen_dev, dtype=torch.bfloat16).mul_(0.02).cpu()

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": r(vocab, h)}
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


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def pread_pinned(path: str, device: str, threads: int = 8, block: int = 16 << 20) -> torch.Tensor:
    """The hardware ceiling: parallel pread into pinned buffers + async H2D into one buffer."""
    size = os.path.getsize(path)
    out = torch.empty(size, dtype=torch.uint8, device=device)
    fd = os.open(path, os.O_RDONLY)
    blocks = list(range(0, size, block))
    lock = threading.Lock()

    def work(_: int) -> None:
        s = torch.cuda.Stream(device)
        bufs = [torch.empty(block, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        evs = [torch.cuda.Event(), torch.cuda.Event()]
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
            got = os.preadv(fd, [mv], off)
            assert got == n
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


def casfs_read(store_dir: str, tag: str, rel: str, threads: int, into: bool = True) -> int:
    """Read every chunk of ``rel`` with ``threads`` threads: ``get_into`` a per-thread buffer
    (blake3 with one thread each), or ``get()``. Returns the bytes read."""
    with casfs.open_store(store_dir) as s:
        im = s.open_image(tag)
        refs = im.chunk_refs(im.lookup(rel))
        pm = im.index.pack_members
        local = threading.local()

        def one(r) -> int:
            if not into:
                return len(s.chunks.get(r, pm))
            buf = getattr(local, "buf", None)
            if buf is None or len(buf) < r.raw_len:
                buf = local.buf = bytearray(max(x.raw_len for x in refs))
            return s.chunks.get_into(r, buf, pm, hash_threads=1)

        with ThreadPoolExecutor(threads) as ex:
            return sum(ex.map(one, refs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/casfs-bench-weights")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stores", default="4:auto",
                    help="comma list of CHUNK_MIB:COMPRESS stores to build and load (the first is the headline)")
    ap.add_argument("--concurrency", default="16,8", help="comma list; the first is the headline")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--memory-mib", type=int, default=512, help="the Store's memory tier")
    ap.add_argument("--read-only", default="get_into", help="comma list of casfs-read variants: get_into, get")
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = a.device
    cuda = dev.startswith("cuda")
    conc = [int(c) for c in a.concurrency.split(",")]
    stores = [(int(m), c) for m, c in (x.split(":") for x in a.stores.split(","))]
    os.makedirs(a.dir, exist_ok=True)
    src = os.path.join(a.dir, "src")
    os.makedirs(src, exist_ok=True)
    plain = os.path.join(src, "model.safetensors")
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "device": dev,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                 "kernel": platform.release(),
                 "gpu": torch.cuda.get_device_name(0) if cuda else None},
        "warm": {}, "cold": {}, "build": {},
    }

    def save() -> None:
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)

    t0 = time.perf_counter()
    size = make_file(plain, a.size_gib, dev)
    res["file_bytes"] = size
    res["make_file_s"] = time.perf_counter() - t0
    print(f"file: {size / GiB:.2f} GiB in {res['make_file_s']:.1f}s", flush=True)
    store_dirs = {}
    for mib, comp in stores:
        label = f"{mib}M {comp}"
        store_dirs[label] = os.path.join(a.dir, f"store-{mib}m-{comp}")
        with casfs.open_store(store_dirs[label]) as s:
            b = casfs.build(s, src, tag="bench", chunk_size=mib << 20, progress=False, compress=comp)
        res["build"][label] = {"seconds": b.seconds, "gb_per_s": size / 1e9 / b.seconds,
                               "chunks": b.pack.chunks_total, "stored_bytes": b.pack.bytes_stored}
        print(f"build {label}: {b.seconds:.1f}s ({res['build'][label]['gb_per_s']:.2f} GB/s, "
              f"stored {b.pack.bytes_stored / GiB:.2f} GiB)", flush=True)
    save()

    def ours(store_dir: str, c: int) -> dict:
        with casfs.open_store(store_dir, memory_bytes=a.memory_mib << 20) as s:
            st = LoadStats()
            t = time.perf_counter()
            out = load_safetensors(s.open_image("bench"), "model.safetensors", device=dev,
                                   concurrency=c, streams=a.streams, stats=st)
            sync(dev)
            el = time.perf_counter() - t
        del out
        free(dev)
        return {"s": el, "tiers": st.tiers}

    def lf() -> dict:
        t = time.perf_counter()
        out = load_file(plain, device=dev)
        sync(dev)
        el = time.perf_counter() - t
        del out
        free(dev)
        return {"s": el}

    def lf_to() -> dict:
        t = time.perf_counter()
        out = {k: v.to(dev) for k, v in load_file(plain).items()}
        sync(dev)
        el = time.perf_counter() - t
        del out
        free(dev)
        return {"s": el}

    def ceiling() -> dict:
        t = time.perf_counter()
        out = pread_pinned(plain, dev)
        sync(dev)
        el = time.perf_counter() - t
        del out
        free(dev)
        return {"s": el}

    def readonly(store_dir: str, into: bool) -> dict:
        t = time.perf_counter()
        n = casfs_read(store_dir, "bench", "model.safetensors", conc[0], into)
        return {"s": time.perf_counter() - t, "bytes": n}

    headline = f"casfs {stores[0][0]}M {stores[0][1]} c={conc[0]}"
    methods: dict = {}
    cold: list[str] = []
    for label, sd in store_dirs.items():
        methods[f"casfs {label} c={conc[0]}"] = (lambda sd=sd: ours(sd, conc[0]))
        if label.endswith("auto") or label == next(iter(store_dirs)):
            cold.append(f"casfs {label} c={conc[0]}")
    methods["load_file(device)"] = lf
    cold.append("load_file(device)")
    if cuda:
        methods["load_file+.to(device)"] = lf_to
        methods["pread->pinned x8 (ceiling)"] = ceiling
        cold += ["load_file+.to(device)", "pread->pinned x8 (ceiling)"]
    for label, sd in store_dirs.items():
        for v in a.read_only.split(","):
            methods[f"casfs-read {v} {label} c={conc[0]}"] = (lambda sd=sd, v=v: readonly(sd, v == "get_into"))
        for c in conc[1:]:
            methods[f"casfs {label} c={c}"] = (lambda sd=sd, c=c: ours(sd, c))

    # correctness: every store loads bit for bit what load_file loads
    ref = load_file(plain, device=dev)
    res["bit_exact"] = {}
    for label, sd in store_dirs.items():
        with casfs.open_store(sd) as s:
            mine = load_safetensors(s.open_image("bench"), "model.safetensors", device=dev, concurrency=conc[0])
        res["bit_exact"][label] = set(mine) == set(ref) and all(
            torch.equal(mine[k].view(-1).view(torch.uint8), ref[k].view(-1).view(torch.uint8)) for k in ref)
        del mine
        free(dev)
    del ref
    free(dev)
    print(f"bit-exact vs load_file: {res['bit_exact']}", flush=True)
    for name, fn in methods.items():
        fn()  # warm the page cache and the allocators
        runs = [fn() for _ in range(a.repeats)]
        secs = [r["s"] for r in runs]
        med = statistics.median(secs)
        res["warm"][name] = {"runs_s": secs, "median_s": med, "gib_per_s": size / GiB / med,
                             "best_gib_per_s": size / GiB / min(secs), "detail": runs[-1]}
        print(f"warm {name:32s} {size / GiB / med:6.2f} GiB/s  (runs {', '.join(f'{x:.2f}' for x in secs)} s)", flush=True)
        save()
    if a.drop_caches:
        if not drop_caches():
            res["cold"] = {"skipped": "cannot write /proc/sys/vm/drop_caches (not root?)"}
        else:
            for name in cold:
                fn = methods[name]
                drop_caches()
                r = fn()
                res["cold"][name] = {"s": r["s"], "gib_per_s": size / GiB / r["s"]}
                print(f"cold {name:32s} {size / GiB / r['s']:6.2f} GiB/s  ({r['s']:.2f} s)", flush=True)
                save()
    base = res["warm"]["load_file(device)"]["gib_per_s"]
    res["speedup_vs_load_file_warm"] = {k: v["gib_per_s"] / base for k, v in res["warm"].items()
                                        if k.startswith("casfs ")}
    for k, x in res["speedup_vs_load_file_warm"].items():
        print(f"{k:40s} {x:5.2f}x load_file({dev}) warm{'  <- headline' if k == headline else ''}")
    if res["cold"] and "load_file(device)" in res["cold"]:
        cb = res["cold"]["load_file(device)"]["gib_per_s"]
        res["speedup_vs_load_file_cold"] = {k: v["gib_per_s"] / cb for k, v in res["cold"].items()
                                            if k.startswith("casfs ")}
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
