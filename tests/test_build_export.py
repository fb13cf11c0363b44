"""build -> export reproduces a tree bit-exact, metadata included; builds dedup; exports are atomic."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import casfs
from casfs.errors import ChunkUnavailable
from casfs import export as export_image

from conftest import write_tree

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789._- ", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))


@st.composite
def tree_specs(draw):
    """A list of operations that make a real tree: dirs, files, symlinks, hard links, xattrs."""
    ops = []
    dirs = [""]
    files = []
    taken = set()
    for _ in range(draw(st.integers(1, 25))):
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        path = f"{parent}/{name}" if parent else name
        if path in taken:
            continue
        taken.add(path)
        kind = draw(st.sampled_from(["dir", "file", "file", "symlink", "hardlink"]))
        mode = draw(st.sampled_from([0o644, 0o600, 0o755, 0o444, 0o4755, 0o1777 & 0o777]))
        mtime = draw(st.integers(0, 2**33)) * 10**9 + draw(st.integers(0, 10**9 - 1))
        if kind == "dir":
            dirs.append(path)
            ops.append(("dir", path, mode | 0o700, mtime))
        elif kind == "file" or (kind == "hardlink" and not files):
            size = draw(st.sampled_from([0, 1, 100, 4095, 4096, 4097, 20000]))
            data = draw(st.binary(min_size=size, max_size=size)) if size < 200 else os.urandom(size)
            xattr = draw(st.one_of(st.none(), st.binary(max_size=30)))
            files.append(path)
            ops.append(("file", path, mode, mtime, data, xattr))
        elif kind == "symlink":
            ops.append(("symlink", path, draw(st.sampled_from(["../x", "/etc/passwd", "a/b", "."]))))
        else:
            ops.append(("hardlink", path, draw(st.sampled_from(files))))
    return ops


def _make(root, ops):
    os.makedirs(root)
    dir_times = []
    for op in ops:
        p = os.path.join(root, op[1])
        if op[0] == "dir":
            os.mkdir(p)
            os.chmod(p, op[2])
            dir_times.append((p, op[3]))
        elif op[0] == "file":
            with open(p, "wb") as f:
                f.write(op[4])
            if op[5] is not None:
                os.setxattr(p, "user.casfs", op[5])
            os.chmod(p, op[2])
            os.utime(p, ns=(op[3], op[3]))
        elif op[0] == "symlink":
            os.symlink(op[2], p)
        else:
            os.link(os.path.join(root, op[2]), p)
    for p, t in reversed(dir_times):
        os.utime(p, ns=(t, t))


def _snapshot(root):
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns + [""]:
            p = os.path.join(dp, n) if n else dp
            rel = os.path.relpath(p, root)
            st_ = os.lstat(p)
            rec = [st_.st_mode, st_.st_uid, st_.st_gid, st_.st_nlink]
            if not stat.S_ISLNK(st_.st_mode):
                rec.append(st_.st_mtime_ns)
            if stat.S_ISREG(st_.st_mode):
                rec.append(open(p, "rb").read())
                rec.append(sorted((k, os.getxattr(p, k)) for k in os.listxattr(p)))
            if stat.S_ISLNK(st_.st_mode):
                rec.append(os.readlink(p))
            out[rel] = rec
    return out


def _inode_groups(root):
    groups = {}
    for dp, _, fns in os.walk(root):
        for n in fns:
            p = os.path.join(dp, n)
            st_ = os.lstat(p)
            if stat.S_ISREG(st_.st_mode):
                groups.setdefault(st_.st_ino, set()).add(os.path.relpath(p, root))
    return sorted(sorted(g) for g in groups.values())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=tree_specs(), cs_log=st.sampled_from([12, 13, 22]))
def test_build_then_export_reproduces_a_tree_bit_exact_with_metadata(tmp_path_factory, ops, cs_log):
    d = tmp_path_factory.mktemp("rt")
    _make(str(d / "src"), ops)
    with casfs.open_store(str(d / "store")) as store:
        casfs.build(store, str(d / "src"), tag="t", chunk_size=1 << cs_log, progress=False)
        export_image(store.open_image("t"), str(d / "out"), progress=False)
    assert _snapshot(str(d / "out")) == _snapshot(str(d / "src"))
    assert _inode_groups(str(d / "out")) == _inode_groups(str(d / "src"))


def test_building_the_same_tree_twice_with_one_file_changed_stores_only_that_file(tmp_path, store):
    files = {f"lib/m{i}.py": os.urandom(3000) for i in range(50)}
    files["big.bin"] = os.urandom(9 << 20)
    write_tree(tmp_path / "src", files)
    r1 = casfs.build(store, str(tmp_path / "src"), tag="v1", progress=False)
    (tmp_path / "src" / "lib" / "m7.py").write_bytes(b"changed")
    r2 = casfs.build(store, str(tmp_path / "src"), tag="v2", progress=False)
    assert r1.image_id != r2.image_id
    assert r2.pack.chunks_new == 1 and r2.pack.bytes_new_raw == len(b"changed")
    assert store.open_image("v2").read("big.bin") == files["big.bin"]
    assert store.open_image("v1").read("lib/m7.py") == files["lib/m7.py"]


def test_identical_files_are_stored_once(tmp_path, store):
    blob = os.urandom(100_000)
    write_tree(tmp_path / "src", {f"copy{i}": blob for i in range(10)})
    r = casfs.build(store, str(tmp_path / "src"), tag="t", progress=False)
    assert r.pack.chunks_new == 1 and r.pack.chunks_reused == 9


def test_an_export_that_fails_leaves_nothing_behind(tmp_path):
    write_tree(tmp_path / "src", {"a": os.urandom(5000), "b/c": os.urandom(3 << 20)})
    store = casfs.open_store(str(tmp_path / "store"), memory_bytes=0)
    casfs.build(store, str(tmp_path / "src"), tag="t", chunk_size=1 << 20, progress=False)
    for dp, _, fs in os.walk(tmp_path / "store" / "chunks"):
        for f in fs:
            os.unlink(os.path.join(dp, f))
    with pytest.raises(ChunkUnavailable):
        export_image(store.open_image("t"), str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src", "store"]
    store.close()


def test_export_refuses_an_existing_destination(tmp_path, store):
    write_tree(tmp_path / "src", {"a": b"x"})
    casfs.build(store, str(tmp_path / "src"), tag="t", progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        export_image(store.open_image("t"), str(tmp_path / "out"), progress=False)


def test_build_rejects_bad_chunk_sizes_and_tags(tmp_path, store):
    write_tree(tmp_path / "src", {"a": b"x"})
    with pytest.raises(casfs.BuildError, match="power of two"):
        casfs.build(store, str(tmp_path / "src"), tag="t", chunk_size=5000)
    with pytest.raises(ValueError, match="invalid tag"):
        casfs.build(store, str(tmp_path / "src"), tag="../evil")
    with pytest.raises(casfs.BuildError, match="no such file"):
        casfs.build(store, str(tmp_path / "missing"), tag="t")
