"""Regressions found by a correctness review of the read/write paths (one test per bug)."""

from __future__ import annotations

import os
import threading

import pytest

import casfs
from casfs.build import build_image
from casfs import chunk as chunkmod
from casfs import fsutil
from casfs.index import ChunkRef
from casfs.tiers.ssd import SsdTier

from conftest import write_tree


def test_two_threads_putting_one_chunk_into_the_ssd_tier_count_its_bytes_once(tmp_path, monkeypatch):
    """Both puts pass the "already cached?" check before either renames its file into place
    (a barrier on ``os.replace``, the rename inside ``casfs.fsutil.atomic_write``, forces that
    interleaving; the files and threads are real)."""
    tier = SsdTier(str(tmp_path / "ssd"), capacity=1 << 20)
    digest, frame = chunkmod.encode(b"x" * 1000)
    ref = ChunkRef(digest, 1000, len(frame))
    barrier = threading.Barrier(2, timeout=10)
    real_rename = os.replace

    def rename_together(src, dst):
        barrier.wait()
        real_rename(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", rename_together)
    threads = [threading.Thread(target=tier.put, args=(ref, frame)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(fsutil.os, "replace", real_rename)
    assert tier.used == len(frame)
    tier.delete(ref)
    assert tier.used == 0


def test_a_torn_cached_index_falls_back_to_the_store_copy(tmp_path):
    """A cached index file that is corrupt (torn by a crash: the cache is not fsynced) must
    not make the image unopenable: the blob store's verified copy is authoritative."""
    src = tmp_path / "src"
    write_tree(src, {"a.txt": b"hello" * 100})
    with casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache")) as s:
        image_id = build_image(s, str(src), tag="t", progress=False).image_id
        s.open_image("t")  # fills cache/indexes/<id>
    cached = tmp_path / "cache" / "indexes" / image_id
    assert cached.exists()
    cached.write_bytes(b"")  # what a power loss after the rename can leave
    with casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache")) as s:
        assert s.open_image("t").read("a.txt") == b"hello" * 100


def test_gc_keeps_old_objects_that_a_young_untagged_index_reuses(tmp_path):
    """A build (or copy) that reused existing objects has stored its index but not yet set its
    tag: gc must not sweep the reused objects just because they are old and the image they came
    from lost its tag, or the tag set a moment later points at missing chunks."""
    from casfs.gc import collect

    big = os.urandom(2 << 20)  # frames over 1 MiB are loose chunk objects
    a, b = tmp_path / "a", tmp_path / "b"
    write_tree(a, {"w.bin": big})
    write_tree(b, {"w.bin": big, "extra.txt": b"new"})
    root = tmp_path / "store"
    with casfs.open_store(str(root)) as s:
        build_image(s, str(a), tag="old", progress=False)
        new_id = build_image(s, str(b), tag=None, progress=False).image_id  # reuses w.bin's chunks
        s.untag("old")
        for dirpath, _, names in os.walk(root):  # everything is a day old ...
            for n in names:
                os.utime(os.path.join(dirpath, n), (1e9, 1e9))
        os.utime(root / "indexes" / new_id[:2] / new_id)  # ... but the new build's index
        collect(s, grace_seconds=3600)
        s.tag("new", new_id)
    with casfs.open_store(str(root)) as s:
        assert s.open_image("new").read("w.bin") == big


def test_an_ssd_file_that_vanished_is_cached_again_on_the_next_put(tmp_path):
    """A cache file deleted behind the tier's back (a tmp cleaner, an eviction racing a put of
    the same digest) must not leave a ghost LRU entry that turns every later put into a no-op."""
    tier = SsdTier(str(tmp_path / "ssd"), capacity=1 << 20)
    digest, frame = chunkmod.encode(b"y" * 1000)
    ref = ChunkRef(digest, 1000, len(frame))
    tier.put(ref, frame)
    os.unlink(tier.path_of(digest))
    assert tier.get(ref) is None
    assert tier.read_into(ref, memoryview(bytearray(1000))) is None
    tier.put(ref, frame)
    assert tier.get(ref) == frame
    assert tier.used == len(frame)


def test_gc_refuses_to_run_while_a_tag_is_unreadable(tmp_path):
    import os

    import casfs
    from casfs.gc import collect

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(5000))
    store = casfs.open_store(str(tmp_path / "store"))
    casfs.build(store, str(src), tag="t", progress=False)
    store.objects.put("tags/t", b"\xff\xfe not utf-8")
    with pytest.raises(casfs.StoreError, match="unreadable"):
        collect(store, grace_seconds=0)
    assert list(store.objects.list("packs/"))  # nothing swept
    store.close()


def _gc_cli(store_dir: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", store_dir, "gc", "--grace", "0"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("content", [b"bad id\n", b"deadbeef\n", b"../../etc\n", b"\xff\xfe\n"])
def test_gc_refuses_in_one_line_naming_the_tag_when_a_tag_file_is_not_an_image_id(tmp_path, content):
    """A tag file holding anything but an image id (a corrupt or hand-edited tag) used to end
    gc with "invalid object key 'indexes/bad id'"; now gc names the tag and what to do, and
    sweeps nothing."""
    src = tmp_path / "src"
    write_tree(src, {"f": os.urandom(5000)})
    with casfs.open_store(str(tmp_path / "store")) as store:
        casfs.build(store, str(src), tag="t", progress=False)
        store.objects.put("tags/gone", content)
        before = sorted(store.iter_objects())
    r = _gc_cli(str(tmp_path / "store"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "invalid object key" not in r.stderr
    assert "unreadable tag" in r.stderr and "'gone': its tag file is not an image id" in r.stderr
    assert "casfs rm gone" in r.stderr
    with casfs.open_store(str(tmp_path / "store")) as store:
        assert sorted(store.iter_objects()) == before


def test_gc_refuses_naming_the_tag_whose_image_lost_its_index(tmp_path):
    src = tmp_path / "src"
    write_tree(src, {"f": os.urandom(5000)})
    with casfs.open_store(str(tmp_path / "store")) as store:
        casfs.build(store, str(src), tag="t", progress=False)
        store.objects.put("tags/orphan", b"ab" * 32 + b"\n")
        before = sorted(store.iter_objects())
    r = _gc_cli(str(tmp_path / "store"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "tag orphan names image abababababab, whose index is missing" in r.stderr
    assert "casfs rm orphan" in r.stderr
    with casfs.open_store(str(tmp_path / "store")) as store:
        assert sorted(store.iter_objects()) == before


def test_gc_shows_a_tag_name_that_is_not_utf8_escaped_and_sweeps_nothing(tmp_path):
    src = tmp_path / "src"
    write_tree(src, {"f": os.urandom(5000)})
    with casfs.open_store(str(tmp_path / "store")) as store:
        image_id = casfs.build(store, str(src), progress=False).image_id  # tagged by the bad tag only
        before = sorted(store.iter_objects())
    (tmp_path / "store" / "tags" / "ba").mkdir(parents=True, exist_ok=True)
    with open(os.path.join(os.fsencode(tmp_path / "store" / "tags" / "ba"), b"bad\xff"), "w") as f:
        f.write(image_id + "\n")
    r = _gc_cli(str(tmp_path / "store"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "'bad\\xff': not a valid tag name" in r.stderr and "\\udc" not in r.stderr
    with casfs.open_store(str(tmp_path / "store")) as store:
        assert sorted(store.iter_objects()) == before


@pytest.mark.parametrize("grace", ["-5", "nan", "-inf"])
def test_gc_refuses_a_negative_or_nan_grace_period_and_deletes_nothing(tmp_path, grace):
    """``--grace nan`` compared as "not young" and deleted every unreferenced object at once,
    and ``--grace -5`` was taken as no grace period; both are refused now."""
    import subprocess
    import sys

    src = tmp_path / "src"
    write_tree(src, {"f": os.urandom(5000)})
    with casfs.open_store(str(tmp_path / "store")) as store:
        casfs.build(store, str(src), progress=False)  # untagged: all of it unreferenced, but young
        before = sorted(store.iter_objects())
    r = subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", str(tmp_path / "store"), "gc",
                        f"--grace={grace}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "use 0 or more seconds" in r.stderr, r.stderr
    with casfs.open_store(str(tmp_path / "store")) as store:
        assert sorted(store.iter_objects()) == before


def test_gc_on_a_read_only_store_says_where_to_run_it_before_touching_the_network():
    """gc on an http:// store failed writing its lease with "build into a local or S3 store and
    publish its directory", advice for builds. Nothing listens at this URL: the refusal comes
    before any request."""
    from casfs.gc import collect
    from casfs.objects.http import HttpObjectStore
    from casfs.store import Store

    with Store(HttpObjectStore("http://127.0.0.1:1/store/", attempts=1), memory_bytes=0) as store:
        with pytest.raises(casfs.StoreError, match=r"gc cannot delete through http://127.0.0.1:1/store/ "
                                                   r"\(a read-only store\): run it on the store"):
            collect(store)
