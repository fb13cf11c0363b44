"""casfs mount: real FUSE mounts of real images, read back through the kernel.

Every test here mounts through /dev/fuse (as root) and reads with ordinary syscalls; the
daemon is a real process (forked by ``casfs.mount`` or started by the ``casfs`` CLI), observed
through its control socket and /proc. Only ``test_forget_releases_kernel_references`` calls
the request handlers directly, because the kernel sends FORGET only under memory pressure.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import stat as statmod
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import casfs
from casfs.index import EntrySpec, serialize
from casfs.layout import chunk_key

pytestmark = pytest.mark.fuse


def _skip_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "real FUSE mounts with kernel tuning need root"
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as e:
        return f"pyfuse3/trio not installed ({e}): pip install 'casfs[fuse]'"
    return None


if _skip_reason():
    pytest.skip(_skip_reason(), allow_module_level=True)

from casfs.fuse.mount import MountError, control, is_mounted, read_record  # noqa: E402

CHUNK = 64 << 10  # small chunks: multi-chunk files stay small


def _wait(cond, what: str, timeout: float = 30.0):
    """Poll ``cond`` until it returns a truthy value (a bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except OSError:
        return True


@pytest.fixture
def runtime(monkeypatch):
    """A private runtime dir (short path: it holds the control socket)."""
    d = tempfile.mkdtemp(prefix="cfr", dir="/tmp")
    monkeypatch.setenv("CASFS_RUNTIME_DIR", d)
    yield d
    subprocess.run(["rm", "-rf", d], check=False)


@pytest.fixture
def mounts(runtime):
    """Mount helper: ``mounts(image, mnt, **opts)``; everything is unmounted at teardown."""
    made: list[str] = []

    def do(image, mnt, **kw):
        os.makedirs(mnt, exist_ok=True)
        info = casfs.mount(image, str(mnt), **kw)
        made.append(info.mountpoint)
        return info

    yield do
    for mp in made:
        if is_mounted(mp) or read_record(mp):
            try:
                casfs.unmount(mp)
            except MountError:
                pass


def _make_tree(root: str) -> dict:
    """A source tree with every kind of entry a container root has."""
    rnd = random.Random(7)
    os.makedirs(os.path.join(root, "etc", "empty"))
    os.makedirs(os.path.join(root, "usr", "lib", "python3"))
    files = {
        "etc/hosts": b"127.0.0.1 localhost\n",
        "etc/empty.conf": b"",
        "usr/lib/libbig.so": rnd.randbytes(5 * CHUNK + 1234),  # several chunks, odd tail
        "usr/lib/exact.bin": rnd.randbytes(2 * CHUNK),  # ends on a chunk boundary
        "usr/lib/python3/os.py": b"import sys\n" * 300,
        "usr/lib/zeros": bytes(3 * CHUNK),  # identical chunks: deduplicated
    }
    for i in range(40):
        files[f"usr/lib/python3/mod{i:02d}.py"] = f"# module {i}\n".encode() * (i + 1)
    for rel, data in files.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    os.chmod(os.path.join(root, "etc/hosts"), 0o600)
    os.chmod(os.path.join(root, "usr/lib/libbig.so"), 0o755)
    os.chown(os.path.join(root, "etc/hosts"), 1234, 5678)
    os.chown(os.path.join(root, "etc/empty"), 4321, 8765)
    os.symlink("../etc/hosts", os.path.join(root, "usr/hosts-link"))
    os.symlink("python3/os.py", os.path.join(root, "usr/lib/os-link"))
    os.symlink("/nonexistent/target", os.path.join(root, "dangling"))
    os.link(os.path.join(root, "usr/lib/exact.bin"), os.path.join(root, "usr/lib/exact-hardlink"))
    os.link(os.path.join(root, "usr/lib/exact.bin"), os.path.join(root, "etc/exact-hardlink2"))
    for rel, ns in (("etc/hosts", 1_600_000_000_123_456_789), ("usr/lib/libbig.so", 1_500_000_000_000_000_001)):
        os.utime(os.path.join(root, rel), ns=(ns, ns))
    for dirpath, dirnames, _ in os.walk(root, topdown=False):  # directories last: writes touch them
        for d in dirnames:
            os.utime(os.path.join(dirpath, d), ns=(1_400_000_000_000_000_000,) * 2)
    return files


def _xattrs_supported(path: str) -> bool:
    probe = os.path.join(path, ".xattr-probe")
    open(probe, "wb").close()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        os.unlink(probe)


@pytest.fixture(scope="module")
def tree_image(tmp_path_factory):
    """(store, image, source root, files, has_xattrs) built once for the module."""
    base = tmp_path_factory.mktemp("tree")
    src = str(base / "src")
    os.makedirs(src)
    files = _make_tree(src)
    has_x = _xattrs_supported(src)
    if has_x:
        os.setxattr(os.path.join(src, "etc/hosts"), "user.casfs.note", b"kept")
        os.setxattr(os.path.join(src, "etc/empty"), "user.dir.attr", b"\x00\x01binary")
        os.setxattr(os.path.join(src, "usr/lib/libbig.so"), "user.empty", b"")
    store = casfs.open_store(str(base / "store"))
    casfs.build(store, src, tag="tree", chunk_size=CHUNK, progress=False)
    yield store, store.open_image("tree"), src, files, has_x
    store.close()


def _walk(root: str) -> dict[str, os.stat_result]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.lstat(full)
    return out


def test_a_mount_forks_its_daemon_only_while_the_store_has_started_no_worker_threads(tmp_path):
    """``casfs.mount`` forks the daemon (fast) unless the store has started worker threads,
    which a forked child would lack; it asks the store (``TieredStore.threads_started``), not
    the store's private pools."""
    from casfs.fuse.daemon import forkable

    write_tree = __import__("conftest").write_tree
    write_tree(tmp_path / "src", {f"f{i}": os.urandom(3000) for i in range(4)})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", progress=False)
    with casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache")) as s:
        image = s.open_image("t")
        assert not s.chunks.threads_started()
        assert forkable(image) == (threading.active_count() == 1)
        assert image.read("f1")  # a miss filled into the ssd tier: the write-back thread starts
        s.chunks.flush()
        assert s.chunks.threads_started() and not forkable(image)


def test_a_mounted_image_matches_its_source_tree(tree_image, mounts, tmp_path):
    store, image, src, files, has_x = tree_image
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    want, got = _walk(src), _walk(mnt)
    assert sorted(got) == sorted(want)
    for rel, s in want.items():
        m = got[rel]
        assert (m.st_mode, m.st_uid, m.st_gid, m.st_mtime_ns) == (s.st_mode, s.st_uid, s.st_gid, s.st_mtime_ns), rel
        if not statmod.S_ISDIR(s.st_mode):
            assert m.st_size == s.st_size, rel
        assert m.st_nlink == s.st_nlink, rel
        assert m.st_ino == image.index.stat(image.lookup(rel)).ino, rel  # stable: from the index
        if statmod.S_ISLNK(s.st_mode):
            assert os.readlink(os.path.join(mnt, rel)) == os.readlink(os.path.join(src, rel))
        elif statmod.S_ISREG(s.st_mode):
            with open(os.path.join(src, rel), "rb") as f:
                want_bytes = f.read()
            with open(os.path.join(mnt, rel), "rb") as f:
                assert f.read() == want_bytes, rel
            assert m.st_blocks == (s.st_size + 511) // 512
    # the root itself
    assert os.lstat(mnt).st_ino == 1 and statmod.S_ISDIR(os.lstat(mnt).st_mode)
    # symlinks resolve inside the mount
    with open(os.path.join(mnt, "usr/hosts-link"), "rb") as f:
        assert f.read() == files["etc/hosts"]
    assert os.path.exists(os.path.join(mnt, "dangling")) is False
    st = os.statvfs(mnt)
    assert st.f_files == image.index.n_entries and st.f_namemax == 255


def test_extended_attributes_are_served(tree_image, mounts, tmp_path):
    store, image, src, files, has_x = tree_image
    if not has_x:
        pytest.skip(f"the filesystem under {src} does not support user.* xattrs")
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    for rel in ("etc/hosts", "etc/empty", "usr/lib/libbig.so", "usr/lib/exact.bin"):
        want = {n: os.getxattr(os.path.join(src, rel), n, follow_symlinks=False)
                for n in os.listxattr(os.path.join(src, rel), follow_symlinks=False)}
        p = os.path.join(mnt, rel)
        got = {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
        assert got == want, rel
    assert any(want for want in [os.listxattr(os.path.join(mnt, "etc/hosts"))])
    with pytest.raises(OSError) as e:
        os.getxattr(os.path.join(mnt, "etc/hosts"), "user.absent")
    assert e.value.errno == errno.ENODATA


def test_hard_links_share_one_inode(tree_image, mounts, tmp_path):
    store, image, src, files, has_x = tree_image
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    a, b, c = (os.lstat(os.path.join(mnt, p)) for p in
               ("usr/lib/exact.bin", "usr/lib/exact-hardlink", "etc/exact-hardlink2"))
    assert a.st_ino == b.st_ino == c.st_ino
    assert a.st_nlink == 3
    assert a.st_ino > image.index.n_entries  # hard-link inodes live above the entry numbers
    others = {os.lstat(os.path.join(mnt, p)).st_ino for p in ("etc/hosts", "usr/lib/libbig.so", "usr/lib/zeros")}
    assert a.st_ino not in others and len(others) == 3


def test_writes_are_refused_as_a_read_only_filesystem(tree_image, mounts, tmp_path):
    store, image, src, files, has_x = tree_image
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    attempts = [
        lambda: open(os.path.join(mnt, "etc/hosts"), "r+b"),
        lambda: open(os.path.join(mnt, "new-file"), "wb"),
        lambda: os.mkdir(os.path.join(mnt, "newdir")),
        lambda: os.unlink(os.path.join(mnt, "etc/hosts")),
        lambda: os.rename(os.path.join(mnt, "etc/hosts"), os.path.join(mnt, "etc/hosts2")),
        lambda: os.chmod(os.path.join(mnt, "etc/hosts"), 0o777),
        lambda: os.symlink("x", os.path.join(mnt, "newlink")),
        lambda: os.setxattr(os.path.join(mnt, "etc/hosts"), "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    with open(os.path.join(mnt, "etc/hosts"), "rb") as f:  # still readable
        assert f.read() == files["etc/hosts"]


def test_concurrent_readers_of_big_and_small_files_get_the_right_bytes(tree_image, mounts, tmp_path):
    store, image, src, files, has_x = tree_image
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    names = sorted(files)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(60):
            rel = rnd.choice(names)
            data = files[rel]
            fd = os.open(os.path.join(mnt, rel), os.O_RDONLY)
            try:
                off = rnd.randrange(0, len(data) + 1)
                n = rnd.choice([1, 100, 4096, CHUNK, 3 * CHUNK + 7])
                if os.pread(fd, n, off) != data[off:off + n]:
                    errors.append(f"{rel} at {off}+{n}")
            finally:
                os.close(fd)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_directory_of_100k_entries_lists_fully_and_looks_up(store, mounts, tmp_path):
    n = 100_000
    specs = [EntrySpec("", statmod.S_IFDIR | 0o755), EntrySpec("big", statmod.S_IFDIR | 0o755)]
    specs += [EntrySpec(f"big/f{i:06d}", statmod.S_IFREG | 0o644, mtime_ns=i) for i in range(n)]
    store.tag("wide", store.put_index(serialize(specs, [], CHUNK)))
    image = store.open_image("wide")
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    names = os.listdir(os.path.join(mnt, "big"))  # many readdir calls, each resuming at an offset
    assert len(names) == n and len(set(names)) == n
    assert sorted(names)[0] == "f000000" and sorted(names)[-1] == f"f{n - 1:06d}"
    for i in (0, 1, 4242, 77_777, n - 1):
        st = os.lstat(os.path.join(mnt, "big", f"f{i:06d}"))
        assert st.st_mtime_ns == i and st.st_size == 0
    assert not os.path.exists(os.path.join(mnt, "big", "f100000"))


def test_hard_links_and_lookups_use_stable_inode_numbers_across_mounts(tree_image, mounts, tmp_path):
    store, image, src, files, has_x = tree_image
    first = {}
    mnt1, mnt2 = str(tmp_path / "m1"), str(tmp_path / "m2")
    mounts(image, mnt1)
    mounts(image, mnt2)
    for rel in ("etc/exact-hardlink2", "usr/lib/python3/mod07.py", "usr", "dangling"):
        first[rel] = os.lstat(os.path.join(mnt1, rel)).st_ino
        assert os.lstat(os.path.join(mnt2, rel)).st_ino == first[rel]


def _delete_object(store, key: str) -> None:
    kind, _, name = key.partition("/")
    os.unlink(os.path.join(store.objects.root, kind, name[:2], name))


def test_an_unavailable_chunk_is_eio_for_its_file_while_others_read(tmp_path, mounts):
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(3)
    broken = rnd.randbytes(3 << 20)  # random: 2 MiB frames stay loose chunk objects (no pack)
    fine = rnd.randbytes(5 << 20)
    (src / "broken.bin").write_bytes(broken)
    (src / "fine.bin").write_bytes(fine)
    store = casfs.open_store(str(tmp_path / "store"))  # no ssd cache tier
    casfs.build(store, str(src), tag="t", chunk_size=2 << 20, progress=False)
    image = store.open_image("t")
    ref = image.chunk_refs(image.lookup("broken.bin"))[0]
    assert ref.pack is None, "the test needs a loose chunk object"
    _delete_object(store, chunk_key(ref.digest))
    mnt = str(tmp_path / "mnt")
    info = mounts(image, mnt)
    with open(os.path.join(mnt, "broken.bin"), "rb") as f:
        with pytest.raises(OSError) as e:
            f.read()
    assert e.value.errno == errno.EIO
    with open(os.path.join(mnt, "fine.bin"), "rb") as f:
        assert f.read() == fine
    assert sorted(os.listdir(mnt)) == ["broken.bin", "fine.bin"]  # the mount keeps serving
    assert control(mnt, "stats")["mount"]["eio"] >= 1
    with open(info.log) as f:
        log = f.read()
    assert "broken.bin" in log and ref.digest.hex() in log


def _cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "casfs.cli.main", *args], capture_output=True, text=True,
                       env=env, timeout=120)
    if check and p.returncode:
        raise AssertionError(f"casfs {' '.join(args)} failed ({p.returncode}): {p.stderr}")
    return p


def test_the_cli_mounts_and_umount_leaves_nothing_behind(tree_image, runtime, tmp_path):
    store, image, src, files, has_x = tree_image
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    env = dict(os.environ, CASFS_RUNTIME_DIR=runtime)
    _cli("--store", store.url, "mount", "tree", mnt, env=env)
    rec = read_record(mnt)
    assert rec is not None and not _gone(rec.pid) and rec.image_id == image.id
    assert is_mounted(mnt)
    with open(os.path.join(mnt, "etc/hosts"), "rb") as f:
        assert f.read() == files["etc/hosts"]
    _cli("umount", mnt, env=env)
    with open("/proc/mounts") as f:
        assert mnt not in f.read()
    assert _gone(rec.pid)
    assert read_record(mnt) is None and not os.path.exists(rec.socket)
    assert os.listdir(mnt) == []  # the bare directory is back
    p = _cli("umount", mnt, env=env, check=False)
    assert p.returncode == 1 and "no casfs mount" in p.stderr


def test_sigterm_to_the_daemon_unmounts_cleanly(tree_image, mounts, tmp_path):
    store, image, src, files, has_x = tree_image
    mnt = str(tmp_path / "mnt")
    info = mounts(image, mnt)
    fd = os.open(os.path.join(mnt, "usr/lib/libbig.so"), os.O_RDONLY)  # an open file does not block it
    try:
        os.kill(info.pid, signal.SIGTERM)
        _wait(lambda: _gone(info.pid), "the daemon to exit")
        with open("/proc/mounts") as f:
            assert mnt not in f.read()
        assert read_record(mnt) is None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def test_mounting_onto_a_busy_or_missing_mountpoint_fails_clearly(tree_image, mounts, tmp_path):
    store, image, src, files, has_x = tree_image
    with pytest.raises(MountError, match="mount point does not exist"):
        casfs.mount(image, str(tmp_path / "absent"))
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    with pytest.raises(MountError, match="already mounted"):
        casfs.mount(image, mnt)


def test_a_log_file_the_daemon_cannot_write_is_refused_before_mounting(tree_image, mounts, tmp_path):
    """``--log-file`` in a missing directory (or a directory) failed the daemon with "exited
    before mounting (see <that log>)", a log that could not exist."""
    store, image, src, files, has_x = tree_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for log, why in ((tmp_path / "no" / "such.log", "No such file or directory"), (tmp_path, "Is a directory")):
        with pytest.raises(MountError, match=f"log file {log}: cannot write it \\({why}\\)"):
            casfs.mount(image, str(mnt), log_file=str(log))
        assert not is_mounted(str(mnt))


def test_a_recorded_profile_is_replayed_into_the_memory_tier(tree_image, mounts, runtime, tmp_path):
    store, image, src, files, has_x = tree_image
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt, record_profile=300.0, replay_profile=False)
    touched = ["usr/lib/python3/os.py", "usr/lib/libbig.so", "etc/hosts"]
    for rel in touched:
        with open(os.path.join(mnt, rel), "rb") as f:
            f.read()
    env = dict(os.environ, CASFS_RUNTIME_DIR=runtime)
    out = _cli("profile", "stop", mnt, env=env).stdout
    assert f"profiles/{image.id}" in out
    casfs.unmount(mnt)
    assert store.objects.contains(f"profiles/{image.id}")

    shown = _cli("--store", store.url, "profile", "show", "tree", env=env).stdout
    for rel in touched:
        assert "/" + rel in shown
    assert "total:" in shown

    from casfs.profiles import load_profile

    prof = load_profile(store, image.id)
    expect = {r.digest for r in prof.refs()}
    want_chunks = {r.digest for rel in touched for r in image.chunk_refs(image.lookup(rel))}
    assert want_chunks <= expect

    mounts(image, mnt)  # replays the profile
    stats = _wait(lambda: (s := control(mnt, "stats"))["replay"] and s["replay"]["done"] and s, "replay to finish")
    assert stats["replay"]["failed"] == 0
    assert stats["replay"]["fetched"] + stats["replay"]["already_cached"] == len(prof.refs())
    tiers = {t["tier"]: t for t in stats["tiers"]}
    assert stats["mount"]["reads"] == 0  # nothing was read yet: the replay alone warmed memory
    assert tiers["memory"]["puts"] >= len(expect)
    blob_before = tiers["blob"]["hits"]
    for rel in touched:
        with open(os.path.join(mnt, rel), "rb") as f:
            assert f.read() == files[rel]
    after = {t["tier"]: t for t in control(mnt, "stats")["tiers"]}
    assert after["blob"]["hits"] == blob_before  # every profiled chunk came from memory


def test_sequential_reads_issue_readahead_prefetches(tmp_path, mounts):
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(5).randbytes(16 << 20)
    (src / "model.bin").write_bytes(data)
    (src / "other.bin").write_bytes(data[: 4 << 20])
    store = casfs.open_store(str(tmp_path / "store"))
    casfs.build(store, str(src), tag="t", chunk_size=CHUNK, progress=False)
    image = store.open_image("t")
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    with open(os.path.join(mnt, "model.bin"), "rb") as f:
        while f.read(256 << 10):
            pass
    s = control(mnt, "stats")["mount"]
    assert s["sequential_reads"] > 0 and s["prefetch_chunks"] > 0
    mnt2 = str(tmp_path / "mnt2")
    mounts(image, mnt2, readahead=False)
    with open(os.path.join(mnt2, "other.bin"), "rb") as f:
        assert f.read() == data[: 4 << 20]
    s2 = control(mnt2, "stats")["mount"]
    assert s2["prefetch_chunks"] == 0 and s2["sequential_reads"] == 0


def _safetensors_bytes(n_tensors: int, each: int) -> tuple[bytes, int]:
    header, off = {}, 0
    for k in range(n_tensors):
        header[f"layer{k}.weight"] = {"dtype": "F32", "shape": [each // 4], "data_offsets": [off, off + each]}
        off += each
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    body = random.Random(9).randbytes(off)
    return len(h).to_bytes(8, "little") + h + body, 8 + len(h)


def test_reading_a_safetensors_header_prefetches_its_tensors(tmp_path, mounts):
    src = tmp_path / "src"
    src.mkdir()
    blob, data_start = _safetensors_bytes(12, 200_000)
    (src / "model.safetensors").write_bytes(blob)
    store = casfs.open_store(str(tmp_path / "store"))
    casfs.build(store, str(src), tag="t", chunk_size=CHUNK, progress=False)
    image = store.open_image("t")
    n_chunks = len(image.chunk_refs(image.lookup("model.safetensors")))
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt, read_ahead_kb=4)  # the kernel reads only what is asked for
    with open(os.path.join(mnt, "model.safetensors"), "rb", buffering=0) as f:
        assert f.read(8) == blob[:8]
    stats = _wait(lambda: (s := control(mnt, "stats"))["mount"]["safetensors_hints"] and
                  {t["tier"]: t for t in s["tiers"]}["memory"]["puts"] >= n_chunks and s,
                  "the tensor chunks to be prefetched", timeout=10)
    assert stats["mount"]["read_bytes"] < data_start + (1 << 20)  # the reader asked for the header only
    assert stats["mount"]["prefetch_chunks"] >= n_chunks - 1 - data_start // CHUNK


def test_forget_releases_kernel_references(tree_image):
    """Handlers called directly: the kernel sends FORGET only when it evicts inodes."""
    import trio

    from casfs.fuse.ops import CasfsOperations

    store, image, src, files, has_x = tree_image
    ops = CasfsOperations(image)

    async def run() -> tuple[int, int]:
        etc = await ops.lookup(1, b"etc")
        hosts = await ops.lookup(etc.st_ino, b"hosts")
        await ops.lookup(etc.st_ino, b"hosts")
        link = await ops.lookup(etc.st_ino, b"exact-hardlink2")
        missing = await ops.lookup(etc.st_ino, b"nope")
        assert missing.st_ino == 0  # a negative entry the kernel may cache
        assert ops.known_inodes == 3
        await ops.forget([(hosts.st_ino, 1)])
        assert ops.known_inodes == 3  # looked up twice, forgotten once
        await ops.forget([(hosts.st_ino, 1), (etc.st_ino, 1)])
        assert (await ops.getattr(link.st_ino)).st_nlink == 3  # a hard-link inode resolves
        return ops.known_inodes, link.st_ino

    known, link_ino = trio.run(run)
    assert known == 1 and link_ino > image.index.n_entries


def test_a_process_with_threads_gets_a_re_executed_daemon(tree_image, mounts, tmp_path):
    """Forking a threaded process is unsafe: mount() starts `casfs mount --foreground` instead."""
    store, image, src, files, has_x = tree_image
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        mnt = str(tmp_path / "mnt")
        info = mounts(image, mnt)
    finally:
        stop.set()
        t.join()
    with open(f"/proc/{info.pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"--foreground" in argv and b"--ready-fd" in argv
    with open(os.path.join(mnt, "usr/lib/libbig.so"), "rb") as f:
        assert f.read() == files["usr/lib/libbig.so"]
    casfs.unmount(mnt)
    assert _gone(info.pid) and not is_mounted(mnt)


def test_a_store_without_a_memory_tier_serves_multi_chunk_files(tree_image, mounts, tmp_path):
    store, image, src, files, has_x = tree_image
    bare = casfs.open_store(store.url, memory_bytes=0)  # (a spawned daemon keeps that too)
    try:
        mnt = str(tmp_path / "mnt")
        mounts(bare.open_image("tree"), mnt, read_ahead_kb=4)  # 4 KiB requests: many per chunk
        for rel in ("usr/lib/libbig.so", "usr/lib/zeros", "usr/lib/exact.bin"):
            fd = os.open(os.path.join(mnt, rel), os.O_RDONLY)
            try:
                got = b"".join(iter(lambda: os.read(fd, 4096), b""))
            finally:
                os.close(fd)
            assert got == files[rel]
        s = control(mnt, "stats")
        assert [t["tier"] for t in s["tiers"]][0] == "blob"
        assert s["mount"]["inline_hits"] > 0  # the kernel's requests inside one chunk shared a fetch
    finally:
        bare.close()


def test_a_spawned_daemon_serves_with_the_stores_own_tiers(tree_image, mounts, tmp_path, monkeypatch):
    """A process with threads cannot fork its daemon, so ``casfs.mount`` spawns ``casfs mount``,
    which reopened the store by URL with default tiers: the store's AZ cache servers and its
    memory size were lost (and which one a test got depended on the threads earlier tests
    left running). The spawned daemon now gets them."""
    from casfs.cacheserver import CacheServer
    from casfs.fuse import daemon
    from casfs.objects.local import LocalObjectStore
    from casfs.store import Store
    from casfs.tiers.azcache import AzCacheTier

    store, image, src, files, has_x = tree_image
    monkeypatch.setattr(daemon, "forkable", lambda image: False)
    monkeypatch.delenv("CASFS_AZCACHE", raising=False)
    with CacheServer(LocalObjectStore(store.objects.root)) as server:
        own = Store(LocalObjectStore(store.objects.root), memory_bytes=0, extra_tiers=[AzCacheTier([server.url])])
        try:
            mnt = str(tmp_path / "mnt")
            mounts(own.open_image("tree"), mnt)
            with open(os.path.join(mnt, "usr/lib/libbig.so"), "rb") as f:
                assert f.read() == files["usr/lib/libbig.so"]
            tiers = [t["tier"] for t in control(mnt, "stats")["tiers"]]
            assert "memory" not in tiers and tiers[0] == "azcache", tiers
        finally:
            own.close()


def test_a_build_from_a_tree_with_an_unreadable_file_names_the_file(mounts, tmp_path):
    """A source file that fails to read (here EIO: it lies on a casfs mount whose chunk is gone)
    ended the build with a bare "Input/output error"; the error names the file now."""
    from conftest import write_tree

    write_tree(tmp_path / "src", {"ok.txt": b"fine\n", "lib/big.bin": os.urandom(3 << 20)})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", progress=False)
        for key in list(s.objects.list("chunks/")):
            s.objects.delete(key)  # big.bin's (loose) chunks vanish
        mounts(s.open_image("t"), str(tmp_path / "mnt"))
        p = subprocess.run([sys.executable, "-m", "casfs.cli.main", "--store", str(tmp_path / "other"), "build",
                            str(tmp_path / "mnt"), "-t", "copy"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == ("casfs: error: lib/big.bin: cannot read it (Input/output error); "
                                                 "fix it or leave it out of the source")


def test_umount_cleans_up_after_a_killed_daemon(tree_image, mounts, runtime, tmp_path):
    store, image, src, files, has_x = tree_image
    mnt = str(tmp_path / "mnt")
    info = mounts(image, mnt)
    os.kill(info.pid, signal.SIGKILL)
    _wait(lambda: _gone(info.pid), "the daemon to die")
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # a stale mount, as left by a crash
    env = dict(os.environ, CASFS_RUNTIME_DIR=runtime)
    _cli("umount", mnt, env=env)
    assert not is_mounted(mnt) and read_record(mnt) is None
    assert os.listdir(mnt) == []


def test_recorded_permissions_are_enforced_for_other_users(tree_image, mounts):
    """With allow_other, another user reads what the recorded modes allow, and nothing else."""
    store, image, src, files, has_x = tree_image
    base = tempfile.mkdtemp(prefix="cfp", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        mnt = os.path.join(base, "mnt")
        mounts(image, mnt, allow_other=True)
        nobody = dict(user=65534, group=65534, capture_output=True)
        ok = subprocess.run(["cat", os.path.join(mnt, "usr/lib/python3/os.py")], **nobody)
        assert ok.returncode == 0 and ok.stdout == files["usr/lib/python3/os.py"]
        denied = subprocess.run(["cat", os.path.join(mnt, "etc/hosts")], **nobody)  # 0600, uid 1234
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
        assert subprocess.run(["cat", os.path.join(mnt, "etc/hosts")], capture_output=True).returncode == 0
    finally:
        if is_mounted(os.path.join(base, "mnt")):
            casfs.unmount(os.path.join(base, "mnt"))
        subprocess.run(["rm", "-rf", base], check=False)


def test_a_read_only_mount_stops_the_kernel_sending_flush_and_unused_xattr_requests(tmp_path, mounts):
    """FLUSH (on every close) and GETXATTR (on an image without xattrs) are answered ENOSYS
    once, so the kernel stops sending them: fewer round trips per opened file."""
    src = tmp_path / "src"
    write = {f"f{i}": os.urandom(100 + i) for i in range(20)}
    for name, data in write.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    store = casfs.open_store(str(tmp_path / "store"))
    casfs.build(store, str(src), tag="t", progress=False)
    image = store.open_image("t")
    assert not image.index.has_xattrs
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    for name, data in write.items():
        with open(os.path.join(mnt, name), "rb") as f:
            assert f.read() == data
    with pytest.raises(OSError) as e:
        os.getxattr(os.path.join(mnt, "f1"), "user.x")
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError):
        os.getxattr(os.path.join(mnt, "f2"), "user.x")
    st = control(mnt, "stats")["mount"]
    assert st["opens"] == 20 and st["flushes"] <= 1 and st["getxattrs"] <= 1


def test_files_with_different_chunk_sizes_read_right_through_the_mount(tmp_path, mounts):
    # the default build: a weight file in 16 MiB chunks beside code in 512 KiB chunks
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(21)
    weights = rng.randbytes((16 << 20) + 3 * 4096 + 5)
    code = (b"import os\nprint(os.getcwd())\n" * 60000)[: (3 << 19) + 77]
    (src / "model.safetensors").write_bytes(weights)
    (src / "lib.so").write_bytes(code)
    store = casfs.open_store(str(tmp_path / "store"))
    casfs.build(store, str(src), tag="t", progress=False)
    image = store.open_image("t")
    assert image.file_chunk_size(image.lookup("lib.so")) == casfs.CODE_CHUNK_SIZE
    assert image.file_chunk_size(image.lookup("model.safetensors")) == casfs.WEIGHT_CHUNK_SIZE
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    for name, data in (("lib.so", code), ("model.safetensors", weights)):
        path = os.path.join(mnt, name)
        fd = os.open(path, os.O_RDONLY)
        try:
            for off in (0, (1 << 19) - 3, 1 << 19, (16 << 20) - 2, len(data) - 10,
                        *(rng.randrange(len(data)) for _ in range(8))):
                assert os.pread(fd, 70000, off) == data[off:off + 70000], (name, off)
        finally:
            os.close(fd)
        with open(path, "rb") as f:
            assert f.read() == data, name


def test_an_image_in_index_format_version_1_mounts_and_reads(tmp_path, mounts):
    import shutil

    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "store-index-v1"), tmp_path / "v1")
    store = casfs.open_store(str(tmp_path / "v1"))
    image = store.open_image("v1")
    assert image.index.version == 1
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt)
    rng = random.Random(13)
    want = bytes(rng.getrandbits(8) for _ in range(10000))
    with open(os.path.join(mnt, "a.bin"), "rb") as f:
        assert f.read() == want
    with open(os.path.join(mnt, "dir/link"), "rb") as f:
        assert f.read() == want
    assert os.stat(os.path.join(mnt, "dir/b.py")).st_ino == os.stat(os.path.join(mnt, "dir/b2.py")).st_ino


def test_a_small_read_through_the_mount_fetches_only_its_blocks(tmp_path, mounts):
    """A 4 KiB read of a 4 MiB chunk fetches the block table and one 64 KiB block; once the
    blocks are held locally (the ssd tier) the next mount reads them inline."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(8 << 20)
    (src / "weights.bin").write_bytes(data)
    store = casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    casfs.build(store, str(src), tag="t", progress=False)
    image = store.open_image("t")
    mnt = str(tmp_path / "mnt")
    mounts(image, mnt, readahead=False)
    fd = os.open(os.path.join(mnt, "weights.bin"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead: 4 KiB requests
        for off in (5_000_000, 123_456, 7_777_777):
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
    finally:
        os.close(fd)
    st = control(mnt, "stats")
    blob = next(t for t in st["tiers"] if t["tier"] == "blob")
    assert st["mount"]["block_reads"] >= 3
    assert blob["bytes_read"] <= 3 * ((64 << 10) + 4096) + 3 * 8192  # blocks and block tables
    casfs.unmount(mnt)
    store.close()
    store = casfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    mounts(store.open_image("t"), mnt, readahead=False)
    fd = os.open(os.path.join(mnt, "weights.bin"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for off in (5_000_000, 123_456, 7_777_777):
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
    finally:
        os.close(fd)
    st = control(mnt, "stats")
    assert next(t for t in st["tiers"] if t["tier"] == "blob")["bytes_read"] == 0
    assert st["mount"]["inline_local"] >= 1  # block tables known, blocks in the ssd: no thread
    store.close()
