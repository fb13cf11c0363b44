"""Hostile entry names: an index with a valid digest whose names would lead ``export`` out of
its destination is refused by the parser, and the exporter itself (openat-style writes relative
to directory descriptors, O_NOFOLLOW, O_EXCL) writes nothing outside DIR even when the
parser's check is bypassed (the second line of defence)."""

from __future__ import annotations

import os
import stat

import pytest

import casfs
from casfs import index as indexmod
from casfs.errors import CorruptIndex
from casfs.index import EntrySpec, Index, serialize

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644
LNK = stat.S_IFLNK | 0o777
PAYLOAD = b"pwned by a hostile image\n"


def _names_offset(data: bytes) -> int:
    """Byte offset of the names heap in serialized index bytes."""
    lengths = indexmod._LENGTHS.unpack_from(data, indexmod._HEADER.size)
    off = indexmod._HEADER.size + indexmod._LENGTHS.size
    for (name, _, _), ln in zip(indexmod._SECTIONS, lengths):
        if name == "names":
            return off
        off += ln
    raise AssertionError("no names section")


def forge(entries: list[EntrySpec], chunks, renames: dict[str, bytes]) -> bytes:
    """Serialize a tree, then overwrite names in the names heap (same length) with hostile
    ones that ``serialize`` would refuse: the bytes of a crafted index."""
    data = bytearray(serialize(entries, chunks, 4096))
    at = _names_offset(bytes(data))
    for old, new in renames.items():
        old_b = old.encode()
        assert len(old_b) == len(new), (old, new)
        pos = data.find(old_b, at)
        assert pos >= 0, old
        data[pos:pos + len(new)] = new
    return bytes(data)


@pytest.fixture
def box(tmp_path):
    """A sandbox: the export goes to box/out; box/victim and box/victim-dir/ stand for the
    rest of the filesystem."""
    b = tmp_path / "box"
    b.mkdir()
    (b / "victim").write_bytes(b"precious\n")
    (b / "victim-dir").mkdir()
    return b


def _listing(root) -> dict[str, bytes | None]:
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            out[os.path.relpath(p, root)] = None if os.path.isdir(p) else open(p, "rb").read()
    return out


def _payload_chunk(store, tmp_path):
    """A real stored chunk holding PAYLOAD (built from a real file)."""
    src = tmp_path / "payload-src"
    src.mkdir()
    (src / "p").write_bytes(PAYLOAD)
    r = casfs.build(store, str(src), tag="payload", progress=False)
    ix = store.load_index(r.image_id)
    return ix.file_chunks(ix.lookup("p"))[0]


def _hostile_images(box, ref) -> dict[str, bytes]:
    """Crafted indexes, each with one way out of the destination."""
    size = len(PAYLOAD)
    absname = f"{box}/abs-pwned".encode()
    out = {}
    # an absolute name
    out["absolute"] = forge(
        [EntrySpec("", DIR), EntrySpec("A" * len(absname), REG, size=size, chunks=[0])], [ref],
        {"A" * len(absname): absname})
    # a ../ name (the temporary export dir is a sibling of DIR: ../ lands in box)
    out["dotdot"] = forge(
        [EntrySpec("", DIR), EntrySpec("BBBBBBBBBBBBBBB", REG, size=size, chunks=[0])], [ref],
        {"BBBBBBBBBBBBBBB": b"../dotdot-pwned"})
    # one name twice: first a symlink pointing outside, then a file of that name
    out["symlink-then-file"] = forge(
        [EntrySpec("", DIR), EntrySpec("aa", LNK, symlink=f"{box}/victim".encode()),
         EntrySpec("ab", REG, size=size, chunks=[0])], [ref], {"ab": b"aa"})
    # a name with a '/' that walks through a symlink of the image
    out["slash-through-symlink"] = forge(
        [EntrySpec("", DIR), EntrySpec("l", LNK, symlink=f"{box}/victim-dir".encode()),
         EntrySpec("zzzzzz", REG, size=size, chunks=[0])], [ref], {"zzzzzz": b"l/evil"})
    # a directory name twice: a symlink to a directory outside, then a directory with a file
    out["symlink-then-dir"] = forge(
        [EntrySpec("", DIR), EntrySpec("da", LNK, symlink=f"{box}/victim-dir".encode()),
         EntrySpec("db", DIR), EntrySpec("db/evil", REG, size=size, chunks=[0])], [ref], {"db": b"da"})
    # . and an empty-named entry
    out["dot"] = forge([EntrySpec("", DIR), EntrySpec("q", DIR), EntrySpec("q/f", REG, size=size, chunks=[0])],
                       [ref], {"q": b"."})
    return out


