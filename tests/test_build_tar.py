"""Building images from tar archives: plain (and compressed) tars and `docker save` archives.

Archives are real files written with Python's tarfile; builds go through ``casfs.build`` into a
real local store and are checked through the Image API.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import casfs

# ---------------------------------------------------------------------------------------------
# helpers (also used by test_build_oci.py and test_build_hostile.py)


def member(name: str, data: bytes | None = None, *, type: bytes | None = None, linkname: str = "",
           mode: int | None = None, uid: int = 0, gid: int = 0, mtime: float = 0,
           devmajor: int = 0, devminor: int = 0, pax: dict[str, str] | None = None) -> tuple:
    """One tar member: a regular file when ``data`` is given, else ``type`` (default: directory)."""
    ti = tarfile.TarInfo(name)
    if data is not None:
        ti.type = tarfile.REGTYPE
        ti.size = len(data)
    else:
        ti.type = type if type is not None else tarfile.DIRTYPE
    ti.linkname = linkname
    ti.mode = mode if mode is not None else (0o755 if ti.type == tarfile.DIRTYPE else 0o644)
    ti.uid, ti.gid, ti.mtime = uid, gid, mtime
    ti.devmajor, ti.devminor = devmajor, devminor
    if pax:
        ti.pax_headers = dict(pax)
    return ti, data


def tar_bytes(members: list[tuple], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar archive (uncompressed) holding ``members`` in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    return {"none": lambda d: d, "gz": lambda d: gzip.compress(d, mtime=0), "bz2": bz2.compress,
            "xz": lzma.compress, "zst": lambda d: zstandard.ZstdCompressor().compress(d)}[how](data)


def write_docker_save(path: str, layers: list[bytes], *, layer_files: list[bytes] | None = None,
                      tag: str = "test/img:latest", extra: list[tuple] = ()) -> None:
    """Write a `docker save`-shaped archive: ``<id>.json`` config, ``<id>/layer.tar`` per layer,
    ``manifest.json``. ``layers`` are the uncompressed layer tars (their sha256 are the config's
    diff_ids); ``layer_files`` optionally replaces the bytes stored (e.g. gzip-compressed)."""
    diff_ids = [hashlib.sha256(layer).hexdigest() for layer in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in diff_ids]}}).encode()
    cid = hashlib.sha256(config).hexdigest()
    stored = layer_files or layers
    names = [f"{d}/layer.tar" for d in diff_ids]
    members = [member(f"{cid}.json", config)]
    for d, name, data in zip(diff_ids, names, stored):
        members += [member(f"{d}/"), member(name, data)]
    members += list(extra)
    members.append(member("manifest.json", json.dumps(
        [{"Config": f"{cid}.json", "RepoTags": [tag], "Layers": names}]).encode()))
    with open(path, "wb") as f:
        f.write(tar_bytes(members, tarfile.USTAR_FORMAT))


def write_file(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# The layered test image: what each layer holds, and what the image must look like.
CAP = "\x01\x00\x00\x02\udcff\udcfe"  # binary xattr value (surrogate-escaped bytes)


def layer1() -> bytes:
    return tar_bytes([
        member("etc/", mtime=1000),
        member("etc/hosts", b"127.0.0.1 localhost\n", mtime=1000),
        member("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        member("etc/group", b"root:x:0:\n"),
        member("etc/shadow", b"secret\n", mode=0o640, gid=42),
        member("etc/cap", b"capable", mode=0o755,
               pax={"SCHILY.xattr.security.capability": CAP, "SCHILY.xattr.user.note": "h\u00e9llo"}),
        member("usr/"), member("usr/bin/"),
        member("usr/bin/tool", b"#!/bin/sh\necho v1\n", mode=0o755, mtime=2000),
        member("usr/bin/tool-alias", type=tarfile.LNKTYPE, linkname="usr/bin/tool"),
        member("usr/lib/"), member("usr/lib/a.so", b"A" * 5000), member("usr/lib/b.so", b"B"),
        member("usr/lib/sub/"), member("usr/lib/sub/c", b"C"),
        member("opt/"), member("opt/old.txt", b"old"),
        member("bin", type=tarfile.SYMTYPE, linkname="usr/bin"),
        member("dev/"),
        member("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        member("dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660),
        member("run/initctl", type=tarfile.FIFOTYPE, mode=0o600),
        member("data", b"a file for now"),
        member("home/user/", mode=0o700, uid=1000, gid=1000),
    ])


def layer2() -> bytes:
    return tar_bytes([
        member("etc/", mtime=1000),
        member("etc/.wh.passwd", b""),
        member("etc/hosts", b"10.0.0.1 new\n", mtime=3000),
        member("usr/"), member("usr/lib/"),
        member("usr/lib/.wh..wh..opq", b""),
        member("usr/lib/new.so", b"new"),
        member(".wh.opt", b""),
        member("opt/new.txt", b"new opt"),  # no "opt/" entry: the directory is synthesised
        member("data/", mode=0o711), member("data/x", b"x"),  # a file becomes a directory
        member("usr/bin/tool", b"#!/bin/sh\necho v2\n", mode=0o755, mtime=4000),
        member("srv/"), member("srv/a", b"shared"),
        member("srv/b", type=tarfile.LNKTYPE, linkname="srv/a"),
        member("srv/group-link", type=tarfile.LNKTYPE, linkname="etc/group"),  # into layer 1
    ])


def layer3() -> bytes:
    return tar_bytes([member("srv/"), member("srv/.wh.a", b""), member("etc/motd", b"welcome\n")])


def assert_layered_image(image: casfs.Image) -> None:
    """What layer1+layer2+layer3 must produce (whiteouts, opaque dir, links, metadata)."""
    assert image.listdir("") == ["bin", "data", "dev", "etc", "home", "opt", "run", "srv", "usr"]
    assert image.listdir("etc") == ["cap", "group", "hosts", "motd", "shadow"]  # passwd whited out
    assert image.listdir("usr/lib") == ["new.so"]  # opaque: a.so, b.so, sub hidden
    assert image.listdir("opt") == ["new.txt"]  # whiteout, then re-created in the same layer
    o = image.stat("opt")
    assert stat.S_ISDIR(o.mode) and stat.S_IMODE(o.mode) == 0o755 and o.mtime_ns == 0
    assert image.read("etc/hosts") == b"10.0.0.1 new\n"
    assert image.stat("etc/hosts").mtime_ns == 3000 * 10**9
    sh = image.stat("etc/shadow")
    assert (stat.S_IMODE(sh.mode), sh.uid, sh.gid) == (0o640, 0, 42)
    assert image.read("etc/motd") == b"welcome\n"
    d = image.stat("data")
    assert d.is_dir and stat.S_IMODE(d.mode) == 0o711 and image.listdir("data") == ["x"]
    # a replaced file does not drag its old hard link along (as on overlayfs)
    tool, alias = image.stat("usr/bin/tool"), image.stat("usr/bin/tool-alias")
    assert image.read("usr/bin/tool") == b"#!/bin/sh\necho v2\n"
    assert image.read("usr/bin/tool-alias") == b"#!/bin/sh\necho v1\n"
    assert tool.ino != alias.ino and tool.nlink == alias.nlink == 1
    assert stat.S_IMODE(alias.mode) == 0o755 and alias.mtime_ns == 2000 * 10**9
    # srv/a was whited out by layer 3: its link srv/b stays, now alone
    assert image.listdir("srv") == ["b", "group-link"]
    assert image.read("srv/b") == b"shared" and image.stat("srv/b").nlink == 1
    # a hard link into a lower layer shares that file's inode
    g, gl = image.stat("etc/group"), image.stat("srv/group-link")
    assert g.ino == gl.ino and g.nlink == gl.nlink == 2
    assert image.read("srv/group-link") == b"root:x:0:\n"
    ix = image.index
    assert ix.stat(image.lookup("etc/group")).ino == ix.stat(image.lookup("srv/group-link")).ino
    null, sda, fifo = image.stat("dev/null"), image.stat("dev/sda"), image.stat("run/initctl")
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3) and stat.S_IMODE(null.mode) == 0o666
    assert stat.S_ISBLK(sda.mode) and sda.rdev == os.makedev(8, 0)
    assert stat.S_ISFIFO(fifo.mode)
    assert image.stat("bin").is_symlink and image.readlink("bin") == "usr/bin"
    assert image.index.xattrs(image.lookup("etc/cap")) == {
        b"security.capability": b"\x01\x00\x00\x02\xff\xfe", b"user.note": "h\u00e9llo".encode()}
    home = image.stat("home/user")
    assert (home.uid, home.gid, stat.S_IMODE(home.mode)) == (1000, 1000, 0o700)
    assert image.read("usr/lib/new.so") == b"new"


def write_layered_docker_save(path: str) -> str:
    """The three-layer test image as a docker save archive (layer 3 stored gzip-compressed)."""
    layers = [layer1(), layer2(), layer3()]
    write_docker_save(str(path), layers, layer_files=layers[:2] + [compress(layers[2], "gz")])
    return str(path)


# ---------------------------------------------------------------------------------------------
# plain tars


def sample_tar() -> bytes:
    return tar_bytes([
        member("./", mode=0o750, mtime=5),
        member("etc/hosts", b"hosts\n", mtime=1_700_000_000),
        member("etc/hosts.bak", type=tarfile.LNKTYPE, linkname="etc/hosts"),
        member("lib/big.bin", os.urandom(300_000)),
        member("lib/empty", b""),
        member("sbin", type=tarfile.SYMTYPE, linkname="/usr/sbin"),
        member("deep/a/b/c/file", b"deep"),  # parents synthesised
        member("dev/zero", type=tarfile.CHRTYPE, devmajor=1, devminor=5),
        member("dev/fifo", type=tarfile.FIFOTYPE),
        member("owned", b"o", uid=4242, gid=77, mode=0o4755),
    ])


def test_a_plain_tar_builds_with_its_metadata(store, tmp_path):
    data = sample_tar()
    path = write_file(tmp_path / "root.tar", data)
    result = casfs.build(store, path, tag="plain")
    image = store.open_image("plain")
    assert result.entries == len(list(image.walk()))
    root = image.stat("")
    assert stat.S_IMODE(root.mode) == 0o750 and root.mtime_ns == 5 * 10**9
    assert image.listdir("") == ["deep", "dev", "etc", "lib", "owned", "sbin"]
    assert image.read("etc/hosts") == b"hosts\n"
    assert image.stat("etc/hosts").mtime_ns == 1_700_000_000 * 10**9
    h, b = image.stat("etc/hosts"), image.stat("etc/hosts.bak")
    assert h.ino == b.ino and h.nlink == b.nlink == 2
    with tarfile.open(path) as tf:
        expected_big = tf.extractfile("lib/big.bin").read()
    assert image.read("lib/big.bin") == expected_big
    assert image.stat("lib/empty").size == 0 and image.read("lib/empty") == b""
    assert image.readlink("sbin") == "/usr/sbin"  # an absolute target is kept as data
    synth = image.stat("deep/a/b")
    assert synth.is_dir and stat.S_IMODE(synth.mode) == 0o755 and (synth.uid, synth.mtime_ns) == (0, 0)
    assert image.read("deep/a/b/c/file") == b"deep"
    assert image.stat("dev/zero").rdev == os.makedev(1, 5) and stat.S_ISFIFO(image.stat("dev/fifo").mode)
    o = image.stat("owned")
    assert (o.uid, o.gid, stat.S_IMODE(o.mode)) == (4242, 77, 0o4755)


def test_whiteout_names_in_a_plain_tar_are_ordinary_files(store, tmp_path):
    path = write_file(tmp_path / "x.tar", tar_bytes([member("a", b"1"), member(".wh.a", b""),
                                                     member("d/.wh..wh..opq", b"")]))
    casfs.build(store, path, tag="t")
    image = store.open_image("t")
    assert image.listdir("") == [".wh.a", "a", "d"] and image.listdir("d") == [".wh..wh..opq"]


@pytest.mark.parametrize("how", ["gz", "bz2", "xz", "zst"])
def test_a_compressed_tar_builds_the_same_image_as_the_plain_one(store, tmp_path, how):
    data = sample_tar()
    plain = casfs.build(store, write_file(tmp_path / "p.tar", data))
    packed = casfs.build(store, write_file(tmp_path / f"p.tar.{how}", compress(data, how)), tag="c")
    assert packed.image_id == plain.image_id
    assert store.open_image("c").read("etc/hosts") == b"hosts\n"


def test_gnu_format_long_names_are_read(store, tmp_path):
    long_name = "d/" + "n" * 200 + "/file"  # needs a GNU long-name header
    path = write_file(tmp_path / "gnu.tar", tar_bytes([member(long_name, b"long"),
                                                       member("l", type=tarfile.SYMTYPE, linkname="x" * 300)],
                                                      tarfile.GNU_FORMAT))
    casfs.build(store, path, tag="g")
    image = store.open_image("g")
    assert image.read(long_name) == b"long" and image.readlink("l") == "x" * 300


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed (it writes the sparse archives)")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_files_written_by_gnu_tar_read_back_with_their_holes(store, tmp_path, fmt):
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(tree / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(3 << 20)
        f.write(b"tail")
    path = tmp_path / "sparse.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "-cf", str(path), "-C", str(tree), "sparse"], check=True)
    with tarfile.open(path) as tf:
        assert tf.getmember("sparse").issparse()  # the archive really is sparse
    casfs.build(store, str(path), tag="s")
    image = store.open_image("s")
    assert image.read("sparse") == b"head" + b"\0" * ((3 << 20) - 4) + b"tail"


# ---------------------------------------------------------------------------------------------
# docker save


def test_a_docker_save_archive_applies_its_layers_with_whiteouts(store, tmp_path):
    path = write_layered_docker_save(tmp_path / "img.tar")
    result = casfs.build(store, path, tag="layered")
    assert result.entries == len(list(store.open_image("layered").walk()))
    assert_layered_image(store.open_image("layered"))


def test_a_gzipped_docker_save_builds_the_same_image(store, tmp_path):
    path = write_layered_docker_save(tmp_path / "img.tar")
    with open(path, "rb") as f:
        gz = write_file(tmp_path / "img.tar.gz", compress(f.read(), "gz"))
    assert casfs.build(store, gz, tag="gz").image_id == casfs.build(store, path).image_id
    assert_layered_image(store.open_image("gz"))


def test_hard_links_share_one_inode_and_their_content_is_read_once(store, tmp_path):
    body = os.urandom(200_000)
    path = write_file(tmp_path / "l.tar", tar_bytes(
        [member("a", body)] + [member(f"l{i}", type=tarfile.LNKTYPE, linkname="a") for i in range(5)]))
    result = casfs.build(store, path, tag="t")
    image = store.open_image("t")
    assert {image.stat(f"l{i}").ino for i in range(5)} == {image.stat("a").ino}
    assert image.stat("a").nlink == 6 and image.read("l4") == body
    assert result.pack.bytes_in == result.pack.bytes_new_raw == len(body)  # read and stored once


def test_a_docker_save_layer_may_be_a_symlink_to_another_layer_file(store, tmp_path):
    base = tar_bytes([member("f", b"1")])
    top = tar_bytes([member("g", b"2")])
    ids = [hashlib.sha256(x).hexdigest() for x in (base, top)]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()
    path = write_file(tmp_path / "s.tar", tar_bytes([
        member("c.json", config),
        member(f"{ids[0]}/layer.tar", base),
        member(f"{ids[1]}/layer.tar", top),
        member("again/layer.tar", type=tarfile.SYMTYPE, linkname=f"../{ids[0]}/layer.tar"),
        member("manifest.json", json.dumps([{"Config": "c.json", "RepoTags": None, "Layers": [
            f"{ids[0]}/layer.tar", f"{ids[1]}/layer.tar", "again/layer.tar"]}]).encode()),
    ]))
    casfs.build(store, path, tag="t")
    image = store.open_image("t")
    assert image.listdir("") == ["f", "g"] and image.read("f") == b"1"


def test_a_tar_with_a_manifest_json_that_is_not_docker_s_is_a_plain_tar(store, tmp_path):
    path = write_file(tmp_path / "m.tar", tar_bytes([member("manifest.json", b'{"name": "app"}'),
                                                     member("app.py", b"print()")]))
    casfs.build(store, path, tag="t")
    assert store.open_image("t").listdir("") == ["app.py", "manifest.json"]


def test_a_docker_save_of_several_images_is_refused_with_their_tags(store, tmp_path):
    lay = tar_bytes([member("f", b"1")])
    path = write_file(tmp_path / "two.tar", tar_bytes([
        member("l/layer.tar", lay),
        member("manifest.json", json.dumps([{"Config": "x", "RepoTags": ["a:1"], "Layers": ["l/layer.tar"]},
                                            {"Config": "y", "RepoTags": ["b:2"], "Layers": ["l/layer.tar"]}]).encode()),
    ]))
    with pytest.raises(casfs.BuildError, match=r"2 images \(a:1, b:2\)"):
        casfs.build(store, path)


def test_a_docker_save_naming_a_missing_layer_is_refused(store, tmp_path):
    path = write_file(tmp_path / "miss.tar", tar_bytes([
        member("manifest.json", json.dumps([{"Config": "x", "Layers": ["nope/layer.tar"]}]).encode())]))
    with pytest.raises(casfs.BuildError, match="names layer 'nope/layer.tar', which is not in the archive"):
        casfs.build(store, path)


# ---------------------------------------------------------------------------------------------
# property: any small tree round-trips byte for byte

_names = st.text(alphabet="abcé_-.0", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
_trees = st.dictionaries(st.lists(_names, min_size=1, max_size=3).map("/".join),
                         st.binary(max_size=3000), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=_trees, how=st.sampled_from(["none", "gz", "zst"]))
def test_random_trees_round_trip_through_a_tar_byte_for_byte(files, how):
    # a path may not be both a file and the parent of another path
    files = {p: d for p, d in files.items() if not any(q.startswith(p + "/") for q in files)}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_file(os.path.join(tmp, "t.tar"),
                          compress(tar_bytes([member(p, d) for p, d in files.items()]), how))
        store = casfs.open_store(os.path.join(tmp, "store"))
        try:
            casfs.build(store, path, tag="h", chunk_size=4096)
            image = store.open_image("h")
            for p, d in files.items():
                assert image.read(p) == d
                assert image.stat(p).size == len(d)
            built = {p for p, s in image.walk() if s.is_file}
            assert built == set(files)
        finally:
            store.close()


def nanosecond_tree(root) -> str:
    """A small real tree whose files, directories and symlink have sub-microsecond mtimes."""
    os.makedirs(root / "d")
    (root / "a").write_bytes(b"hi\n")
    (root / "d" / "b").write_bytes(b"x\n")
    os.symlink("a", root / "l")
    for k, p in enumerate(["a", "d/b", "d", "."]):
        os.utime(root / p, ns=(1_700_000_000_123_456_789 + k, 1_700_000_000_123_456_789 + 7 * k + 10))
    os.utime(root / "l", ns=(0, 1_700_000_000_987_654_321), follow_symlinks=False)
    os.utime(root, ns=(0, 1_700_000_000_123_456_800))  # pax writes ".1234568": trailing zeros cut
    return str(root)


def gnu_pax_tar(src: str, dest) -> bytes:
    """The tree as GNU tar's POSIX (pax) format writes it: mtimes as decimal text with ns."""
    subprocess.run(["tar", "--format=posix", "-C", src, "-cf", str(dest), "."], check=True)
    return open(dest, "rb").read()


