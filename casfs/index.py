"""The image index: the metadata tree of an image, its binary format, and its (hostile-input) parser.

An index is a column store. Entries are laid out breadth-first so that every directory's
children are contiguous, sorted by name, and come after the directory itself; entry 0 is the
root. Each per-entry field is one little-endian array, so loading 50,000 entries is a handful of
``array.frombytes`` calls (C speed) instead of 50,000 record parses. Fields that need an entry's
neighbours to make sense (child ranges, chunk ranges, name offsets) are bound-checked when they
are used, so a hostile index can produce an error but never an out-of-range access, a loop, or a
crash.

Serialized layout (all integers little-endian)::

    header   magic b"CASFSIX1", u32 version, u32 chunk_size, then u32 counts:
             entries, chunks, packs, file_chunks, xattrs; then u64 byte length of each section
    sections in ``_SECTIONS`` order (columns, then heaps; version 1 lacks the last column)

The serialized bytes are stored as a zstd chunk frame; the image id is their blake3 digest.

Chunk sizes (format version 2): every regular file has its own chunk size, a power of two
recorded as its log2 in the one-byte column ``chunk_shift``; chunk ``j`` of a file covers bytes
``[j * size, (j + 1) * size)`` of that file, so a read still maps to a chunk without search.
The header's ``chunk_size`` is the largest chunk size of any file (the bound every chunk's
length is checked against). Version 1 indexes (one chunk size for the whole image, in the
header) still parse: each file then has the header's size. Why per file: weights want large
raw chunks (16 MiB chunks load ~2.5x faster than 4 MiB on the H200) while a page fault in a
mapped shared library should not pull megabytes (``casfs.build.policy`` picks the size).
"""

from __future__ import annotations

import array
import operator
import stat as statmod
import struct
import sys
from dataclasses import dataclass, field
from itertools import islice
from types import MappingProxyType
from typing import Iterator, Mapping, Sequence

from .digest import DIGEST_SIZE
from .errors import CorruptIndex, NotAFile, PathNotFound

MAGIC = b"CASFSIX1"
VERSION = 2
READ_VERSIONS = (1, 2)
NO_PACK = 0xFFFFFFFF
MAX_ENTRIES = 16_000_000
MAX_CHUNKS = 64_000_000
MAX_NAME = 255
MAX_CHUNK_SIZE = 256 << 20
MIN_CHUNK_SIZE = 4096
MIN_CHUNK_SHIFT = MIN_CHUNK_SIZE.bit_length() - 1  # 12
MAX_CHUNK_SHIFT = MAX_CHUNK_SIZE.bit_length() - 1  # 28

