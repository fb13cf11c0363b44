"""Hostile archives: every case is refused with a BuildError that says what is wrong, or built
into a contained image whose shape the test states. Archives are real tar files; the damaged
ones are real tars with header bytes patched (checksums fixed up so tarfile parses them)."""

from __future__ import annotations

import gzip
import io
import json
import stat
import tarfile

import pytest
from test_build_tar import member, tar_bytes, write_docker_save, write_file

import casfs
from casfs.build import source as build_source

INT64_MAX = (1 << 63) - 1


def build_tar(store, tmp_path, members, *, tag="t", fmt=tarfile.PAX_FORMAT):
    path = write_file(tmp_path / "x.tar", tar_bytes(members, fmt))
    casfs.build(store, path, tag=tag)
    return store.open_image(tag)


def refuse(store, tmp_path, members, match, *, fmt=tarfile.PAX_FORMAT):
    path = write_file(tmp_path / "x.tar", tar_bytes(members, fmt))
    with pytest.raises(casfs.BuildError, match=match) as e:
        casfs.build(store, path, tag="t")
    assert "t" not in store.tags()  # nothing tagged by a failed build
    return str(e.value)


def build_layers(store, tmp_path, layers, tag="t"):
    path = str(tmp_path / "img.tar")
    write_docker_save(path, [tar_bytes(m) for m in layers])
    casfs.build(store, path, tag=tag)
    return store.open_image(tag)


def refuse_layers(store, tmp_path, layers, match):
    path = str(tmp_path / "img.tar")
    write_docker_save(path, [tar_bytes(m) for m in layers])
    with pytest.raises(casfs.BuildError, match=match) as e:
        casfs.build(store, path, tag="t")
    return str(e.value)


def patch(data: bytes, header: int, field: int, raw: bytes) -> bytes:
    """Overwrite bytes of the ustar header at offset ``header`` and fix its checksum."""
    buf = bytearray(data)
    buf[header + field:header + field + len(raw)] = raw
    buf[header + 148:header + 156] = b" " * 8
    buf[header + 148:header + 156] = b"%06o\0 " % sum(buf[header:header + 512])
    return bytes(buf)


SIZE, TYPE = 124, 156  # ustar header field offsets


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "ok/..", "./../../etc/passwd", "/../x"])
def test_a_name_with_a_dotdot_component_is_refused(store, tmp_path, name):
    msg = refuse(store, tmp_path, [member("fine", b"1"), member(name, b"x")], r"has a '\.\.' component")
    assert repr(name) in msg


def test_absolute_and_dotted_names_are_placed_under_the_image_root(store, tmp_path):
    image = build_tar(store, tmp_path, [member("/etc/abs", b"abs"), member("//x/./y/", ),
                                        member("./rel", b"rel")])
    assert image.listdir("") == ["etc", "rel", "x"]
    assert image.read("etc/abs") == b"abs" and image.stat("x/y").is_dir


def test_a_name_with_a_nul_byte_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("x", b"1", pax={"path": "evil\x00name"})], "contains a NUL byte")


def test_a_name_component_over_255_bytes_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("d/" + "n" * 256, b"1")], "component of 256 bytes; file names are limited to 255")


def test_a_multibyte_component_is_measured_in_bytes(store, tmp_path):
    refuse(store, tmp_path, [member("\u00e9" * 128, b"1")], "component of 256 bytes")
    image = build_tar(store, tmp_path, [member("\u00e9" * 127, b"ok")])
    assert image.read("\u00e9" * 127) == b"ok"


def test_a_path_over_4096_bytes_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("/".join(["a" * 200] * 25), b"1")], "5024 bytes long; paths are limited to 4096")


def test_a_root_entry_that_is_not_a_directory_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member(".", b"not a dir")], "root entry .* is a regular file; the root of an image must be a directory")


# -- symlinks ---------------------------------------------------------------------------------


def test_symlinks_pointing_outside_the_root_are_kept_as_data(store, tmp_path):
    image = build_tar(store, tmp_path, [member("up", type=tarfile.SYMTYPE, linkname="../../../../etc"),
                                        member("abs", type=tarfile.SYMTYPE, linkname="/etc/shadow")])
    assert image.readlink("up") == "../../../../etc" and image.readlink("abs") == "/etc/shadow"
    assert image.stat("up").is_symlink and image.listdir("") == ["abs", "up"]


