"""The image index: serialize/parse round trips, lookups, and hostile bytes."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casfs.errors import CorruptIndex, PathNotFound
from casfs.index import ChunkRef, EntrySpec, Index, serialize

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644
LNK = stat.S_IFLNK | 0o777

names = st.text(alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=20).filter(lambda s: s not in (".", "..") and len(s.encode()) <= 255)


@st.composite
def trees(draw):
    """A random tree: dict path -> EntrySpec, with parents present."""
    entries = {"": EntrySpec("", DIR, mtime_ns=draw(st.integers(0, 2**62)))}
    dirs = [""]
    for _ in range(draw(st.integers(0, 40))):
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        path = f"{parent}/{name}" if parent else name
        if path in entries:
            continue
        kind = draw(st.sampled_from(["d", "f", "l"]))
        uid, gid = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
        mt = draw(st.integers(-(2**40), 2**62))
        x = draw(st.dictionaries(st.binary(min_size=1, max_size=10), st.binary(max_size=20), max_size=2))
        if kind == "d":
            entries[path] = EntrySpec(path, DIR, uid, gid, mt, xattrs=x)
            dirs.append(path)
        elif kind == "f":
            n = draw(st.integers(0, 3))
            entries[path] = EntrySpec(path, REG, uid, gid, mt, size=n * 4096 - (1 if n else 0),
                                      chunks=[draw(st.integers(0, 4)) for _ in range(n)], xattrs=x)
        else:
            entries[path] = EntrySpec(path, LNK, uid, gid, mt, symlink=draw(st.binary(max_size=50).map(lambda b: b.replace(b"\0", b"x"))))
    return entries


def _chunks():
    return [ChunkRef(bytes([i]) * 32, 4096, 100 + i, bytes([9]) * 32, i * 200) if i % 2 == 0
            else ChunkRef(bytes([i]) * 32, 4096, 100 + i) for i in range(5)]


@settings(max_examples=150, deadline=None)
@given(trees())
def test_every_entry_survives_a_serialize_parse_round_trip(tree):
    chunks = _chunks()
    ix = Index.parse(serialize(list(tree.values()), chunks, 4096))
    assert ix.n_entries == len(tree)
    for path, e in tree.items():
        i = ix.lookup(path)
        assert ix.path(i) == path
        s = ix.stat(i)
        assert (s.mode, s.uid, s.gid, s.mtime_ns) == (e.mode, e.uid, e.gid, e.mtime_ns)
        assert ix.xattrs(i) == (e.xattrs if not stat.S_ISLNK(e.mode) else e.xattrs)
        if stat.S_ISREG(e.mode):
            assert s.size == e.size
            assert ix.file_chunks(i) == [chunks[k] for k in e.chunks]
        elif stat.S_ISLNK(e.mode):
            assert ix.readlink(i) == (e.symlink or b"")
        else:
            kids = sorted(p.rpartition("/")[2].encode() for p in tree if p and p.rpartition("/")[0] == path)
            assert [ix.name(c) for c in ix.children(i)] == kids
    assert sorted(ix.path(i) for i in ix.walk()) == sorted(tree)


def test_hard_links_share_an_inode_and_count_their_links():
    entries = [EntrySpec("", DIR), EntrySpec("a", REG, link_group="g"), EntrySpec("b", REG, link_group="g"),
               EntrySpec("c", REG)]
    ix = Index.parse(serialize(entries, [], 4096))
    a, b, c = (ix.stat(ix.lookup(p)) for p in "abc")
    assert a.ino == b.ino != c.ino
    assert a.nlink == b.nlink == 2 and c.nlink == 1


def test_a_missing_path_raises_path_not_found():
    ix = Index.parse(serialize([EntrySpec("", DIR), EntrySpec("f", REG)], [], 4096))
    with pytest.raises(PathNotFound):
        ix.lookup("g")
    with pytest.raises(PathNotFound, match="not a directory"):
        ix.lookup("f/x")


def test_serialize_rejects_duplicates_and_orphans():
    with pytest.raises(ValueError, match="duplicate"):
        serialize([EntrySpec("", DIR), EntrySpec("a", REG), EntrySpec("a", REG)], [], 4096)
    with pytest.raises(ValueError, match="missing"):
        serialize([EntrySpec("", DIR), EntrySpec("a/b", REG)], [], 4096)


@settings(max_examples=300, deadline=None)
@given(trees(), st.data())
def test_damaged_index_bytes_raise_only_corrupt_index(tree, data):
    raw = bytearray(serialize(list(tree.values()), _chunks(), 4096))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        ix = Index.parse(bytes(raw))
        for i in ix.walk():  # every accessor must stay bounded
            ix.stat(i), ix.path(i), ix.xattrs(i)
            if ix.stat(i).is_file:
                ix.file_chunks(i)
            if ix.stat(i).is_symlink:
                ix.readlink(i)
    except (CorruptIndex, PathNotFound, NotADirectoryError):
        pass


def test_a_child_range_pointing_backwards_cannot_make_a_loop():
    entries = [EntrySpec("", DIR), EntrySpec("d", DIR), EntrySpec("d/e", DIR)]
    raw = bytearray(serialize(entries, [], 4096))
    ix = Index.parse(bytes(raw))
    # find the "first" column and point d's children at the root
    import casfs.index as im

    hdr = im._HEADER.size + im._LENGTHS.size
    lengths = im._LENGTHS.unpack_from(raw, im._HEADER.size)
    off = hdr
    for (name, _, _), ln in zip(im._SECTIONS, lengths):
        if name == "first":
            break
        off += ln
    d = ix.lookup("d")
    raw[off + 4 * d: off + 4 * d + 4] = (0).to_bytes(4, "little")
    bad = Index.parse(bytes(raw))
    with pytest.raises(CorruptIndex, match="child range"):
        list(bad.walk())


@pytest.mark.parametrize("chunk_size", [4166, 3 << 20, 4096 + 1])
def test_a_header_chunk_size_that_is_not_a_power_of_two_is_refused(chunk_size):
    """Found by fuzz/fuzz_index.py in CI: a header chunk size of 4166 parsed, and every file of a
    version-1 index then claimed 4166-byte chunks, which no build writes."""
    import casfs.index as im

    raw = bytearray(serialize([EntrySpec("", DIR), EntrySpec("f", REG, size=10, chunks=[0])], _chunks()[:1], 4096))
    magic, version, _, *rest = im._HEADER.unpack_from(raw, 0)
    im._HEADER.pack_into(raw, 0, magic, version, chunk_size, *rest)
    with pytest.raises(CorruptIndex, match="not a power of two"):
        Index.parse(bytes(raw))