# (section name, array typecode or None for a byte heap, count key)
_SECTIONS: tuple[tuple[str, str | None, str | None], ...] = (
    ("mode", "I", "entries"),
    ("uid", "I", "entries"),
    ("gid", "I", "entries"),
    ("mtime_ns", "q", "entries"),
    ("size", "Q", "entries"),
    ("rdev", "Q", "entries"),
    ("parent", "I", "entries"),
    ("ino", "I", "entries"),
    ("nlink", "I", "entries"),
    ("name_end", "I", "entries"),  # names are consecutive in the names heap
    ("first", "I", "entries"),  # dir: first child; file: first slot in file_chunks; symlink: heap offset
    ("count", "I", "entries"),  # dir: number of children; file: number of chunks
    ("xattr_first", "I", "entries"),
    ("xattr_count", "I", "entries"),
    ("file_chunks", "I", "file_chunks"),
    ("chunk_raw_len", "I", "chunks"),
    ("chunk_stored_len", "I", "chunks"),
    ("chunk_pack", "I", "chunks"),
    ("chunk_pack_off", "Q", "chunks"),
    ("xattr_key_end", "I", "xattrs"),  # keys and values alternate in the xattr heap
    ("xattr_val_end", "I", "xattrs"),
    ("chunk_digests", None, "chunks"),  # 32 bytes each
    ("pack_digests", None, "packs"),  # 32 bytes each
    ("names", None, None),
    ("links", None, None),
    ("xattr_heap", None, None),
    ("chunk_shift", "B", "entries"),  # v2: file: log2 of its chunk size; other entries: 0
)
_SECTIONS_V1 = _SECTIONS[:-1]
_HEADER = struct.Struct("<8sII5I")
_LENGTHS = struct.Struct("<" + "Q" * len(_SECTIONS))
_LENGTHS_V1 = struct.Struct("<" + "Q" * len(_SECTIONS_V1))
_BIG_ENDIAN = sys.byteorder == "big"


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where one chunk lives: its digest and, when packed, the pack and offset of its frame."""

    digest: bytes
    raw_len: int
    stored_len: int
    pack: bytes | None = None
    pack_off: int = 0


@dataclass(frozen=True, slots=True)
class Stat:
    """Metadata of one index entry (times in nanoseconds since the epoch)."""

    ino: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    rdev: int
    nlink: int

    @property
    def is_dir(self) -> bool:
        return statmod.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return statmod.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return statmod.S_ISLNK(self.mode)


# ---------------------------------------------------------------------------------------------
# Building


NO_XATTRS: Mapping[bytes, bytes] = MappingProxyType({})  # shared by every entry without xattrs


@dataclass(slots=True)
class EntrySpec:
    """One path of an image as the builder describes it.

    ``path`` is relative, '/'-separated, normalised ('' is the root). ``link_group`` ties hard
    links together: entries with the same non-None key share an inode.
    """

    path: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    symlink: bytes | None = None
    xattrs: Mapping[bytes, bytes] = field(default_factory=lambda: NO_XATTRS)  # (shared: no dict each)
    chunks: Sequence[int] = ()  # indices into the chunk table
    link_group: object | None = None
    chunk_size: int = 0  # regular files: bytes per chunk (0: the image's default)


def serialize(
    entries: list[EntrySpec],
    chunks: list[ChunkRef],
    chunk_size: int,
) -> bytes:
    """Serialize a tree into index bytes.

    ``entries`` must contain the root ('') and a directory for every parent of every path.
    ``chunk_size`` is the default for files whose ``EntrySpec.chunk_size`` is 0; every chunk
    size must be a power of two in [``MIN_CHUNK_SIZE``, ``MAX_CHUNK_SIZE``].

    Raises:
        ValueError: on a missing parent, a duplicate path, a bad name or chunk size, or limits
            exceeded.
    """
    _check_chunk_size(chunk_size)
    # Memory: this holds a few references per entry (the path dict, one child list slot, the
    # order list) and one small int per directory; positions of files are implicit in the order.
    by_path: dict[str, EntrySpec] = {}
    kids: dict[str, list[EntrySpec]] = {}
    group_size: dict[object, int] = {}
    for e in entries:
        if e.path in by_path:
            raise ValueError(f"duplicate path in image: {e.path!r}")
        by_path[e.path] = e
        if e.path:
            parent, _, name = e.path.rpartition("/")
            if (not name or name in (".", "..") or "\0" in name
                    or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME):
                raise ValueError(f"bad file name in path {e.path!r}")
            kids.setdefault(parent, []).append(e)
        if e.link_group is not None and not statmod.S_ISDIR(e.mode):
            group_size[e.link_group] = group_size.get(e.link_group, 0) + 1
    if "" not in by_path or not statmod.S_ISDIR(by_path[""].mode):
        raise ValueError("an image needs a root directory entry ('')")
    for parent in kids:
        p = by_path.get(parent)
        if p is None or not statmod.S_ISDIR(p.mode):
            raise ValueError(f"parent {parent!r} is missing or not a directory")
    if len(by_path) > MAX_ENTRIES:
        raise ValueError(f"{len(by_path)} entries exceed the {MAX_ENTRIES} limit")
    del by_path

    def enc(s: str) -> bytes:
        return s.encode("utf-8", "surrogateescape")

    def base(e: EntrySpec) -> bytes:
        return enc(e.path.rpartition("/")[2])

    # breadth-first order, children sorted by encoded name
    root = next(e for e in entries if e.path == "")
    order: list[EntrySpec] = [root]
    dir_pos: dict[str, int] = {"": 0}  # directory path -> its entry number
    first_child: dict[str, int] = {}
    i = 0
    while i < len(order):
        d = order[i]
        if statmod.S_ISDIR(d.mode):
            ch = kids.get(d.path)
            first_child[d.path] = len(order)
            if ch:
                ch.sort(key=base)
                for c in ch:
                    if statmod.S_ISDIR(c.mode):
                        dir_pos[c.path] = len(order)
                    order.append(c)
        i += 1

    n = len(order)
    cols = {name: array.array(tc) for name, tc, _ in _SECTIONS if tc is not None}
    names = bytearray()
    links = bytearray()
    xheap = bytearray()
    groups: dict[object, int] = {}
    largest = chunk_size
    for idx, e in enumerate(order):
        p = e.path
        if e.link_group is not None and not statmod.S_ISDIR(e.mode):
            ino = groups.setdefault(e.link_group, len(groups) + n + 1)
            links_to_inode = group_size[e.link_group]
        else:
            ino = idx + 1
            links_to_inode = 1
        name = base(e) if p else b""
        names += name
        cols["name_end"].append(len(names))
        cols["mode"].append(e.mode)
        cols["uid"].append(e.uid)
        cols["gid"].append(e.gid)
        cols["mtime_ns"].append(e.mtime_ns)
        cols["rdev"].append(e.rdev)
        cols["parent"].append(dir_pos[p.rpartition("/")[0]] if p else 0)
        cols["ino"].append(ino)
        if not statmod.S_ISREG(e.mode):
            cols["chunk_shift"].append(0)
        if statmod.S_ISDIR(e.mode):
            ch = kids.get(p, ())
            sub = sum(1 for c in ch if statmod.S_ISDIR(c.mode))
            cols["nlink"].append(2 + sub)
            cols["first"].append(first_child[p])
            cols["count"].append(len(ch))
            cols["size"].append(0)
        elif statmod.S_ISREG(e.mode):
            cs = e.chunk_size or chunk_size
            if cs != chunk_size:
                _check_chunk_size(cs, p)
            largest = max(largest, cs)
            shift = cs.bit_length() - 1
            cols["chunk_shift"].append(shift)
            cols["nlink"].append(links_to_inode)
            cols["first"].append(len(cols["file_chunks"]))
            cols["count"].append(len(e.chunks))
            cols["file_chunks"].extend(e.chunks)
            cols["size"].append(e.size)
        elif statmod.S_ISLNK(e.mode):
            target = e.symlink or b""
            if b"\0" in target:
                raise ValueError(f"symlink {e.path!r} has a NUL byte in its target")
            cols["nlink"].append(1)
            cols["first"].append(len(links))
            cols["count"].append(0)
            cols["size"].append(len(target))
            links += target
        else:
            cols["nlink"].append(links_to_inode)
            cols["first"].append(0)
            cols["count"].append(0)
            cols["size"].append(0)
        cols["xattr_first"].append(len(cols["xattr_key_end"]))
        cols["xattr_count"].append(len(e.xattrs))
        for k in sorted(e.xattrs):
            xheap += k
            cols["xattr_key_end"].append(len(xheap))
            xheap += e.xattrs[k]
            cols["xattr_val_end"].append(len(xheap))

    pack_ids: dict[bytes, int] = {}
    digests = bytearray()
    for c in chunks:
        digests += c.digest
        cols["chunk_raw_len"].append(c.raw_len)
        cols["chunk_stored_len"].append(c.stored_len)
        if c.pack is None:
            cols["chunk_pack"].append(NO_PACK)
            cols["chunk_pack_off"].append(0)
        else:
            cols["chunk_pack"].append(pack_ids.setdefault(c.pack, len(pack_ids)))
            cols["chunk_pack_off"].append(c.pack_off)
    pack_digests = b"".join(sorted(pack_ids, key=pack_ids.__getitem__))
    for heap, what in ((names, "names"), (links, "symlink targets"), (xheap, "xattrs")):
        if len(heap) >= 1 << 32:
            raise ValueError(f"{what} of this image exceed 4 GiB")

    heaps = {"chunk_digests": digests, "pack_digests": pack_digests, "names": names, "links": links,
             "xattr_heap": xheap}
    header = _HEADER.pack(MAGIC, VERSION, largest, n, len(chunks), len(pack_ids),
                          len(cols["file_chunks"]), len(cols["xattr_key_end"]))
    lengths = [len(cols[name]) * cols[name].itemsize if tc is not None else len(heaps[name])
               for name, tc, _ in _SECTIONS]
    # one output buffer, each column appended and dropped in turn (no per-column copies and no
    # join of them: the index's bytes exist about twice at the peak, not four times)
    out = bytearray(header)
    out += _LENGTHS.pack(*lengths)
    for name, tc, _ in _SECTIONS:
        if tc is not None:
            col = cols.pop(name)
            if _BIG_ENDIAN:
                col.byteswap()
            out += col
            del col
        else:
            out += heaps.pop(name)
    return bytes(out)


def _check_chunk_size(cs: int, path: str | None = None) -> None:
    if cs & (cs - 1) or not (MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE):
        where = f" of {path!r}" if path is not None else ""
        raise ValueError(f"chunk size {cs}{where} is not a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")


# ---------------------------------------------------------------------------------------------
# Parsing


_NAME_BLOCK = 1 << 16  # entries whose names are checked at once (bounds the check's memory)


def check_names(names: bytes, ends: "array.array[int]", parent: "array.array[int]") -> None:
    """Refuse entry names that could lead a writer out of its directory, or that make a
    directory ambiguous: every name but the root's (which must be empty) is one path component
    of 1-255 bytes, without ``/`` or NUL, neither ``.`` nor ``..``, and the names of entries
    that share a parent and sit next to each other are strictly increasing. Since a directory's
    children are one contiguous, name-sorted range (``Index.walk`` checks that each of them
    names that directory as its parent), this refuses a name used twice in a directory and keeps
    ``lookup_child``'s binary search exact.

    Cost, measured on the 2-core VM (benchmarks/bench_index.py's 50,000-entry tree, same run):
    +8-10 ms on a ~11 ms ``parse`` (min of 30, at load 13); names are sliced in blocks of ``_NAME_BLOCK`` entries so a 16M-entry index does not
    hold 16M name objects at once.

    Raises:
        CorruptIndex: naming the first rule an entry breaks.
    """
    n = len(ends)
    if not n or ends[0] != 0:
        raise CorruptIndex("index root entry has a name")
    if n == 1:
        return
    if b"/" in names or b"\0" in names:
        raise CorruptIndex("index entry name contains '/' or NUL")
    for lo in range(0, n - 1, _NAME_BLOCK):
        # entries lo+1 .. hi-1 (entry i's name starts at ends[i-1]); blocks share one entry,
        # so the pair that straddles two blocks is compared too. Lists, not the arrays: their
        # items are made once (iterating an array boxes every int again), 2-3x faster here.
        hi = min(n, lo + _NAME_BLOCK + 2)
        el = ends[lo:hi].tolist()
        nm = [names[s:e] for s, e in zip(el, el[1:])]
        lens = list(map(len, nm))
        if min(lens) == 0:  # (also every decreasing name_end: the slice comes out empty)
            raise CorruptIndex(f"index entry {lo + 1 + lens.index(0)} has an empty name or a bad name range")
        if max(lens) > MAX_NAME:
            raise CorruptIndex(f"index entry name longer than {MAX_NAME} bytes")
        if b"." in nm or b".." in nm:
            raise CorruptIndex("index entry is named '.' or '..'")
        # siblings sit next to each other, sorted: a pair with one parent must increase
        pl = parent[lo + 1:hi].tolist()
        if any(map(operator.gt, map(operator.eq, pl, pl[1:]), map(operator.lt, nm, nm[1:]))):
            raise CorruptIndex("index directory holds a name twice (or its names are not sorted)")
    if ends[n - 1] > len(names):
        raise CorruptIndex("index entry name range is beyond the name heap")


class Index:
    """A parsed, read-only image index. Construct with ``Index.parse(data)``.

    ``chunk_size`` is the largest chunk size of any file (in a version-1 index, every file's);
    ``file_chunk_size(i)`` is file ``i``'s. Every accessor raises ``CorruptIndex`` when the index is internally inconsistent and
    ``PathNotFound`` / ``NotAFile`` for bad requests.
    """

    __slots__ = ("version", "chunk_size", "n_entries", "n_chunks", "n_packs", "_c", "_names", "_links",
                 "_xheap", "_digests", "_packs", "_pack_members", "_shifts")

    def __init__(self) -> None:  # use Index.parse
        self._pack_members: dict[bytes, list[int]] | None = None

    @classmethod
    def parse(cls, data: bytes) -> "Index":
        """Parse serialized index bytes (untrusted).

        Raises:
            CorruptIndex: on any malformed, truncated, or out-of-limit input.
        """
        if len(data) < _HEADER.size + _LENGTHS_V1.size:
            raise CorruptIndex(f"index truncated: {len(data)} bytes")
        magic, version, chunk_size, n, m, npk, nfc, nx = _HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise CorruptIndex("not a casfs index (bad magic)")
        if version not in READ_VERSIONS:
            raise CorruptIndex(f"index format version {version} is not supported (this casfs reads "
                               f"{', '.join(map(str, READ_VERSIONS))})")
        if chunk_size & (chunk_size - 1) or not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE):
            raise CorruptIndex(f"index chunk size {chunk_size} is not a power of two in "
                               f"[{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
        if not (1 <= n <= MAX_ENTRIES) or m > MAX_CHUNKS or nfc > MAX_CHUNKS or npk > m or nx > MAX_ENTRIES * 4:
            raise CorruptIndex(f"index counts out of range (entries={n}, chunks={m}, packs={npk})")
        sections, lengths_struct = (_SECTIONS_V1, _LENGTHS_V1) if version == 1 else (_SECTIONS, _LENGTHS)
        if len(data) < _HEADER.size + lengths_struct.size:
            raise CorruptIndex(f"index truncated: {len(data)} bytes")
        lengths = lengths_struct.unpack_from(data, _HEADER.size)
        counts = {"entries": n, "chunks": m, "packs": npk, "file_chunks": nfc, "xattrs": nx}
        self = cls()
        self.version = version
        self.chunk_size, self.n_entries, self.n_chunks, self.n_packs = chunk_size, n, m, npk
        off = _HEADER.size + lengths_struct.size
        if off + sum(lengths) != len(data):
            raise CorruptIndex(f"index sections add up to {off + sum(lengths)} bytes, index has {len(data)}")
        mv = memoryview(data)
        cols: dict[str, array.array] = {}
        heaps: dict[str, bytes] = {}
        for (name, tc, ck), ln in zip(sections, lengths):
            if tc is not None:
                a = array.array(tc)
                if ln != a.itemsize * counts[ck]:  # type: ignore[index]
                    raise CorruptIndex(f"index section {name} has {ln} bytes, expected {a.itemsize * counts[ck]}")  # type: ignore[index]
                a.frombytes(mv[off:off + ln])
                if _BIG_ENDIAN:
                    a.byteswap()
                cols[name] = a
            else:
                if ck is not None and ln != DIGEST_SIZE * counts[ck]:
                    raise CorruptIndex(f"index section {name} has {ln} bytes, expected {DIGEST_SIZE * counts[ck]}")
                heaps[name] = bytes(mv[off:off + ln])
            off += ln
        # cheap whole-column checks (C speed); the rest is checked on use
        if n and max(cols["parent"]) >= n:
            raise CorruptIndex("index entry has a parent out of range")
        if m and max(cols["chunk_stored_len"]) > MAX_CHUNK_SIZE + (MAX_CHUNK_SIZE >> 6) + 1024:
            raise CorruptIndex("index chunk has an impossible stored length")
        if m and max(cols["chunk_raw_len"]) > chunk_size:
            raise CorruptIndex("index chunk is longer than the image's chunk size")
        if nfc and max(cols["file_chunks"]) >= m:
            raise CorruptIndex("index file refers to a chunk out of range")
        if m:  # (also when packs == chunks: every pack number must still be < packs)
            bad = [p for p in set(cols["chunk_pack"]) if p != NO_PACK and p >= npk]
            if bad:
                raise CorruptIndex("index chunk refers to a pack out of range")
        if not statmod.S_ISDIR(cols["mode"][0]):
            raise CorruptIndex("index root is not a directory")
        check_names(heaps["names"], cols["name_end"], cols["parent"])
        if b"\0" in heaps["links"]:
            raise CorruptIndex("index symlink target contains NUL")
        shifts = cols.get("chunk_shift")
        if shifts is not None and max(shifts) > MAX_CHUNK_SHIFT:
            raise CorruptIndex("index file has a chunk size over the limit")  # (< 12 and > header: on use)
        self._shifts = shifts  # None for version 1: every file has the header's chunk size
        self._c = cols
        self._names = heaps["names"]
        self._links = heaps["links"]
        self._xheap = heaps["xattr_heap"]
        self._digests = heaps["chunk_digests"]
        self._packs = heaps["pack_digests"]
        return self

    # -- entries ------------------------------------------------------------------------------

    def _check(self, i: int) -> None:
        if not (0 <= i < self.n_entries):
            raise CorruptIndex(f"index entry {i} out of range")

    def stat(self, i: int) -> Stat:
        """Metadata of entry ``i``."""
        self._check(i)
        c = self._c
        return Stat(c["ino"][i], c["mode"][i], c["uid"][i], c["gid"][i], c["mtime_ns"][i],
                    c["size"][i], c["rdev"][i], c["nlink"][i])

    def mode(self, i: int) -> int:
        return self._c["mode"][i]

    def size(self, i: int) -> int:
        return self._c["size"][i]

    def name(self, i: int) -> bytes:
        """The entry's own name (b'' for the root)."""
        self._check(i)
        ends = self._c["name_end"]
        start = ends[i - 1] if i else 0
        end = ends[i]
        if not (start <= end <= len(self._names)) or end - start > MAX_NAME:
            raise CorruptIndex(f"index entry {i} has a bad name range")
        return self._names[start:end]

    def parent(self, i: int) -> int:
        self._check(i)
        return self._c["parent"][i]

    def children(self, i: int) -> range:
        """Entry numbers of a directory's children, sorted by name.

        Raises:
            NotADirectoryError: when ``i`` is not a directory.
            CorruptIndex: when the range is inconsistent.
        """
        self._check(i)
        if not statmod.S_ISDIR(self._c["mode"][i]):
            raise NotADirectoryError(f"entry {i} is not a directory")
        first, count = self._c["first"][i], self._c["count"][i]
        if count and (first <= i or first + count > self.n_entries):
            raise CorruptIndex(f"index directory {i} has a bad child range")
        return range(first, first + count)

    def lookup_child(self, d: int, name: bytes) -> int | None:
        """Binary-search a directory for ``name``; None when absent."""
        kids = self.children(d)
        if not kids:
            return None
        ends = self._c["name_end"]
        names = self._names
        lo, hi = kids.start, kids.stop
        while lo < hi:
            mid = (lo + hi) // 2
            s = ends[mid - 1]
            cand = names[s:ends[mid]]
            if cand < name:
                lo = mid + 1
            else:
                hi = mid
        if lo < kids.stop and self.name(lo) == name:
            return lo
        return None

    def lookup(self, path: str) -> int:
        """Entry number of ``path`` ('/'-separated, leading '/' optional; symlinks not followed).

        Raises:
            PathNotFound: when a component is missing or a non-directory is traversed.
        """
        i = 0
        for part in path.split("/"):
            if not part or part == ".":
                continue
            if part == "..":
                i = self.parent(i)
                continue
            if not statmod.S_ISDIR(self._c["mode"][i]):
                raise PathNotFound(f"{path!r}: {self.path(i)!r} is not a directory")
            j = self.lookup_child(i, part.encode("utf-8", "surrogateescape"))
            if j is None:
                raise PathNotFound(f"{path!r} does not exist in the image")
            i = j
        return i

    def path(self, i: int) -> str:
        """The '/'-separated path of entry ``i`` relative to the root ('' for the root)."""
        parts: list[bytes] = []
        seen = 0
        while i != 0:
            parts.append(self.name(i))
            i = self.parent(i)
            seen += 1
            if seen > 4096:
                raise CorruptIndex("index parent chain is too deep or cyclic")
        return b"/".join(reversed(parts)).decode("utf-8", "surrogateescape")

    def readlink(self, i: int) -> bytes:
        """Target of symlink entry ``i``."""
        self._check(i)
        if not statmod.S_ISLNK(self._c["mode"][i]):
            raise OSError(22, f"{self.path(i)!r} is not a symlink")
        off, ln = self._c["first"][i], self._c["size"][i]
        if off + ln > len(self._links) or ln > 65536:
            raise CorruptIndex(f"index symlink {i} has a bad target range")
        return self._links[off:off + ln]

    @property
    def has_xattrs(self) -> bool:
        """Whether any entry of this image has extended attributes."""
        return len(self._c["xattr_key_end"]) > 0

    def xattrs(self, i: int) -> dict[bytes, bytes]:
        """Extended attributes of entry ``i``."""
        self._check(i)
        first, count = self._c["xattr_first"][i], self._c["xattr_count"][i]
        if not count:
            return {}
        kend, vend = self._c["xattr_key_end"], self._c["xattr_val_end"]
        if first + count > len(kend):
            raise CorruptIndex(f"index entry {i} has a bad xattr range")
        out = {}
        for j in range(first, first + count):
            start = vend[j - 1] if j else 0
            if not (start <= kend[j] <= vend[j] <= len(self._xheap)):
                raise CorruptIndex(f"index entry {i} has a bad xattr")
            out[self._xheap[start:kend[j]]] = self._xheap[kend[j]:vend[j]]
        return out

    def walk(self, top: int = 0) -> Iterator[int]:
        """Every entry under ``top`` (itself first), parents before children, each exactly once.

        Raises:
            CorruptIndex: when a directory lists a child whose parent is another entry (child
                ranges that overlap would otherwise make the walk revisit entries, exponentially
                often in a hostile index).
        """
        self._check(top)
        mode, parent = self._c["mode"], self._c["parent"]
        stack = [top]
        while stack:
            i = stack.pop()
            yield i
            if statmod.S_ISDIR(mode[i]):
                kids = self.children(i)
                for c in kids:
                    if parent[c] != i:
                        raise CorruptIndex(f"index directory {i} lists entry {c}, whose parent is {parent[c]}")
                stack.extend(reversed(kids))

    # -- chunks -------------------------------------------------------------------------------

    def chunk(self, k: int) -> ChunkRef:
        """Chunk-table entry ``k``."""
        if not (0 <= k < self.n_chunks):
            raise CorruptIndex(f"index chunk {k} out of range")
        c = self._c
        p = c["chunk_pack"][k]
        pack = None if p == NO_PACK else self._packs[p * DIGEST_SIZE:(p + 1) * DIGEST_SIZE]
        return ChunkRef(self._digests[k * DIGEST_SIZE:(k + 1) * DIGEST_SIZE], c["chunk_raw_len"][k],
                        c["chunk_stored_len"][k], pack, c["chunk_pack_off"][k])

    def file_chunk_size(self, i: int) -> int:
        """Bytes per chunk of regular file ``i``: chunk ``j`` covers ``[j*cs, (j+1)*cs)``.

        Raises:
            NotAFile: ``i`` is not a regular file.
            CorruptIndex: ``i`` is out of range, or its recorded size is not a power of two in
                [``MIN_CHUNK_SIZE``, the header's chunk size].
        """
        self._check(i)
        if not statmod.S_ISREG(self._c["mode"][i]):
            raise NotAFile(f"{self.path(i)!r} is not a regular file")
        if self._shifts is None:
            return self.chunk_size
        shift = self._shifts[i]
        if shift < MIN_CHUNK_SHIFT or (1 << shift) > self.chunk_size:
            raise CorruptIndex(f"index file {i} has a bad chunk size (2**{shift})")
        return 1 << shift

    def file_chunk_ids(self, i: int) -> range:
        """Slots in the file-chunk list for regular file ``i`` (slot j covers offset
        ``j * file_chunk_size(i)``)."""
        cs = self.file_chunk_size(i)
        first, count = self._c["first"][i], self._c["count"][i]
        size = self._c["size"][i]
        if first + count > len(self._c["file_chunks"]) or count != -(-size // cs):
            raise CorruptIndex(f"index file {i} has a bad chunk list")
        return range(first, first + count)

    def file_chunk(self, i: int, j: int) -> ChunkRef:
        """The ``j``-th chunk of regular file ``i``."""
        slots = self.file_chunk_ids(i)
        if not (0 <= j < len(slots)):
            raise CorruptIndex(f"chunk {j} of file {i} out of range")
        return self.chunk(self._c["file_chunks"][slots.start + j])

    def file_chunks(self, i: int) -> list[ChunkRef]:
        """All chunks of regular file ``i`` in file order."""
        fc = self._c["file_chunks"]
        return [self.chunk(fc[s]) for s in self.file_chunk_ids(i)]

    def all_chunks(self) -> Iterator[ChunkRef]:
        """Every chunk-table entry."""
        for k in range(self.n_chunks):
            yield self.chunk(k)

    def pack_members(self, pack: bytes) -> list[ChunkRef]:
        """Chunks of this image stored in ``pack``, in pack-offset order (built once, lazily)."""
        if self._pack_members is None:
            by_num: dict[int, list[int]] = {}
            for k, p in enumerate(self._c["chunk_pack"]):
                if p != NO_PACK:
                    by_num.setdefault(p, []).append(k)
            self._pack_members = {
                self._packs[p * DIGEST_SIZE:(p + 1) * DIGEST_SIZE]: ks for p, ks in by_num.items()
            }
        refs = [self.chunk(k) for k in self._pack_members.get(pack, ())]
        refs.sort(key=lambda r: r.pack_off)
        return refs
