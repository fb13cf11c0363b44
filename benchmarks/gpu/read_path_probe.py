"""Where the casfs chunk read path spends its time (a diagnostic for the weights loader).

Builds the benchmark's bf16 safetensors file into a local store (4 MiB chunks, zstd where it
saves >= 10%) plus an incompressible file (raw frames), then runs each stage of a chunk read
over every chunk with 1 and N threads and prints GiB/s of decoded bytes:

  read            BlobTier.get: the frame bytes from the store's files (page cache)
  read+zstd       ... + zstd decompression into a new bytes object
  read+b3x1/x2    ... + blake3 of the frame with max_threads 1 / 2
  read+decode     ... + casfs.chunk.decode (decompress + verify: what the tiers do)
  store.get       TieredStore.get through a fresh Store (memory tier 512 MiB / 0)
  ours->cuda      snapshot.weights.load_safetensors(..., device="cuda")
  into-pinned     a prototype: read the frame, decompress straight into a pinned slot
                  (zstd stream_reader.readinto), blake3 the slot in place, async H2D copy:
                  no per-chunk allocations and no extra copy

It uses casfs internals (casfs.chunk, store.blob) on purpose: it measures them.

Usage: python benchmarks/gpu/read_path_probe.py --dir /tmp/probe --out probe.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import blake3
import torch
import zstandard

import casfs
from casfs import chunk as cm
from snapshot.weights import load_safetensors

GiB = 1 << 30
_tl = threading.local()


def dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_tl, "d", None)
    if d is None:
        d = _tl.d = zstandard.ZstdDecompressor()
    return d


def timed(fn, refs, threads: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        n = sum(ex.map(fn, refs))
    return n / GiB / (time.perf_counter() - t)


def stages(store_dir: str, tag: str, rel: str, threads: int, dev: str) -> dict:
    out = {}
    with casfs.open_store(store_dir, memory_bytes=0) as s:
        im = s.open_image(tag)
        refs = im.chunk_refs(im.lookup(rel))
        blob = s.blob

        def read(r):
            return len(blob.get(r)) - 48

        def read_zstd(r):
            f = blob.get(r)
            h = cm.parse_header(f)
            if h.codec == cm.CODEC_ZSTD:
                return len(dctx().decompress(memoryview(f)[48:], max_output_size=h.raw_len))
            return len(bytes(memoryview(f)[48:]))

        def read_b3(mt):
            def f_(r):
                f = blob.get(r)
                blake3.blake3(f, max_threads=mt).digest()
                return r.raw_len
            return f_

        def read_decode(r):
            return len(cm.decode(blob.get(r), r.digest))

        subset = refs[:64]
        for name, fn in [("read", read), ("read+zstd", read_zstd), ("read+b3x1", read_b3(1)),
                         ("read+b3x2", read_b3(2)), ("read+decode", read_decode)]:
            out[name] = {"1": timed(fn, subset, 1), str(threads): timed(fn, refs, threads)}
        cuda = dev.startswith("cuda")
        if cuda:
            out["into-pinned"] = {str(threads): into_pinned(blob, refs, threads, dev)}
            if all(r.pack is None for r in refs):
                out["direct-pinned"] = {str(threads): direct_pinned(blob, refs, threads, dev)}
    for mem in (512, 0):
        with casfs.open_store(store_dir, memory_bytes=mem << 20) as s:
            im = s.open_image(tag)
            refs = im.chunk_refs(im.lookup(rel))
            out[f"store.get mem={mem}M"] = {str(threads): timed(lambda r: len(s.chunks.get(r, im.index.pack_members)), refs, threads)}
    if cuda:
        with casfs.open_store(store_dir) as s:
            im = s.open_image(tag)
            size = im.stat(rel).size
            t = time.perf_counter()
            x = load_safetensors(im, rel, device=dev, concurrency=threads)
            torch.cuda.synchronize()
            out["ours->cuda"] = {str(threads): size / GiB / (time.perf_counter() - t)}
            del x
            torch.cuda.empty_cache()
        from safetensors.torch import load_file

        plain = os.path.join(os.path.dirname(store_dir), f"src-{'random' if tag_is_raw(store_dir) else 'bf16'}",
                             "model.safetensors")
        for _ in range(2):  # the page cache holds the plain file too
            with open(plain, "rb") as f:
                while f.read(64 << 20):
                    pass
        best = 0.0
        for _ in range(2):
            t = time.perf_counter()
            x = load_file(plain, device=dev)
            torch.cuda.synchronize()
            best = max(best, size / GiB / (time.perf_counter() - t))
            del x
            torch.cuda.empty_cache()
        out["load_file(cuda) best of 2"] = {"1": best}
    return out


def tag_is_raw(store_dir: str) -> bool:
    return store_dir.endswith("store-raw")  # the random-int32 file


def into_pinned(blob, refs, threads: int, dev: str) -> float:
    total = sum(r.raw_len for r in refs)
    cs = max(r.raw_len for r in refs)
    dst = torch.empty(total, dtype=torch.uint8, device=dev)
    offs, acc = [], 0
    for r in refs:
        offs.append(acc)
        acc += r.raw_len
    todo = list(range(len(refs)))
    lock = threading.Lock()
    bad = []

    def work(_):
        st = torch.cuda.Stream(dev)
        slots = [(torch.empty(cs, dtype=torch.uint8, pin_memory=True), torch.cuda.Event()) for _ in range(2)]
        k = 0
        while True:
            with lock:
                if not todo:
                    break
                i = todo.pop(0)
            r = refs[i]
            f = blob.get(r)
            h = cm.parse_header(f)
            buf, ev = slots[k % 2]
            k += 1
            ev.synchronize()
            mv = memoryview((ctypes.c_char * h.raw_len).from_address(buf.data_ptr())).cast("B")
            if h.codec == cm.CODEC_ZSTD:
                rd = dctx().stream_reader(memoryview(f)[48:])
                got = 0
                while got < h.raw_len:
                    n = rd.readinto(mv[got:])
                    if not n:
                        break
                    got += n
            else:
                mv[:] = memoryview(f)[48:]
            if blake3.blake3(mv, max_threads=1).digest() != r.digest:
                bad.append(i)
            with torch.cuda.stream(st):
                dst[offs[i]:offs[i] + h.raw_len].copy_(buf[:h.raw_len], non_blocking=True)
                ev.record(st)
        st.synchronize()

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, range(threads)))
    torch.cuda.synchronize()
    el = time.perf_counter() - t
    assert not bad, f"{len(bad)} chunks failed verification"
    return total / GiB / el


def direct_pinned(blob, refs, threads: int, dev: str) -> float:
    """Prototype of a zero-copy raw path: pread the payload of a raw frame straight into a
    pinned slot (no GIL held), blake3 it there (max_threads=1), async H2D. zstd frames are
    decompressed one-shot and moved in with memmove (no GIL)."""
    from casfs.layout import chunk_key

    total = sum(r.raw_len for r in refs)
    cs = max(r.raw_len for r in refs)
    dst = torch.empty(total, dtype=torch.uint8, device=dev)
    offs, acc = [], 0
    for r in refs:
        offs.append(acc)
        acc += r.raw_len
    todo = list(range(len(refs)))
    lock = threading.Lock()
    bad = []

    def work(_):
        st = torch.cuda.Stream(dev)
        slots = [(torch.empty(cs, dtype=torch.uint8, pin_memory=True), torch.cuda.Event()) for _ in range(2)]
        k = 0
        while True:
            with lock:
                if not todo:
                    break
                i = todo.pop(0)
            r = refs[i]
            buf, ev = slots[k % 2]
            k += 1
            ev.synchronize()
            mv = memoryview((ctypes.c_char * r.raw_len).from_address(buf.data_ptr())).cast("B")
            fd = os.open(blob.objects.local_path(chunk_key(r.digest)), os.O_RDONLY)
            try:
                h = cm.parse_header(os.pread(fd, cm.HEADER_SIZE, 0))
                if h.codec == cm.CODEC_RAW:
                    got = os.preadv(fd, [mv], cm.HEADER_SIZE)
                    assert got == r.raw_len
                else:
                    pay = os.pread(fd, h.payload_len, cm.HEADER_SIZE)
                    data = dctx().decompress(pay, max_output_size=h.raw_len)
                    ctypes.memmove(buf.data_ptr(), data, len(data))
            finally:
                os.close(fd)
            if blake3.blake3(mv, max_threads=1).digest() != r.digest:
                bad.append(i)
            with torch.cuda.stream(st):
                dst[offs[i]:offs[i] + r.raw_len].copy_(buf[:r.raw_len], non_blocking=True)
                ev.record(st)
        st.synchronize()

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, range(threads)))
    torch.cuda.synchronize()
    el = time.perf_counter() - t
    assert not bad, f"{len(bad)} chunks failed verification"
    return total / GiB / el


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/casfs-probe")
    ap.add_argument("--size-gib", type=float, default=6)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reuse", action="store_true", help="the files and stores exist already")
    ap.add_argument("--images", default="bf16,bf16c16,raw",
                    help="of bf16, bf16c16 (16 MiB chunks), raw (random int32), bf16raw, bf16raw16 "
                         "(the bf16 file stored uncompressed, 4 / 16 MiB chunks)")
    a = ap.parse_args()
    dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    from benchmarks.bench_weights import make_file

    res = {"env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC")}, "images": {}}
    known = {"bf16": ("bf16", 4), "bf16c16": ("bf16", 16), "raw": ("random", 4),
             "bf16raw": ("bf16", 4), "bf16raw16": ("bf16", 16)}
    for tag in a.images.split(","):
        kind, chunk_mib = known[tag]
        # an uncompressed build: what a "store weights raw" build option would produce
        cm.MIN_SAVING = 1.0 if "raw" in tag and kind == "bf16" else 0.10
        src = os.path.join(a.dir, f"src-{kind}")
        sd = os.path.join(a.dir, f"store-{tag}")
        if not a.reuse:
            os.makedirs(src, exist_ok=True)
            p = os.path.join(src, "model.safetensors")
            if not os.path.exists(p):
                if kind == "bf16":
                    make_file(p, a.size_gib, dev)
                else:
                    n = int(a.size_gib / 3 * GiB) // 4
                    from safetensors.torch import save_file
                    save_file({"x": torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32)}, p)
            with casfs.open_store(sd) as s:
                b = casfs.build(s, src, tag="t", chunk_size=chunk_mib << 20, progress=False)
            res["images"][tag] = {"stored": b.pack.bytes_stored, "raw": b.pack.bytes_in}
        r = stages(sd, "t", "model.safetensors", a.threads, dev)
        res[tag] = r
        for k, v in r.items():
            print(f"{tag:8s} {k:20s} " + "  ".join(f"{t}thr {g:6.2f} GiB/s" for t, g in v.items()), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
