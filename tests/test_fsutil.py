"""casfs.fsutil: atomic replacement of files and directories, with optional durability."""

import json
import os

import pytest

import casfs
from casfs.objects.local import LocalObjectStore


def _no_temps(d) -> bool:
    return not [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"old")
    casfs.atomic_write(str(p), b"new contents")
    assert p.read_bytes() == b"new contents"
    casfs.atomic_write(str(p), "text is utf-8: \u00e9")
    assert p.read_text(encoding="utf-8") == "text is utf-8: \u00e9"
    assert _no_temps(tmp_path)


def test_a_failed_rename_keeps_the_old_target_and_removes_the_temporary(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "inside").write_text("x")  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        casfs.atomic_write(str(target), b"data")
    assert (target / "inside").read_text() == "x"
    assert _no_temps(tmp_path)


def test_atomic_write_can_create_the_directories_and_use_a_separate_temp_dir(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = tmp_path / "a" / "b" / "f"
    casfs.atomic_write(str(p), b"x", tmp_dir=str(tmp), makedirs=True, fsync=True)
    assert p.read_bytes() == b"x"
    assert os.listdir(tmp) == []


def test_fsync_flushes_the_file_and_every_directory_it_touched(tmp_path, monkeypatch):
    """A spy on os.fsync (the real call still runs) records what was flushed."""
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    p = tmp_path / "new" / "f"
    casfs.atomic_write(str(p), b"x", fsync=True, makedirs=True)
    assert str(tmp_path) in synced            # the new directory's entry in its parent
    assert str(tmp_path / "new") in synced    # the file's entry after the rename
    assert any(s.endswith(".tmp") for s in synced)  # the data, before the rename
    synced.clear()
    casfs.atomic_write(str(p), b"y")
    assert synced == []


def test_atomic_open_commits_on_success_and_discards_on_error(tmp_path):
    p = tmp_path / "r.json"
    with casfs.atomic_open(str(p)) as f:
        json.dump({"a": 1}, f)
    assert json.loads(p.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with casfs.atomic_open(str(p)) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert json.loads(p.read_text()) == {"a": 1}
    assert _no_temps(tmp_path)
    with pytest.raises(ValueError):
        with casfs.atomic_open(str(p), "a"):
            pass


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "tree"
    with casfs.atomic_directory(str(dest)) as d:
        (open(os.path.join(d, "f"), "w")).close()
        assert not dest.exists()
    assert (dest / "f").exists()
    other = tmp_path / "other"
    with pytest.raises(RuntimeError):
        with casfs.atomic_directory(str(other)) as d:
            raise RuntimeError("boom")
    assert not other.exists()
    with pytest.raises(OSError):  # dest is taken by a full directory: the loser cleans up
        with casfs.atomic_directory(str(dest)) as d:
            open(os.path.join(d, "g"), "w").close()
    assert sorted(os.listdir(tmp_path)) == ["tree"]


def test_the_local_blob_store_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    """Issue 17: a put that returned survives a power loss, name included (spy on os.fsync)."""
    store = LocalObjectStore(str(tmp_path / "s"))
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    store.put("chunks/" + "ab" * 32, b"frame")
    assert str(tmp_path / "s" / "chunks" / "ab") in synced
    assert os.listdir(tmp_path / "s" / "tmp") == []
