"""Fuzz target: ``casfs.index.Index.parse`` and every accessor of an index it accepts.

Contract under test: for any input bytes, ``Index.parse`` either returns an ``Index`` or raises
``CorruptIndex``; on an index it returned, every accessor (walk, path, name, stat, children,
lookup_child, lookup, readlink, xattrs, file_chunk_ids, file_chunks, chunk, pack_members)
either answers or raises ``CorruptIndex`` (``PathNotFound`` too for ``lookup``), in bounded
time: ``walk`` visits each entry at most once. ``file_chunk_size`` answers a power of two in
[4 KiB, the header's chunk size] or raises ``CorruptIndex``; a file whose chunk list it accepts
has ``ceil(size / file_chunk_size)`` chunks. Both format versions are fuzzed (version 1 has
no ``chunk_shift`` column; the seeds include a real version-1 index). Any other exception, a walk that visits more
entries than the index holds, or a hang (libFuzzer ``-timeout``) is a bug.

Two input modes (first byte): raw bytes straight into ``Index.parse``, or structured: a
``FuzzedDataProvider`` picks a *valid* serialized index (``seeds.sample_indexes()``) and applies
a few typed mutations (header counts, section lengths, single column elements set to
boundary values such as ``n``, ``n-1``, ``i``, ``0xFFFFFFFF``, heap bytes, truncation), so that
most inputs still parse and the fuzzer spends its time in the accessors' consistency checks.

Run: ``.venv/bin/python fuzz/fuzz_index.py fuzz/corpus-index -max_total_time=60``
(``scripts/fuzz.sh`` does this for every target, after writing the seeds).
"""

from __future__ import annotations

import itertools
import os
import stat as statmod
import struct
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

with atheris.instrument_imports(include=["casfs"]):  # before anything else imports casfs
    import casfs  # noqa: F401
    from casfs import index as indexmod
    from casfs.errors import CorruptIndex, PathNotFound

import seeds  # noqa: E402

Index = indexmod.Index
HEADER = indexmod._HEADER
SHIFT_VALUES = (0, 11, 12, 13, 16, 20, 24, 27, 28, 29, 255)  # boundaries of a file's chunk size
COUNT_KEYS = ("entries", "chunks", "packs", "file_chunks", "xattrs")  # header fields 2..6
MAX_SAMPLED = 48  # entries exercised per input (bounds the time per input)

BASES = seeds.sample_indexes()
BASE_SET = set(BASES)


class Parts:
    """A serialized index taken apart: header fields and one bytearray per section."""

    def __init__(self, data: bytes) -> None:
        _, version, chunk_size, *counts = HEADER.unpack_from(data, 0)
        self.fields = [version, chunk_size, *counts]  # version, chunk_size, then COUNT_KEYS
        self.layout = (indexmod._SECTIONS_V1, indexmod._LENGTHS_V1) if version == 1 else \
            (indexmod._SECTIONS, indexmod._LENGTHS)
        self.sections: list[bytearray] = []
        off = HEADER.size + self.layout[1].size
        for ln in self.layout[1].unpack_from(data, HEADER.size):
            self.sections.append(bytearray(data[off:off + ln]))
            off += ln

    def count(self, key: str) -> int:
        return self.fields[2 + COUNT_KEYS.index(key)]

    @property
    def names(self) -> tuple:
        return self.layout[0]

    def item_size(self, k: int) -> int:
        tc = self.names[k][1]
        return struct.calcsize(tc) if tc is not None else (32 if self.names[k][2] else 1)

    def serialize(self, length_delta: tuple[int, int] | None) -> bytes:
        lengths = [len(b) for b in self.sections]
        if length_delta is not None:
            k, d = length_delta
            lengths[k] = max(0, lengths[k] + d)
        return (HEADER.pack(indexmod.MAGIC, *self.fields) + self.layout[1].pack(*lengths)
                + b"".join(self.sections))


def _interesting(fdp: atheris.FuzzedDataProvider, i: int, n: int, bits: int) -> int:
    """A boundary value for an element of entry ``i`` in an index of ``n`` entries."""
    mask = (1 << bits) - 1
    choice = fdp.ConsumeIntInRange(0, 15)
    vals = (0, 1, i, i - 1, i + 1, n - 1, n, n + 1, mask, mask >> 1, (mask >> 1) + 1,
            statmod.S_IFDIR | 0o755, statmod.S_IFREG | 0o644, statmod.S_IFLNK | 0o777)
    if choice < len(vals):
        return vals[choice] & mask
    return fdp.ConsumeIntInRange(0, mask)