@pytest.mark.parametrize("late", ["link/passwd", "link/sub/deeper"])
def test_an_entry_under_a_symlink_is_refused_not_followed(store, tmp_path, late):
    msg = refuse(store, tmp_path, [member("etc/"), member("link", type=tarfile.SYMTYPE, linkname="/etc"),
                                   member(late, b"owned")],
                 "lies under 'link', which is a symlink .* never follows symlinks")
    assert "-> '/etc'" in msg


def test_an_entry_under_a_symlink_from_a_lower_layer_is_refused(store, tmp_path):
    refuse_layers(store, tmp_path, [[member("lib", type=tarfile.SYMTYPE, linkname="usr/lib"), member("usr/lib/")],
                                    [member("lib/libc.so", b"x")]],
                  r"layer 2 .*'lib/libc.so' lies under 'lib', which is a symlink")


def test_a_directory_entry_replaces_a_symlink_before_entries_go_under_it(store, tmp_path):
    image = build_layers(store, tmp_path, [[member("lib", type=tarfile.SYMTYPE, linkname="usr/lib"),
                                            member("usr/lib/old", b"old")],
                                           [member("lib/"), member("lib/libc.so", b"x")]])
    assert image.stat("lib").is_dir and image.listdir("lib") == ["libc.so"]
    assert image.listdir("usr/lib") == ["old"]  # nothing went through the symlink


def test_an_entry_under_a_regular_file_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("f", b"file"), member("f/x", b"x")], "lies under 'f', which is a regular file, not a directory")


def test_whiteouts_are_not_resolved_through_symlinks(store, tmp_path):
    image = build_layers(store, tmp_path, [[member("etc/keep", b"k"), member("link", type=tarfile.SYMTYPE, linkname="etc")],
                                           [member("link/.wh.keep", b"")]])
    assert image.read("etc/keep") == b"k" and image.readlink("link") == "etc"


def test_an_opaque_marker_under_a_symlink_is_refused(store, tmp_path):
    refuse_layers(store, tmp_path, [[member("etc/keep", b"k"), member("link", type=tarfile.SYMTYPE, linkname="etc")],
                                    [member("link/.wh..wh..opq", b"")]],
                  "opaque-directory marker in 'link', which is a symlink, not a directory")


@pytest.mark.parametrize("target", ["", "a\x00b", "x" * 4096])
def test_a_symlink_target_linux_cannot_hold_is_refused(store, tmp_path, target):
    refuse(store, tmp_path, [member("s", type=tarfile.SYMTYPE, pax={"linkpath": target})],
           f"symlink with an empty target, a NUL byte in it, or a target of {len(target)} bytes")


# -- hard links -------------------------------------------------------------------------------


def test_a_hard_link_to_a_missing_name_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("h", type=tarfile.LNKTYPE, linkname="nowhere")],
           "hard link 'h' -> 'nowhere': the target is not an earlier entry")


def test_a_hard_link_before_its_target_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("h", type=tarfile.LNKTYPE, linkname="f"), member("f", b"1")],
           "hard link 'h' -> 'f'")


def test_a_hard_link_escaping_the_root_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("f", b"1"), member("h", type=tarfile.LNKTYPE, linkname="../../etc/passwd")],
           r"'\.\./\.\./etc/passwd' has a '\.\.' component")


def test_a_hard_link_to_a_directory_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("d/"), member("h", type=tarfile.LNKTYPE, linkname="d")],
           "the target is a directory; directories cannot be hard linked")


def test_a_hard_link_through_a_symlink_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("d/f", b"1"), member("l", type=tarfile.SYMTYPE, linkname="d"),
                             member("h", type=tarfile.LNKTYPE, linkname="l/f")],
           "'l/f': the target is not an earlier entry .*lies under a symlink")


def test_an_absolute_hard_link_target_is_placed_under_the_root_like_its_name(store, tmp_path):
    image = build_tar(store, tmp_path, [member("f", b"1"), member("h", type=tarfile.LNKTYPE, linkname="/f")])
    assert image.stat("h").ino == image.stat("f").ino and image.stat("f").nlink == 2


# -- duplicates and type changes ----------------------------------------------------------------


def test_a_duplicate_name_keeps_the_last_member(store, tmp_path):
    image = build_tar(store, tmp_path, [member("f", b"first", mode=0o600), member("d/", mode=0o700),
                                        member("d/kid", b"k"), member("f", b"second", mode=0o644),
                                        member("d/", mode=0o750)])
    assert image.read("f") == b"second" and stat.S_IMODE(image.stat("f").mode) == 0o644
    # a directory declared again takes the new metadata and keeps its children
    assert stat.S_IMODE(image.stat("d").mode) == 0o750 and image.listdir("d") == ["kid"]


