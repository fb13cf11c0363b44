"""Benchmark: loading an image index (what a mount blocks on), against json.loads of the same tree.

A synthetic but realistic tree of ``--entries`` entries (default 50,000: nested package
directories, ``__pycache__`` dirs, files of 1-3 chunks with small files packed and large ones
loose, a few empty files, symlinks and xattrs) is serialized and stored in a local store. Then,
``--repeats`` times each (after one warm-up):

  load_index      ``Store.load_index`` on a new Store each run (nothing cached in-process; the
                  index object is in the page cache): fetch + decode the zstd frame + verify
                  its blake3 digest + ``Index.parse``. Goal: <= 50 ms for 50,000 entries.
  fetch/decode/parse  the three steps of load_index timed one by one
  Index.parse     parsing the serialized bytes alone
  json.loads      the baseline: the same tree (same fields, chunk table, hex digests) as JSON,
                  parsed from an in-memory string

and per-operation costs: ``Index.lookup`` of random existing paths (ns/op) against walking the
JSON tree's nested dicts, ``Index.walk`` of every entry, and ``serialize``.

Usage: python -m benchmarks.bench_index [--entries 50000] [--repeats 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat as statmod
import sys
import tempfile
import time

from benchmarks._common import (MiB, describe_machine, human_bytes, machine_info, ratio, repeat, table,
                     write_results)

import casfs
from casfs import chunk as chunkmod
from casfs.digest import from_hex
from casfs.index import ChunkRef, EntrySpec, Index, serialize

GOAL_MS = 50.0
CHUNK_SIZE = 4 * MiB
DIR = statmod.S_IFDIR | 0o755
FILE = statmod.S_IFREG | 0o644
LINK = statmod.S_IFLNK | 0o777
_SYLL = ["py", "to", "rch", "num", "ten", "sor", "core", "util", "io", "net", "data", "base", "lib",
         "nn", "func", "ops", "test", "http", "json", "cache", "grad", "mod", "conf", "log", "vis"]


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLL) for _ in range(rng.randint(1, 3))) + rng.choice(["", "", "_", "2"])


def make_tree(n_entries: int, seed: int = 0) -> tuple[list[EntrySpec], list[ChunkRef]]:
    """A site-packages-like tree of exactly ``n_entries`` entries and its chunk table.

    Shape (roughly what a Python environment with torch looks like): ~9% directories nested up
    to 8 deep, most with a ``__pycache__``; ~3% symlinks; files mostly small (one packed chunk),
    10% two chunks and 5% three (loose), 2% empty; 1% with an xattr.
    """
    rng = random.Random(seed)
    entries = [EntrySpec("", DIR, mtime_ns=1_700_000_000 * 10**9)]
    chunks: list[ChunkRef] = []
    dirs: list[tuple[str, int]] = [("", 0)]
    used: set[str] = {""}
    pack = rng.randbytes(32)
    in_pack = 0
    pack_off = 0

    def unique(parent: str, name: str) -> str:
        path = f"{parent}/{name}" if parent else name
        k = 0
        while path in used:
            k += 1
            path = f"{parent}/{name}{k}" if parent else f"{name}{k}"
        used.add(path)
        return path

    while len(entries) < n_entries:
        r = rng.random()
        if r < 0.1:  # a new directory under any directory not yet 8 deep
            parent, depth = rng.choice(dirs)
            if depth >= 8 or parent.endswith("__pycache__"):
                continue
            path = unique(parent, _name(rng))
            entries.append(EntrySpec(path, DIR, mtime_ns=1_700_000_000 * 10**9 + len(entries)))
            dirs.append((path, depth + 1))
            if rng.random() < 0.9 and len(entries) < n_entries:
                cache = unique(path, "__pycache__")
                entries.append(EntrySpec(cache, DIR))
                dirs.append((cache, depth + 2))
            continue
        # files and links cluster in recently made directories (a package's modules)
        parent, depth = rng.choice(dirs[-30:]) if rng.random() < 0.7 else rng.choice(dirs)
        if r < 0.13:
            target = f"../{_name(rng)}/{_name(rng)}.so.{rng.randint(1, 12)}".encode()
            entries.append(EntrySpec(unique(parent, _name(rng) + ".so"), LINK, symlink=target))
            continue
        ext = ".cpython-311.pyc" if parent.endswith("__pycache__") else rng.choice(
            [".py", ".py", ".py", ".pyi", ".so", ".json", ".txt", ""])
        path = unique(parent, _name(rng) + ext)
        q = rng.random()
        nch = 0 if q < 0.02 else (3 if q < 0.07 else (2 if q < 0.17 else 1))
        size = 0 if nch == 0 else (nch - 1) * CHUNK_SIZE + (
            int(rng.lognormvariate(7.8, 1.6)) % CHUNK_SIZE + 1 if nch == 1 else rng.randint(1, CHUNK_SIZE))
        ids = []
        for j in range(nch):
            raw = CHUNK_SIZE if j < nch - 1 else size - (nch - 1) * CHUNK_SIZE
            stored = 48 + (raw if ext == ".so" else raw // 3)
            if stored <= MiB:
                ref = ChunkRef(rng.randbytes(32), raw, stored, pack, pack_off)
                pack_off += stored
                in_pack += 1
                if pack_off >= 4 * MiB:
                    pack, pack_off = rng.randbytes(32), 0
            else:
                ref = ChunkRef(rng.randbytes(32), raw, stored)
            chunks.append(ref)
            ids.append(len(chunks) - 1)
        xattrs = {b"user.checksum": rng.randbytes(16).hex().encode()} if rng.random() < 0.01 else {}
        entries.append(EntrySpec(path, FILE | (0o111 if ext == ".so" else 0), size=size, chunks=ids,
                                 xattrs=xattrs, mtime_ns=1_700_000_000 * 10**9 + rng.randrange(10**15)))
    return entries, chunks


def to_json_tree(entries: list[EntrySpec], chunks: list[ChunkRef]) -> dict:
    """The same information as a JSON document: nested dicts by name plus a chunk table."""
    pack_ids: dict[bytes, int] = {}
    table_ = []
    for c in chunks:
        p = -1 if c.pack is None else pack_ids.setdefault(c.pack, len(pack_ids))
        table_.append([c.digest.hex(), c.raw_len, c.stored_len, p, c.pack_off])
    nodes: dict[str, dict] = {}
    for e in entries:
        node = {"mode": e.mode, "uid": e.uid, "gid": e.gid, "mtime_ns": e.mtime_ns, "size": e.size}
        if statmod.S_ISDIR(e.mode):
            node["children"] = {}
        elif statmod.S_ISLNK(e.mode):
            node["target"] = (e.symlink or b"").decode()
        elif e.chunks:
            node["chunks"] = e.chunks
        if e.xattrs:
            node["xattrs"] = {k.decode(): v.decode() for k, v in e.xattrs.items()}
        nodes[e.path] = node
        if e.path:
            parent, _, name = e.path.rpartition("/")
            nodes[parent]["children"][name] = node
    return {"chunk_size": CHUNK_SIZE, "packs": [p.hex() for p in pack_ids], "chunks": table_, "root": nodes[""]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--entries", type=int, default=50_000, help="entries in the index (default 50000)")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs of each load (default 20)")
    ap.add_argument("--lookups", type=int, default=20_000, help="random path lookups timed (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the store goes (default: a temp dir, removed)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/index.json)")
    args = ap.parse_args()

    started = time.time()
    machine = machine_info()
    print(f"machine: {describe_machine(machine)}")
    work = args.workdir or tempfile.mkdtemp(prefix="casfs-bench-index-")
    os.makedirs(work, exist_ok=True)
    try:
        entries, chunks = make_tree(args.entries, args.seed)
        t0 = time.perf_counter()
        data = serialize(entries, chunks, CHUNK_SIZE)
        t_serialize = time.perf_counter() - t0
        store_path = os.path.join(work, "store")
        with casfs.open_store(store_path, memory_bytes=0) as s:
            image_id = s.put_index(data)
            frame = s.index_frame(image_id)  # read once: in the page cache from here on
        doc = to_json_tree(entries, chunks)
        text = json.dumps(doc, separators=(",", ":"))
        n_files = sum(1 for e in entries if statmod.S_ISREG(e.mode))
        n_dirs = sum(1 for e in entries if statmod.S_ISDIR(e.mode))
        n_links = sum(1 for e in entries if statmod.S_ISLNK(e.mode))
        print(f"tree: {len(entries)} entries ({n_dirs} dirs, {n_files} files, {n_links} symlinks), "
              f"{len(chunks)} chunks; index {human_bytes(len(data))} (frame {human_bytes(len(frame))}), "
              f"JSON {human_bytes(len(text))}; serialize {t_serialize * 1e3:.1f} ms")

        stores = []

        def fresh_store():
            s = casfs.open_store(store_path, memory_bytes=0)
            stores.append(s)
            return s

        load = repeat(lambda s: s.load_index(image_id), args.repeats, setup=fresh_store)
        for s in stores:
            s.close()
        fetch = repeat(lambda s: s.index_frame(image_id), args.repeats, setup=fresh_store)
        for s in stores:
            s.close()
        expect = from_hex(image_id)
        decode = repeat(lambda: chunkmod.decode(frame, expect=expect), args.repeats)
        parse = repeat(lambda: Index.parse(data), args.repeats)
        jsonl = repeat(lambda: json.loads(text), args.repeats)

        ix = Index.parse(data)
        root = doc["root"]
        rng = random.Random(args.seed + 1)
        paths = [e.path for e in rng.choices(entries, k=args.lookups)]

        def lookups():
            for p in paths:
                ix.lookup(p)

        def json_lookups():
            for p in paths:
                node = root
                if p:
                    for part in p.split("/"):
                        node = node["children"][part]

        lk = repeat(lookups, 3)
        jlk = repeat(json_lookups, 3)
        walk = repeat(lambda: sum(1 for _ in ix.walk()), 3)
        assert all(ix.lookup(p) == ix.lookup(ix.path(ix.lookup(p))) for p in paths[:200])

        ms = 1e3
        rows = [
            {"what": "load_index (new Store)", **load.summary(ms), "vs json.loads": ratio(load.median, jsonl.median)},
            {"what": "  fetch (index_frame)", **fetch.summary(ms), "vs json.loads": ratio(fetch.median, jsonl.median)},
            {"what": "  decode+verify frame", **decode.summary(ms), "vs json.loads": ratio(decode.median, jsonl.median)},
            {"what": "  Index.parse", **parse.summary(ms), "vs json.loads": ratio(parse.median, jsonl.median)},
            {"what": "json.loads (baseline)", **jsonl.summary(ms), "vs json.loads": "1.00x"},
        ]
        print(f"\nindex load, {len(entries)} entries, {args.repeats} runs each (ms):")
        print(table(rows, ["what", "min", "median", "p90", "max", "vs json.loads"]))
        per_lookup = lk.median / len(paths) * 1e9
        per_jlookup = jlk.median / len(paths) * 1e9
        mean_depth = sum(p.count("/") + 1 for p in paths if p) / max(1, len(paths))
        ops = [
            {"what": "Index.lookup(path)", "ns/op": per_lookup, "vs baseline": ratio(per_lookup, per_jlookup)},
            {"what": "JSON nested-dict walk (baseline)", "ns/op": per_jlookup, "vs baseline": "1.00x"},
            {"what": "Index.walk, per entry", "ns/op": walk.median / len(entries) * 1e9, "vs baseline": ""},
        ]
        print(f"\nper operation ({len(paths)} random existing paths, mean depth {mean_depth:.1f}):")
        print(table(ops, ["what", "ns/op", "vs baseline"]))
        verdict = "meets" if load.median * 1e3 <= GOAL_MS else "MISSES"
        print(f"\nload_index median {load.median * 1e3:.1f} ms {verdict} the {GOAL_MS:.0f} ms goal "
              f"for {len(entries)} entries ({ratio(load.median, jsonl.median)} json.loads).")
        results = {
            "entries": len(entries), "dirs": n_dirs, "files": n_files, "symlinks": n_links,
            "chunks": len(chunks), "index_bytes": len(data), "frame_bytes": len(frame), "json_bytes": len(text),
            "serialize_ms": t_serialize * 1e3,
            "load_index_ms": load.summary(ms), "fetch_ms": fetch.summary(ms), "decode_verify_ms": decode.summary(ms),
            "parse_ms": parse.summary(ms), "json_loads_ms": jsonl.summary(ms),
            "load_vs_json": load.median / jsonl.median, "parse_vs_json": parse.median / jsonl.median,
            "lookup_ns": per_lookup, "json_lookup_ns": per_jlookup, "lookup_mean_depth": mean_depth,
            "walk_ns_per_entry": walk.median / len(entries) * 1e9,
            "goal_ms": GOAL_MS, "meets_goal": load.median * 1e3 <= GOAL_MS,
        }
        path = write_results("index", vars(args), results, started=started, out=args.out, machine=machine)
        print(f"results: {os.path.relpath(path)}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