def _resize(p: Parts, fdp: atheris.FuzzedDataProvider) -> None:
    """Change one count and every section sized by it consistently (so parse gets past the
    length checks): shrink by truncation, grow by repeating existing elements or zeros."""
    key = COUNT_KEYS[fdp.ConsumeIntInRange(0, len(COUNT_KEYS) - 1)]
    old = p.count(key)
    others = [p.count(k) for k in COUNT_KEYS]
    choice = fdp.ConsumeIntInRange(0, 7)
    new = (0, 1, max(0, old - 1), old + 1, old * 2, others[choice % 5], others[(choice + 1) % 5],
           fdp.ConsumeIntInRange(0, 4 * old + 8))[choice]
    new = min(new, 4 * old + 64, 20_000)  # keep inputs small (old may be a fuzzed header value)
    p.fields[2 + COUNT_KEYS.index(key)] = new
    repeat = fdp.ConsumeBool()
    for k, (_, _, ck) in enumerate(p.names):
        if ck != key:
            continue
        size = p.item_size(k)
        sec = p.sections[k]
        if new <= old:
            del sec[new * size:]
        elif repeat and sec:
            while len(sec) < new * size:
                sec += sec[:new * size - len(sec)]
        else:
            sec += bytes((new - old) * size)


def _mutate(fdp: atheris.FuzzedDataProvider) -> bytes:
    p = Parts(BASES[fdp.ConsumeIntInRange(0, len(BASES) - 1)])
    n = p.count("entries")
    length_delta = None
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        op = fdp.ConsumeIntInRange(0, 9)
        if op == 0:  # a header field left inconsistent with the sections
            f = fdp.ConsumeIntInRange(0, len(p.fields) - 1)
            p.fields[f] = _interesting(fdp, 0, n, 32)
        elif op == 1:  # a count changed consistently
            _resize(p, fdp)
            n = p.count("entries")
        elif op in (2, 3, 4, 5):  # one element of a column (reaches the accessors' checks)
            cols = [k for k, sec in enumerate(p.sections) if p.names[k][1] is not None and sec]
            if not cols:
                continue
            k = cols[fdp.ConsumeIntInRange(0, len(cols) - 1)]
            tc = p.names[k][1]
            size = struct.calcsize(tc)
            i = fdp.ConsumeIntInRange(0, len(p.sections[k]) // size - 1)
            if p.names[k][0] == "chunk_shift" and fdp.ConsumeBool():
                val = SHIFT_VALUES[fdp.ConsumeIntInRange(0, len(SHIFT_VALUES) - 1)]
            else:
                val = _interesting(fdp, i, n, 8 * size)
            if tc == "q" and val >= 1 << 63:
                val -= 1 << 64
            struct.pack_into("<" + tc, p.sections[k], i * size, val)
        elif op == 6:  # copy one element over another in the same column (cycles, overlaps)
            k = fdp.ConsumeIntInRange(0, len(p.names) - 1)
            size = p.item_size(k)
            count = len(p.sections[k]) // size
            if count:
                a, b = fdp.ConsumeIntInRange(0, count - 1), fdp.ConsumeIntInRange(0, count - 1)
                sec = p.sections[k]
                sec[b * size:(b + 1) * size] = sec[a * size:(a + 1) * size]
        elif op == 7:  # a heap byte, or a heap grown/shrunk (names, links, xattrs)
            heaps = [k for k, (_, tc, ck) in enumerate(p.names) if tc is None]
            k = heaps[fdp.ConsumeIntInRange(0, len(heaps) - 1)]
            sec = p.sections[k]
            if sec and fdp.ConsumeBool():
                sec[fdp.ConsumeIntInRange(0, len(sec) - 1)] = fdp.ConsumeIntInRange(0, 255)
            elif p.names[k][2] is None:
                if fdp.ConsumeBool():
                    del sec[fdp.ConsumeIntInRange(0, len(sec)):]
                else:
                    sec += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        elif op == 8:  # one section length that no longer adds up
            length_delta = (fdp.ConsumeIntInRange(0, len(p.names) - 1), fdp.ConsumeIntInRange(-64, 64))
        else:  # raw damage after serialization: truncate or overwrite a few bytes
            data = bytearray(p.serialize(length_delta))
            if fdp.ConsumeBool():
                del data[fdp.ConsumeIntInRange(0, len(data)):]
            else:
                at = fdp.ConsumeIntInRange(0, len(data) - 1)
                patch = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
                data[at:at + len(patch)] = patch
            return bytes(data)
    return p.serialize(length_delta)


def _call(fn, *args, allowed=(CorruptIndex,)):
    """Call an accessor; allowed errors yield None, anything else propagates (a crash)."""
    try:
        return fn(*args)
    except allowed:
        return None


def exercise(ix: Index, picks: list[int], valid: bool) -> None:
    """Drive every accessor on a parsed index, bounded; raise AssertionError on a broken contract."""
    n = ix.n_entries
    # walk must terminate and visit each entry at most once (the index is a tree)
    seen: set[int] = set()
    try:
        for i in ix.walk():
            if not (0 <= i < n):
                raise AssertionError(f"walk yielded entry {i} outside [0, {n})")
            if i in seen:
                raise AssertionError(f"walk yielded entry {i} twice (the index is not a tree)")
            seen.add(i)
    except CorruptIndex:
        pass
    if valid and len(seen) != n:
        raise AssertionError(f"walk of a valid index visited {len(seen)} of {n} entries")
    sample = sorted(set(itertools.chain(range(min(n, 24)), range(max(0, n - 8), n),
                                        (p % n for p in picks))))[:MAX_SAMPLED]
    for i in sample:
        st = _call(ix.stat, i)
        _call(ix.name, i)
        path = _call(ix.path, i)
        if path is not None:
            j = _call(ix.lookup, path, allowed=(CorruptIndex, PathNotFound))
            if valid and j != i:
                raise AssertionError(f"lookup(path({i})) = {j} in a valid index")
            _call(ix.lookup, path + "/../x/./", allowed=(CorruptIndex, PathNotFound))
        _call(ix.xattrs, i)
        if st is None:
            continue
        if st.is_dir:
            kids = _call(ix.children, i)
            if kids is not None:
                if len(kids) > n:
                    raise AssertionError("children() returned more entries than the index holds")
                for name in (b"", b"f0.py", b"d1", b"\xff" * 300):
                    _call(ix.lookup_child, i, name)
                for c in itertools.islice(kids, 4):
                    nm = _call(ix.name, c)
                    if nm is not None:
                        _call(ix.lookup_child, i, nm)
        elif st.is_symlink:
            _call(ix.readlink, i)
        elif st.is_file:
            cs = _call(ix.file_chunk_size, i)
            if cs is not None and (cs & (cs - 1) or not 4096 <= cs <= ix.chunk_size):
                raise AssertionError(f"file_chunk_size({i}) = {cs}: not a power of two in [4096, {ix.chunk_size}]")
            ids = _call(ix.file_chunk_ids, i)
            if ids is not None and len(ids) != -(-st.size // cs):  # type: ignore[operator]
                raise AssertionError(f"file {i}: {len(ids)} chunks for {st.size} bytes of {cs}-byte chunks")
            refs = _call(ix.file_chunks, i) or []
            for j in range(min(len(refs), 4)):
                _call(ix.file_chunk, i, j)
            for ref in refs[:4]:
                if ref.pack is not None:
                    members = _call(ix.pack_members, ref.pack)
                    if members is not None and len(members) > ix.n_chunks:
                        raise AssertionError("pack_members returned more chunks than the index holds")
    for ref in itertools.islice(ix.all_chunks(), 64):
        if ref.pack is not None and len(ref.pack) != 32:
            raise AssertionError(f"chunk refers to a pack digest of {len(ref.pack)} bytes")
    _call(ix.pack_members, b"\x00" * 32)
    for path in ("", "/", "..", "d0/f0.py", "a/b/c/d", "hard1", "link"):
        _call(ix.lookup, path, allowed=(CorruptIndex, PathNotFound))


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1 == 0:
        body, picks = data[1:], [len(data), data[0]]
    else:
        fdp = atheris.FuzzedDataProvider(data[1:])
        body = _mutate(fdp)
        picks = [fdp.ConsumeIntInRange(0, 1 << 24) for _ in range(8)]
    try:
        ix = Index.parse(body)
    except CorruptIndex:
        return
    exercise(ix, picks, valid=body in BASE_SET)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