def test_a_file_replaced_by_a_directory_becomes_the_directory(store, tmp_path):
    image = build_tar(store, tmp_path, [member("a", b"file"), member("a/"), member("a/b", b"b")])
    assert image.stat("a").is_dir and image.listdir("a") == ["b"]


def test_a_directory_replaced_by_a_file_loses_its_subtree(store, tmp_path):
    image = build_tar(store, tmp_path, [member("d/x/y", b"y"), member("d", b"now a file"),
                                        member("s/"), member("s", type=tarfile.SYMTYPE, linkname="/")])
    assert image.read("d") == b"now a file" and image.readlink("s") == "/"
    assert [p for p, _ in image.walk()] == ["", "d", "s"]


# -- limits -----------------------------------------------------------------------------------


def test_more_members_than_the_entry_limit_are_refused(store, tmp_path, monkeypatch):
    monkeypatch.setattr(build_source, "MAX_ENTRIES", 10)
    refuse(store, tmp_path, [member(f"f{i}", b"") for i in range(20)], "more than 10 members")


def test_synthesised_parents_count_against_the_entry_limit(store, tmp_path, monkeypatch):
    monkeypatch.setattr(build_source, "MAX_ENTRIES", 10)
    refuse(store, tmp_path, [member(f"{c}/1/2/3/f", b"") for c in "abc"], "more than 10 entries")


def test_the_entry_limit_counts_live_entries_across_layers(store, tmp_path, monkeypatch):
    monkeypatch.setattr(build_source, "MAX_ENTRIES", 20)
    first = [member(f"f{i:02}", b"1") for i in range(12)]
    fresh = [member(f"g{i:02}", b"2") for i in range(12)]
    image = build_layers(store, tmp_path, [first, [member(".wh..wh..opq", b"")] + fresh])  # 13 live entries
    assert image.listdir("") == [f"g{i:02}" for i in range(12)]
    refuse_layers(store, tmp_path, [first, fresh], "layer 2 .*more than 20 entries")  # 25 live entries


def test_a_member_claiming_more_bytes_than_the_archive_holds_is_refused(store, tmp_path):
    data = patch(tar_bytes([member("big", b"0123456789"), member("next", b"n")], tarfile.USTAR_FORMAT),
                 0, SIZE, b"%011o\0" % 10**9)
    path = write_file(tmp_path / "x.tar", data)
    with pytest.raises(casfs.BuildError, match="'big' claims 1000000000 bytes but the archive ends"):
        casfs.build(store, path)
    gz = write_file(tmp_path / "x.tar.gz", gzip.compress(data))
    with pytest.raises(casfs.BuildError, match="truncated archive: a member claims more data than the archive holds"):
        casfs.build(store, gz)


def test_a_truncated_compressed_archive_is_refused(store, tmp_path):
    data = gzip.compress(tar_bytes([member(f"f{i}", bytes([i]) * 20000) for i in range(20)]))
    path = write_file(tmp_path / "cut.tar.gz", data[: len(data) // 2])
    with pytest.raises(casfs.BuildError, match="corrupt|truncated"):
        casfs.build(store, path)


def test_a_negative_size_that_would_loop_the_parser_is_refused(store, tmp_path):
    neg = b"\xff" + ((1 << 88) - 2048).to_bytes(11, "big")  # base-256 encoding of -2048
    data = patch(tar_bytes([member("a", b"a"), member("b", b"b")], tarfile.USTAR_FORMAT), 512 * 2, SIZE, neg)
    path = write_file(tmp_path / "x.tar", data)
    with pytest.raises(casfs.BuildError, match="'b' has a negative size"):
        casfs.build(store, path)


def test_a_huge_extended_header_is_refused_before_it_is_read(store, tmp_path):
    huge = b"\x80" + (1 << 40).to_bytes(11, "big")
    data = tar_bytes([member("a", b"a"), member("b", b"")], tarfile.USTAR_FORMAT)
    data = patch(patch(data, 1024, TYPE, b"x"), 1024, SIZE, huge)
    path = write_file(tmp_path / "x.tar.gz", gzip.compress(data))
    with pytest.raises(casfs.BuildError, match=r"extended \(pax or GNU long name\) header at byte 1024 claims 1099511627776 bytes"):
        casfs.build(store, path)


def test_a_corrupt_header_in_the_middle_is_refused_not_taken_as_the_end(store, tmp_path):
    data = bytearray(tar_bytes([member("a", b"a"), member("b", b"b"), member("c", b"c")], tarfile.USTAR_FORMAT))
    data[1024] ^= 0xFF  # first byte of b's name: its checksum no longer matches
    path = write_file(tmp_path / "x.tar", bytes(data))
    with pytest.raises(casfs.BuildError, match="corrupt tar header at byte 1024"):
        casfs.build(store, path)


@pytest.mark.parametrize("content,match", [(b"", "the file is empty"),
                                           (b"hello, not a tar\n" * 64, "not a tar archive")])
def test_a_file_that_is_not_a_tar_is_refused(store, tmp_path, content, match):
    with pytest.raises(casfs.BuildError, match=match):
        casfs.build(store, write_file(tmp_path / "x.tar", content))


# -- metadata ---------------------------------------------------------------------------------


def test_negative_mtimes_are_kept_and_absurd_ones_clamped(store, tmp_path):
    image = build_tar(store, tmp_path, [member("old", b"", pax={"mtime": "-100.5"}),
                                        member("far", b"", pax={"mtime": "1e30"}),
                                        member("nan", b"", pax={"mtime": "nan"})])
    assert image.stat("old").mtime_ns == -100_500_000_000
    assert image.stat("far").mtime_ns == INT64_MAX
    assert image.stat("nan").mtime_ns == 0


@pytest.mark.parametrize("field", ["uid", "gid"])
def test_an_owner_id_outside_32_bits_is_refused(store, tmp_path, field):
    refuse(store, tmp_path, [member("f", b"", pax={field: str(1 << 32)})], f"{field} 4294967296 is outside 0..4294967295")


def test_an_oversized_xattr_value_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("f", b"", pax={"SCHILY.xattr.user.big": "v" * 70000})],
           "a value over 64 KiB")


