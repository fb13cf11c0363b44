"""gc against running builds and copies (issue 17, defect 2): leases in the store, honoured by
gc, and the final existence check before an index is written.

Every race here is reproduced for real: a build (or copy) is held at a known point by a gate in
its source (a real directory whose one file's opener waits for the test), and gc runs meanwhile
as a `casfs gc` process (local store) or in the test process against moto's real S3 server.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import casfs
from casfs.build.directory import DirectorySource
from casfs.copy import copy_image
from casfs.gc import collect
from casfs.leases import Lease, hold_gc, read_leases
from conftest import write_tree

BIG = 2 << 20  # frames over 1 MiB are loose chunk objects; smaller ones go into packs


class GatedSource:
    """A real directory source whose file ``gate`` blocks in its opener until ``release``."""

    parallel_reads = True

    def __init__(self, root: str, gate: str) -> None:
        self.inner = DirectorySource(root)
        self.description = self.inner.description
        self.gate = gate
        self.reached = threading.Event()
        self.release = threading.Event()

    def entries(self):
        for e in self.inner.entries():
            if e.spec.path == self.gate and e.open is not None:
                inner_open = e.open

                def gated(inner_open=inner_open):
                    self.reached.set()
                    assert self.release.wait(60), "the test never opened the gate"
                    return inner_open()

                e.open = gated
            yield e

    def close(self) -> None:
        self.inner.close() if hasattr(self.inner, "close") else None


def _trees(tmp_path):
    old = {"w.bin": os.urandom(BIG), "lib/a.py": b"a" * 3000, "lib/b.py": os.urandom(5000)}
    new = dict(old)
    new["0-gate.txt"] = b"gate"  # first in build order: everything reused is placed after it
    new["z-new.bin"] = os.urandom(BIG)
    write_tree(tmp_path / "old", old)
    write_tree(tmp_path / "new", new)
    return old, new


def _age_everything(root) -> None:
    for dirpath, _, names in os.walk(root):
        for n in names:
            os.utime(os.path.join(dirpath, n), (1e9, 1e9))


def _build_in_thread(store, source, tag):
    out: dict = {}

    def run():
        try:
            out["result"] = casfs.build(store, source, tag=tag, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _check_export(store, tag, files, dest):
    casfs.export(store.open_image(tag), str(dest), progress=False)
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data, rel


def _cli(args, store_root, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", str(store_root), *args],
                          capture_output=True, text=True, env=env, timeout=120, **kw)


def test_gc_run_mid_build_keeps_the_chunks_the_build_reuses_from_an_untagged_image(tmp_path):
    """The reported race: a build reuses chunks of an older image, the older image's tag is
    removed, and `casfs gc` (default grace: the old objects are a day old) runs while the build
    is still running. The build must end with a tagged image whose every byte exports."""
    old, new = _trees(tmp_path)
    root = tmp_path / "store"
    with casfs.open_store(str(root)) as store:
        casfs.build(store, str(tmp_path / "old"), tag="old", progress=False)
        _age_everything(root)
        src = GatedSource(str(tmp_path / "new"), "0-gate.txt")
        t, out = _build_in_thread(store, src, "new")
        assert src.reached.wait(30)
        store.untag("old")
        gc = _cli(["gc"], root)
        assert gc.returncode == 0, gc.stderr
        src.release.set()
        t.join(60)
        assert "error" not in out, out.get("error")
        assert out["result"].pack.chunks_reused >= 1  # it did reuse the old image's chunks
        _check_export(store, "new", new, tmp_path / "export")
        assert "build(s)/copy(ies) running" in gc.stdout, gc.stdout
        assert not list(store.objects.list("leases/"))  # released


def test_a_build_stores_again_from_its_source_a_reused_chunk_that_vanished_mid_build(tmp_path, capsys):
    """The final check before tagging: an object the build reuses is deleted behind every lease
    (an outside cleaner, a lease that lapsed); the build notices, stores the chunk again from
    its source, and the tagged image exports."""
    old, new = _trees(tmp_path)
    with casfs.open_store(str(tmp_path / "store")) as store:
        casfs.build(store, str(tmp_path / "old"), tag="old", progress=False)
        victims = list(store.objects.list("chunks/")) + list(store.objects.list("packs/"))
        assert len(victims) >= 2
        src = GatedSource(str(tmp_path / "new"), "0-gate.txt")
        t, out = _build_in_thread(store, src, "new")
        assert src.reached.wait(30)
        for key in victims:
            store.objects.delete(key)
        src.release.set()
        t.join(60)
        assert "error" not in out, out.get("error")
        assert "storing their chunks again from the source" in capsys.readouterr().err
        _check_export(store, "new", new, tmp_path / "export")


def test_a_build_waits_for_a_running_gc_before_it_trusts_the_tags(tmp_path):
    """A build that starts while a gc holds its lease waits until that gc is done (the gc may
    have read the tags before the build pinned anything), then builds normally."""
    _, new = _trees(tmp_path)
    with casfs.open_store(str(tmp_path / "store")) as store:
        gc_lease = hold_gc(store.objects)
        t, out = _build_in_thread(store, str(tmp_path / "new"), "new")
        time.sleep(1.5)
        assert t.is_alive() and not out, "the build did not wait for the running gc"
        gc_lease.release()
        t.join(60)
        assert "error" not in out, out.get("error")
        _check_export(store, "new", new, tmp_path / "export")


def test_gc_removes_a_lapsed_lease_and_no_longer_honours_it(tmp_path):
    """A writer that crashed leaves its lease; once it lapsed gc ignores and removes it."""
    with casfs.open_store(str(tmp_path / "store")) as store:
        (tmp_path / "t").mkdir()
        write_tree(tmp_path / "t", {"f": os.urandom(BIG)})
        casfs.build(store, str(tmp_path / "t"), tag="t", progress=False)
        image_id = store.resolve("t")
        crashed = Lease(store.objects, "build", ttl=0.01)
        crashed.pins = [image_id]
        crashed.put()
        live = read_leases(store.objects)
        assert len(live) == 1 and live[0].pins == [image_id]
        time.sleep(0.05)
        store.untag("t")
        r = collect(store, grace_seconds=0, )
        # SKEW keeps a just-lapsed lease honoured for 30 s: the crashed writer still protects
        assert r.deleted == 0 and r.writers
        for lease in read_leases(store.objects):  # a lease that lapsed long ago
            store.objects.put(lease.key, b'{"kind":"build","created":1,"expires":2,"pins":["%s"]}'
                              % image_id.encode())
        r = collect(store, grace_seconds=0)
        assert r.leases_removed == 1 and not r.writers
        assert r.deleted >= 2  # the image's index and chunk went
        assert not list(store.objects.list("leases/"))


def test_gc_removes_stale_temporary_files_of_killed_writers_but_not_fresh_ones(tmp_path):
    with casfs.open_store(str(tmp_path / "store")) as store:
        tmp = tmp_path / "store" / "tmp"
        (tmp / ".x.123.tmp").write_bytes(b"k" * 1000)
        os.utime(tmp / ".x.123.tmp", (1e9, 1e9))
        (tmp / ".y.456.tmp").write_bytes(b"fresh")
        r = collect(store, grace_seconds=3600)
        assert r.tmp_removed == 1 and r.tmp_bytes == 1000
        assert sorted(os.listdir(tmp)) == [".y.456.tmp"]
        r = collect(store, grace_seconds=0)  # never a temporary file a put may still rename
        assert sorted(os.listdir(tmp)) == [".y.456.tmp"]


class _GatedObjects:
    """A real object store whose ``get`` of one key waits for the test (to hold a copy)."""

    def __init__(self, inner, key: str) -> None:
        self.inner, self.key = inner, key
        self.url, self.read_only = inner.url, inner.read_only
        self.reached, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get(self, key):
        if key == self.key:
            self.reached.set()
            assert self.release.wait(60)
        return self.inner.get(key)


def test_gc_in_the_destination_mid_copy_keeps_the_objects_the_copy_found_there(tmp_path):
    """`casfs copy` skips objects the destination has; if their image there is untagged and gc
    runs before the copy writes its index, they must survive (the copy's lease names them)."""
    old, new = _trees(tmp_path)
    src_root, dst_root = tmp_path / "src", tmp_path / "dst"
    with casfs.open_store(str(src_root)) as src, casfs.open_store(str(dst_root)) as dst:
        casfs.build(src, str(tmp_path / "old"), tag="old", progress=False)
        casfs.build(src, str(tmp_path / "new"), tag="new", progress=False)
        copy_image(src, dst, "old", progress=False)  # the destination holds old's objects
        _age_everything(dst_root)
        new_only = {k for k in src.objects.list("chunks/")} - {k for k in dst.objects.list("chunks/")}
        gated = _GatedObjects(src.objects, sorted(new_only)[0])
        src.objects = gated
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(r=copy_image(src, dst, "new", threads=1, progress=False)))
        t.start()
        assert gated.reached.wait(30)
        dst.untag("old")
        r = collect(dst, grace_seconds=3600)
        gated.release.set()
        t.join(60)
        assert "r" in out
        src.objects = gated.inner
        _check_export(dst, "new", new, tmp_path / "export")
        assert r.writers