KINDS = ["absolute", "dotdot", "symlink-then-file", "slash-through-symlink", "symlink-then-dir", "dot"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_index_parser_refuses_hostile_entry_names(kind, box, store, tmp_path):
    data = _hostile_images(box, _payload_chunk(store, tmp_path))[kind]
    with pytest.raises(CorruptIndex):
        Index.parse(data)
    image_id = store.put_index(data)  # a valid digest: only the parser stands in the way
    with pytest.raises(CorruptIndex):
        store.open_image(image_id)


@pytest.mark.parametrize("kind", KINDS)
def test_export_writes_nothing_outside_its_destination_even_past_the_parser(kind, box, store, tmp_path,
                                                                            monkeypatch):
    """The parser's name check is switched off (monkeypatched) to test the exporter alone."""
    data = _hostile_images(box, _payload_chunk(store, tmp_path))[kind]
    monkeypatch.setattr(indexmod, "check_names", lambda *a: None, raising=False)
    image = store.open_image(store.put_index(data))
    before = _listing(box)
    with pytest.raises((CorruptIndex, OSError)):
        casfs.export(image, str(box / "out"))
    assert _listing(box) == before  # nothing written, nothing overwritten, no half export
    assert not (tmp_path / "abs-pwned").exists()


def test_names_that_share_a_prefix_or_differ_only_in_bytes_still_parse_and_export(store, tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for n in ("a.", "a..", "...", "a b", ".hidden", "é", "a\udcff".encode("utf-8", "surrogateescape").decode(
            "utf-8", "surrogateescape")):
        (src / n).write_bytes(n.encode("utf-8", "surrogateescape"))
    (src / "a" / "a").write_bytes(b"x")
    os.symlink("/etc/passwd", src / "abs-link")
    os.symlink("../..", src / "a" / "up-link")
    r = casfs.build(store, str(src), tag="t", progress=False)
    out = tmp_path / "out"
    casfs.export(store.open_image(r.image_id), str(out))
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    assert os.readlink(out / "a" / "up-link") == "../.."
    assert (out / "...").read_bytes() == b"..."


def test_a_name_with_a_nul_byte_is_refused_by_serialize_and_parse():
    with pytest.raises(ValueError):
        serialize([EntrySpec("", DIR), EntrySpec("a\0b", REG)], [], 4096)
    data = forge([EntrySpec("", DIR), EntrySpec("aXb", REG)], [], {"aXb": b"a\0b"})
    with pytest.raises(CorruptIndex):
        Index.parse(data)


def test_unsorted_siblings_are_refused_so_lookups_stay_exact():
    data = forge([EntrySpec("", DIR), EntrySpec("a", REG), EntrySpec("b", REG)], [], {"a": b"c"})
    with pytest.raises(CorruptIndex):
        Index.parse(data)


def test_a_duplicate_across_the_parsers_check_blocks_is_found(monkeypatch):
    monkeypatch.setattr(indexmod, "_NAME_BLOCK", 5)
    entries = [EntrySpec("", DIR)] + [EntrySpec(f"f{i:02d}", REG) for i in range(20)]
    for k in range(1, 20):
        with pytest.raises(CorruptIndex):
            Index.parse(forge(entries, [], {f"f{k:02d}": f"f{k - 1:02d}".encode()}))
    assert Index.parse(serialize(entries, [], 4096)).n_entries == 21


def test_a_symlink_target_with_a_nul_byte_is_refused_by_the_parser():
    data = forge([EntrySpec("", DIR), EntrySpec("l", LNK, symlink=b"aXb")], [], {})
    data = data.replace(b"aXb", b"a\0b")
    with pytest.raises(CorruptIndex):
        Index.parse(data)