def test_a_tar_keeps_nanosecond_mtimes_so_a_tree_and_its_tar_give_one_image_id(store, tmp_path):
    src = nanosecond_tree(tmp_path / "src")
    data = gnu_pax_tar(src, tmp_path / "t.tar")
    assert b"mtime=1700000000.987654321" in data
    from_dir = casfs.build(store, src, progress=False)
    from_tar = casfs.build(store, str(tmp_path / "t.tar"), progress=False)
    image = store.open_image(from_tar.image_id)
    assert image.stat("l").mtime_ns == 1_700_000_000_987_654_321
    assert image.stat("").mtime_ns == 1_700_000_000_123_456_800
    assert from_tar.image_id == from_dir.image_id


@pytest.mark.parametrize("text,ns", [("-1.5", -1_500_000_000), ("0.000000001", 1), ("12", 12 * 10**9),
                                     ("1.1234567899", 1_123_456_789), ("99999999999999999999", (1 << 63) - 1)])
def test_pax_mtimes_are_read_exactly_from_their_text(store, tmp_path, text, ns):
    ti = tarfile.TarInfo("f")
    ti.pax_headers = {"mtime": text}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(b""))
    r = casfs.build(store, write_file(tmp_path / "t.tar", buf.getvalue()), progress=False)
    assert store.open_image(r.image_id).stat("f").mtime_ns == ns