# -- S3 (moto's real server) ------------------------------------------------------------------

boto3 = pytest.importorskip("boto3", reason="S3 stores need boto3")
from casfs.objects.s3 import S3ObjectStore  # noqa: E402
from tests.support import MOTO_SERVER, missing_binary, moto_server  # noqa: E402

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def s3_endpoint():
    if missing_binary(MOTO_SERVER) is not None:
        pytest.skip(f"{missing_binary(MOTO_SERVER)} (pip install 'moto[server]')")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "CASFS_S3_ENDPOINT"):
            mp.delenv(var, raising=False)
        with moto_server() as url:
            S3ObjectStore("casfs-leases", endpoint_url=url).create_bucket()
            yield url


def test_gc_on_s3_mid_build_keeps_reused_chunks_and_the_builds_own_uploads(tmp_path, s3_endpoint):
    """The same race on S3 (moto's server), with gc's grace at 0: the lease alone must keep both
    the untagged image's reused objects and the objects the build already uploaded."""
    old, new = _trees(tmp_path)
    # uploaded before the gate: a loose chunk, then enough small files to push it out of the
    # packer's window (64 items) so that it is placed and uploaded while the gate holds
    first = {"+a-upload.bin": os.urandom(BIG), **{f"+b{i:03d}": b"%d" % i for i in range(70)}}
    write_tree(tmp_path / "new", first)
    new_first = {**new, **first}
    objects = S3ObjectStore("casfs-leases", f"g{next(_prefixes)}", endpoint_url=s3_endpoint)
    store = casfs.Store(objects, memory_bytes=0)
    casfs.build(store, str(tmp_path / "old"), tag="old", progress=False)
    src = GatedSource(str(tmp_path / "new"), "0-gate.txt")
    t, out = _build_in_thread(store, src, "new")
    assert src.reached.wait(30)
    time.sleep(0.5)  # the loose chunk before the gate is uploaded by now
    store.untag("old")
    r = collect(store, grace_seconds=0)
    src.release.set()
    t.join(120)
    assert "error" not in out, out.get("error")
    _check_export(store, "new", new_first, tmp_path / "export")
    assert r.writers and r.leased >= 1, r
    assert not list(objects.list("leases/"))
    r = collect(store, grace_seconds=0)  # with no writer left, only old's own garbage goes
    _check_export(store, "new", new_first, tmp_path / "export2")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_build_stopped_by_sigterm_or_sighup_cleans_up_as_ctrl_c_does(tmp_path, sig):
    """``kill``/``timeout`` (SIGTERM) or a closed terminal (SIGHUP) used to kill a command on
    the spot, leaving its writer lease (and temp files) behind; now every casfs command stops
    as on Ctrl-C: one line, status 128 + signal, its lease released. The build is held in a
    known state by a running gc's lease (a build waits for it)."""
    _, new = _trees(tmp_path)
    with casfs.open_store(str(tmp_path / "store")) as store:
        gc_lease = hold_gc(store.objects)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.Popen([sys.executable, "-m", "casfs.cli.main", "--store", str(tmp_path / "store"),
                              "build", str(tmp_path / "new"), "-t", "new", "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            assert "waiting for gc" in p.stderr.readline()  # its lease is taken, it waits
            assert {lease.kind for lease in read_leases(store.objects)} == {"gc", "build"}
            p.send_signal(sig)
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 128 + sig, err
        assert err.strip().splitlines() == [f"casfs: interrupted{'' if sig == signal.SIGINT else ' by ' + sig.name}"]
        assert [lease.kind for lease in read_leases(store.objects)] == ["gc"]  # the build's is gone
        assert "new" not in store.tags()
        gc_lease.release()
        assert not os.listdir(tmp_path / "store" / "tmp")