def test_an_unsupported_member_type_is_refused(store, tmp_path):
    refuse(store, tmp_path, [member("vol", type=b"V")],
           "unsupported tar member type b'V'")


def test_libarchive_xattrs_are_decoded(store, tmp_path):
    image = build_tar(store, tmp_path, [member("f", b"", pax={"LIBARCHIVE.xattr.user.a%20b": "AAEC"})])
    assert image.index.xattrs(image.lookup("f")) == {b"user.a b": b"\x00\x01\x02"}


# -- docker save ------------------------------------------------------------------------------


def test_a_docker_save_layer_path_escaping_the_archive_is_refused(store, tmp_path):
    path = write_file(tmp_path / "x.tar", tar_bytes([
        member("manifest.json", json.dumps([{"Config": "c", "Layers": ["../../etc/layer.tar"]}]).encode())]))
    with pytest.raises(casfs.BuildError, match=r"'\.\./\.\./etc/layer.tar' has a '\.\.' component"):
        casfs.build(store, path)


def test_a_docker_save_layer_symlink_escaping_the_archive_is_refused(store, tmp_path):
    path = write_file(tmp_path / "x.tar", tar_bytes([
        member("l/layer.tar", type=tarfile.SYMTYPE, linkname="../../../etc/layer.tar"),
        member("manifest.json", json.dumps([{"Config": "c", "Layers": ["l/layer.tar"]}]).encode())]))
    with pytest.raises(casfs.BuildError, match="symlink target '../../../etc/layer.tar' escapes the archive"):
        casfs.build(store, path)


def test_a_damaged_layer_inside_a_docker_save_names_the_layer(store, tmp_path):
    good = tar_bytes([member("f", b"1")])
    bad = gzip.compress(tar_bytes([member("g", b"2" * 5000)]))[:60]
    path = str(tmp_path / "img.tar")
    write_docker_save(path, [good, b"unused"], layer_files=[good, bad])
    with pytest.raises(casfs.BuildError, match=r"layer 2 \(.*/layer.tar\)"):
        casfs.build(store, path)


def test_a_gzip_bomb_of_zeros_is_just_a_big_file(store, tmp_path):
    # 32 MiB of zeros in ~32 KiB: built as one file of identical chunks, stored once
    zeros = io.BytesIO()
    with tarfile.open(fileobj=zeros, mode="w:gz") as tf:
        ti = tarfile.TarInfo("zeros")
        ti.size = 32 << 20
        tf.addfile(ti, io.BytesIO(bytes(ti.size)))
    path = write_file(tmp_path / "z.tar.gz", zeros.getvalue())
    result = casfs.build(store, path, tag="z")
    assert store.open_image("z").stat("zeros").size == 32 << 20
    assert result.pack.bytes_new_raw == casfs.CODE_CHUNK_SIZE  # one distinct chunk (zeros compress: small chunks)
