"""CPU benchmark: TieredStore.get_into against get on a raw file from the page cache.

A file of random bytes (``--size-gib``, stored raw by any compress policy) is built into one
local store per chunk size; then every chunk of it is read by N threads, warm (one unmeasured
pass first, then the median of ``--repeats``):

  get mem=512M   TieredStore.get, the default 512 MiB memory tier (fills and churns it)
  get mem=0      TieredStore.get without a memory tier (frame read + decode's payload copy)
  get_into       TieredStore.get_into a per-thread bytearray (preadv into it, blake3 there;
                 blake3 with one thread each when N > 1)

``get`` is the read path before get_into existed (its code is unchanged). GiB/s of chunk bytes.

Usage: python benchmarks/gpu/read_into_cpu.py --size-gib 1 --threads 1,2,8 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import casfs  # noqa: E402

GiB = 1 << 30


def make_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n


def read_all(store_dir: str, memory: int, threads: int, into: bool) -> tuple[float, int]:
    with casfs.open_store(store_dir, memory_bytes=memory) as s:
        im = s.open_image("bench")
        refs = im.chunk_refs(im.lookup("model.bin"))
        pm = im.index.pack_members
        local = threading.local()
        biggest = max(r.raw_len for r in refs)
        ht = 1 if threads > 1 else 0

        def one(r) -> int:
            if not into:
                return len(s.chunks.get(r, pm))
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = bytearray(biggest)
            return s.chunks.get_into(r, buf, pm, hash_threads=ht)

        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            n = sum(ex.map(one, refs))
        return time.perf_counter() - t, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--chunk-mib", default="4,16")
    ap.add_argument("--threads", default="1,2,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/casfs-read-into")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    src = os.path.join(a.dir, "src")
    os.makedirs(src, exist_ok=True)
    plain = os.path.join(src, "model.bin")
    size = int(a.size_gib * GiB)
    if not os.path.exists(plain) or os.path.getsize(plain) != size:
        make_file(plain, size)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv,
                 "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "kernel": platform.release()}, "file_bytes": size, "results": {}}
    for mib in (int(x) for x in a.chunk_mib.split(",")):
        sd = os.path.join(a.dir, f"store-{mib}m")
        if not os.path.isdir(sd):
            with casfs.open_store(sd) as s:
                casfs.build(s, src, tag="bench", chunk_size=mib << 20, progress=False)
        for th in (int(x) for x in a.threads.split(",")):
            for label, mem, into in (("get mem=512M", 512 << 20, False), ("get mem=0", 0, False),
                                     ("get_into", 512 << 20, True)):
                read_all(sd, mem, th, into)  # warm
                secs = []
                for _ in range(a.repeats):
                    el, n = read_all(sd, mem, th, into)
                    assert n == size
                    secs.append(el)
                med = statistics.median(secs)
                key = f"{mib}M {label} x{th}"
                res["results"][key] = {"runs_s": secs, "gib_per_s": size / GiB / med}
                print(f"{key:28s} {size / GiB / med:6.2f} GiB/s  (runs {', '.join(f'{x:.2f}' for x in secs)} s)",
                      flush=True)
                if a.out:
                    with open(a.out, "w") as f:
                        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
