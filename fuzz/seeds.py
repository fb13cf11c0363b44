"""Seed inputs for the fuzz targets: real serialized indexes and real chunk frames.

Everything here is generated at run time (deterministically, from fixed random seeds) by the
same code that writes real images: ``casfs.index.serialize`` for synthetic trees and
``casfs.build`` of a small directory for one index made end to end. ``python fuzz/seeds.py``
writes the seed corpora into ``fuzz/corpus-index/`` and ``fuzz/corpus-chunk/`` (gitignored;
libFuzzer adds the inputs it finds there too).

Input formats of the targets (the first byte selects the mode):

- ``fuzz_index.py``: even first byte: the rest is raw index bytes for ``Index.parse``; odd:
  the rest drives structured mutations of one of ``sample_indexes()`` (see that target).
- ``fuzz_chunk.py``: even first byte: the rest is a raw frame for ``decode``; odd: the rest
  drives structured mutations of one of ``sample_frames()``.
- ``fuzz_oci.py``: even first byte: the rest is raw bytes for the three OCI parsers; odd: the
  rest drives edits of one of ``sample_oci()``'s JSON documents.
- ``fuzz_http.py``: even first byte: 8 bytes of object size, then a raw request head (and
  Content-Range value); odd: the rest builds a request head from pieces (``sample_http()``
  are real request heads).
- ``fuzz_export.py``: the first byte's low bit switches the parser's name check off (1) or
  leaves it on (0); the rest drives mutations of an index from ``export_store()``.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat as statmod
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from casfs import chunk as chunkmod  # noqa: E402
from casfs.index import ChunkRef, EntrySpec, serialize  # noqa: E402

DIR = statmod.S_IFDIR | 0o755
FILE = statmod.S_IFREG | 0o644
LINK = statmod.S_IFLNK | 0o777
CHR = statmod.S_IFCHR | 0o600
FIFO = statmod.S_IFIFO | 0o644


def _digest(tag: str) -> bytes:
    return hashlib.sha256(tag.encode()).digest()  # any 32 bytes: the parser never hashes them


def synthetic_index(n_dirs: int, files_per_dir: int, seed: int, chunk_size: int = 4096,
                    mixed_sizes: bool = False) -> bytes:
    """Serialize a synthetic tree: nested dirs, files of 0-3 chunks (some packed), symlinks,
    xattrs, a hard-link group, a device node and a fifo. With ``mixed_sizes`` each file gets
    its own chunk size (``chunk_size`` times 1, 2 or 16)."""
    rng = random.Random(seed)
    default_cs = chunk_size
    entries = [EntrySpec("", DIR, mtime_ns=1)]
    chunks: list[ChunkRef] = []
    packs = [_digest(f"pack{seed}.{k}") for k in range(3)]
    dirs = [""]
    for d in range(n_dirs):
        parent = rng.choice(dirs)
        path = f"{parent}/d{d}" if parent else f"d{d}"
        dirs.append(path)
        entries.append(EntrySpec(path, DIR, uid=d, gid=d, mtime_ns=d * 1000))
    for d in dirs:
        for f in range(files_per_dir):
            path = f"{d}/f{f}.py" if d else f"f{f}.py"
            kind = rng.random()
            if kind < 0.15:
                entries.append(EntrySpec(path, LINK, symlink=f"../target/{f}".encode()))
                continue
            chunk_size = default_cs * rng.choice((1, 2, 16)) if mixed_sizes else default_cs
            nchunks = rng.choice((0, 1, 1, 2, 3))
            size = 0 if nchunks == 0 else (nchunks - 1) * chunk_size + rng.randint(1, chunk_size)
            ids = []
            for j in range(nchunks):
                raw = chunk_size if j < nchunks - 1 else size - (nchunks - 1) * chunk_size
                same = [k for k, c in enumerate(chunks) if c.raw_len <= chunk_size]
                if same and rng.random() < 0.2:  # a shared (deduplicated) chunk
                    ids.append(rng.choice(same))
                    continue
                pack = rng.choice(packs) if rng.random() < 0.6 else None
                chunks.append(ChunkRef(_digest(f"{seed}/{path}/{j}"), raw, raw + 48, pack,
                                       rng.randrange(1 << 20) if pack else 0))
                ids.append(len(chunks) - 1)
            # keep the file size consistent with the chunk list even when a shared chunk was reused
            size = 0 if not ids else (len(ids) - 1) * chunk_size + chunks[ids[-1]].raw_len
            xattrs = {b"user.k": f"v{f}".encode()} if rng.random() < 0.1 else {}
            entries.append(EntrySpec(path, FILE, size=size, chunks=ids, xattrs=xattrs,
                                     mtime_ns=rng.randrange(1 << 62), chunk_size=chunk_size))
    entries.append(EntrySpec("hard1", FILE, link_group="g"))
    entries.append(EntrySpec("hard2", FILE, link_group="g"))
    entries.append(EntrySpec("null", CHR, rdev=0x103))
    entries.append(EntrySpec("fifo", FIFO, xattrs={b"security.selinux": b"x" * 40, b"user.a": b""}))
    return serialize(entries, chunks, default_cs)


def version1_index() -> bytes:
    """The index of ``tests/data/store-index-v1``: written by casfs before per-file chunk sizes
    (format version 1), which the parser still reads."""
    d = os.path.join(ROOT, "tests", "data", "store-index-v1", "indexes")
    for sub, _, names in os.walk(d):
        for name in names:
            with open(os.path.join(sub, name), "rb") as f:
                return chunkmod.decode(f.read())
    raise FileNotFoundError(f"no index under {d}")


def one_pack_per_chunk_index() -> bytes:
    """Every chunk in its own pack (packs == chunks, a boundary of the pack-number check)."""
    entries = [EntrySpec("", DIR), EntrySpec("lib", DIR)]
    chunks = []
    for k in range(3):
        chunks.append(ChunkRef(_digest(f"solo{k}"), 100 + k, 148 + k, _digest(f"solopack{k}"), 0))
        entries.append(EntrySpec(f"lib/m{k}.so", FILE, size=100 + k, chunks=[k]))
    return serialize(entries, chunks, 4096)


def built_index() -> bytes:
    """An index made end to end: ``casfs.build`` of a small real directory into a temp store."""
    import casfs

    with tempfile.TemporaryDirectory(prefix="casfs-fuzz-seed-") as tmp:
        src = os.path.join(tmp, "src")
        os.makedirs(os.path.join(src, "pkg", "sub"))
        rng = random.Random(7)
        for name, n in (("pkg/a.py", 10), ("pkg/sub/b.bin", 9000), ("pkg/sub/c.txt", 5000), ("empty", 0)):
            with open(os.path.join(src, name), "wb") as f:
                f.write(bytes(rng.randrange(4) for _ in range(n)))
        os.symlink("pkg/a.py", os.path.join(src, "link"))
        os.link(os.path.join(src, "pkg/a.py"), os.path.join(src, "pkg/hard.py"))
        with casfs.open_store(os.path.join(tmp, "store"), memory_bytes=0) as store:
            res = casfs.build(store, src, progress=False)  # the default per-file policy
            return chunkmod.decode(store.index_frame(res.image_id))


def export_store(path: str):
    """A real local store at ``path`` holding images built from small real trees (files of
    several sizes, nested dirs, symlinks, a hard link, a fifo, an xattr), so an export of a
    mutated index can write real contents. Returns (store, [serialized index bytes]); the
    store stays open (the export target keeps it for its whole run)."""
    import casfs

    store = casfs.open_store(path, memory_bytes=8 << 20)
    bases = []
    rng = random.Random(13)
    for k in range(2):
        with tempfile.TemporaryDirectory(prefix="casfs-fuzz-export-src-") as src:
            os.makedirs(os.path.join(src, "a", "b"))
            os.makedirs(os.path.join(src, "c"))
            for name, n in (("a/x.py", 10), ("a/b/y.bin", 5000 * (k + 1)), ("c/z", 3), ("top", 0),
                            ("a/b/zz", 1)):
                with open(os.path.join(src, name), "wb") as f:
                    f.write(bytes(rng.randrange(256) for _ in range(n)))
            os.symlink("../c/z", os.path.join(src, "a", "link"))
            os.symlink("/etc/hostname", os.path.join(src, "abs"))
            os.link(os.path.join(src, "a/x.py"), os.path.join(src, "c", "hard"))
            os.mkfifo(os.path.join(src, "c", "fifo"))
            try:
                os.setxattr(os.path.join(src, "top"), "user.k", b"v")
            except OSError:
                pass
            res = casfs.build(store, src, chunk_size=4096, progress=False)
            bases.append(chunkmod.decode(store.index_frame(res.image_id)))
    return store, bases


def sample_indexes() -> list[bytes]:
    """Valid serialized indexes of a few shapes (the bases of the structured index mutator)."""
    return [
        synthetic_index(0, 0, 1),
        synthetic_index(1, 2, 2),
        synthetic_index(4, 3, 3),
        synthetic_index(12, 6, 4, chunk_size=8192),
        synthetic_index(40, 8, 5),
        synthetic_index(6, 5, 6, mixed_sizes=True),
        one_pack_per_chunk_index(),
        built_index(),
        version1_index(),
    ]


def sample_frames() -> list[bytes]:
    """Valid chunk frames: empty, raw, zstd, incompressible, and an index frame."""
    rng = random.Random(11)
    datas = [b"", b"a", b"hello world " * 8, bytes(rng.randrange(256) for _ in range(300)),
             b"\x00" * 5000, bytes(rng.randrange(3) for _ in range(20000)), synthetic_index(2, 2, 9)]
    frames = [chunkmod.encode(d)[1] for d in datas]
    frames.append(chunkmod.encode(b"uncompressed " * 20, compress=False)[1])
    # blocked frames (version 2): zstd blocks (one stored raw), and a raw one
    mixed = bytes(rng.randrange(4) for _ in range(20000)) + rng.randbytes(16384) + b"z" * 9000
    frames.append(chunkmod.encode(mixed, block=16384)[1])
    frames.append(chunkmod.encode(rng.randbytes(40000), block=16384)[1])
    return frames


def sample_pagemaps() -> list[bytes]:
    """Valid CRIU pagemap images: empty, one entry, lazy and eager runs (snapshot.criuimg)."""
    from snapshot.criuimg import PE_LAZY, PE_PRESENT, Pagemap, PagemapEntry, encode_pagemap

    base = 0x7F0000000000
    return [encode_pagemap(Pagemap(1)),
            encode_pagemap(Pagemap(2, [PagemapEntry(0x400000, 3, PE_PRESENT)])),
            encode_pagemap(Pagemap(7, [PagemapEntry(base, 1, PE_PRESENT | PE_LAZY),
                                       PagemapEntry(base + 0x2000, 300, PE_LAZY),
                                       PagemapEntry(base + 0x200000, 1 << 20, PE_PRESENT)]))]


def sample_oci() -> list[bytes]:
    """Valid documents the OCI store and the snapshotter parse, each behind a 0x00 mode byte: a
    catalog manifest, a casfs tag's image index, a reference layer's /.casfs-ref.json."""
    import json

    d = "sha256:" + "ab" * 32
    catalog = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": d, "size": 2},
               "layers": [{"mediaType": "application/vnd.casfs.object.v1", "digest": d, "size": 10 + k,
                           "annotations": {"org.casfs.key": f"{kind}/{k:064x}"}}
                          for k, kind in enumerate(("indexes", "packs", "chunks", "profiles"))]}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d,
                            "size": 500, "platform": {"os": "unknown", "architecture": "unknown"},
                            "annotations": {"org.casfs.manifest": "catalog"}}],
             "annotations": {"org.casfs.tag": "web", "org.casfs.tag-data": "YWJjCg=="}}
    ref = {"casfs": 1, "image": "cd" * 32, "store": "oci://127.0.0.1:5000/casfs/images"}
    return [b"\x00" + json.dumps(x).encode() for x in (catalog, index, ref)]


def sample_http() -> list[bytes]:
    """Request heads a casfs client sends a cache server, behind a 0x00 mode byte and an
    8-byte object size (1 MiB), and a Content-Range value."""
    size = (1 << 20).to_bytes(8, "little")
    path = "/packs/ab/" + "ab" * 32
    heads = [f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8470\r\nRange: bytes=100-4195\r\n"
             "User-Agent: casfs-azcache\r\nAuthorization: Bearer t",
             f"HEAD {path} HTTP/1.1\r\nHost: x\r\nCache-Control: only-if-cached",
             f"GET {path} HTTP/1.0\r\nRange: bytes=-500\r\nConnection: keep-alive",
             "bytes 0-99/1048576"]
    return [b"\x00" + size + h.encode() for h in heads]


def write_corpora(base: str = os.path.join(ROOT, "fuzz")) -> None:
    """Write the seed corpora (idempotent: files are named by content)."""
    seeds = {
        "corpus-index": [b"\x00" + d for d in sample_indexes()]
        + [b"\x01" + bytes([k, 3, 0, 1, 200, 7, 7, 7, 9, 0xFF, 0x10, 5]) for k in range(6)],
        "corpus-export": [bytes([k]) + bytes([k * 7 % 256, 3, k, 1, 200, 7, k, 9, 0xFF, 0x10, 5]) for k in range(12)],
        "corpus-chunk": [b"\x00" + f for f in sample_frames()]
        + [b"\x01" + bytes([k, 2, 9, 200, 1, 0, 0x40]) for k in range(8)],
        "corpus-criuimg": [b"\x00" + p for p in sample_pagemaps()]
        + [b"\x01" + bytes([k, 5, 3, 1, 0, 9, 200, 7]) for k in range(6)],
        "corpus-oci": sample_oci() + [b"\x01" + bytes([k, 1, 1, 0, 5, 9, k, 3]) for k in range(8)],
        "corpus-http": sample_http() + [b"\x01" + bytes([k, 2, 1, 3, 0, 7, k, 5, 2, 2]) for k in range(8)],
    }
    for sub, items in seeds.items():
        d = os.path.join(base, sub)
        os.makedirs(d, exist_ok=True)
        for item in items:
            p = os.path.join(d, "seed-" + hashlib.sha1(item).hexdigest())
            if not os.path.exists(p):
                with open(p, "wb") as f:
                    f.write(item)


if __name__ == "__main__":
    write_corpora()
    print("fuzz seeds written to fuzz/corpus-index, fuzz/corpus-chunk, fuzz/corpus-export, fuzz/corpus-criuimg, "
          "fuzz/corpus-oci and fuzz/corpus-http")
