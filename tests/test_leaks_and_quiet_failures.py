"""Nothing left behind, nothing failing quietly: temporary files of killed writers, a --store
that does not exist, tags that cannot be read, warnings that drown an error, a damaged copy in
a copy's destination, and the directory flush after a rename."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import casfs
from casfs.layout import fanout_name

from conftest import write_tree

CASFS = [sys.executable, "-m", "casfs.cli.main"]


def run(args, env, check=True):
    p = subprocess.run(CASFS + args, env=env, capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"casfs {args} failed ({p.returncode}): {p.stderr}")
    return p


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["CASFS_HOME"] = str(tmp_path / "home")
    e.pop("CASFS_STORE", None)
    return e


def _killed_while_renaming(tmp_path, code: str, where) -> list[str]:
    """Run ``code`` in a real child process whose ``os.replace`` never returns (it is killed
    between writing its temporary file and renaming it); SIGKILL it once a temporary file
    appears in ``where``; return the temporary files it left, aged two minutes."""
    script = textwrap.dedent("""
        import os, sys, time
        os.replace = lambda *a, **k: time.sleep(3600)
        import casfs
    """) + textwrap.dedent(code)
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = [os.path.join(where, f) for f in os.listdir(where)] if os.path.isdir(where) else []
            left = [p for p in left if p.endswith(".tmp")]
            if left:
                break
            assert child.poll() is None, "the writer exited before it was killed"
            time.sleep(0.05)
        else:
            raise AssertionError("the writer never wrote its temporary file")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    old = time.time() - 120
    for p in left:
        os.utime(p, (old, old))
    return left


def test_a_killed_builds_temporary_files_are_removed_when_the_store_is_next_opened(tmp_path):
    write_tree(tmp_path / "src", {"f": os.urandom(100_000)})
    store_dir = tmp_path / "store"
    left = _killed_while_renaming(tmp_path, f"""
        casfs.build(casfs.open_store({str(store_dir)!r}), {str(tmp_path / 'src')!r}, progress=False)
    """, str(store_dir / "tmp"))
    assert all(os.path.exists(p) for p in left)
    # a live writer's temporary file (this process's pid) is never taken from under it
    live = store_dir / "tmp" / f".x.{os.getpid()}.1.2.tmp"
    live.write_bytes(b"in flight")
    os.utime(live, (time.time() - 120,) * 2)
    casfs.open_store(str(store_dir)).close()
    assert not any(os.path.exists(p) for p in left)
    assert live.exists()


def test_a_killed_index_cache_write_leaves_no_temporary_file_after_the_next_open(tmp_path):
    write_tree(tmp_path / "src", {"f": b"x"})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", progress=False)
    cache = tmp_path / "cache"
    left = _killed_while_renaming(tmp_path, f"""
        casfs.open_store({str(tmp_path / 'store')!r}, cache_dir={str(cache)!r}).open_image("t")
    """, str(cache / "indexes"))
    casfs.open_store(str(tmp_path / "store"), cache_dir=str(cache)).close()
    assert not any(os.path.exists(p) for p in left)


def test_a_failed_index_cache_write_leaves_no_temporary_file(tmp_path):
    """A real full disk: a 16 KiB tmpfs as the cache directory (needs root to mount)."""
    write_tree(tmp_path / "src", {f"f{i}": os.urandom(50) for i in range(2000)})
    with casfs.open_store(str(tmp_path / "store")) as s:
        r = casfs.build(s, str(tmp_path / "src"), tag="t", progress=False)
        assert len(s.index_frame(r.image_id)) > 16 << 10
    cache = tmp_path / "cache"
    cache.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(cache)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with casfs.open_store(str(tmp_path / "store"), cache_dir=str(cache)) as s:
            assert s.open_image("t").read("f1") is not None  # the read works without the cache
        leftovers = [f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".tmp")]
        assert leftovers == []
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_a_store_path_that_does_not_exist_is_an_error_not_an_empty_table(tmp_path, env):
    missing = tmp_path / "no-such-store"
    for args in (["--store", str(missing), "images"], ["images", "--store", str(missing)],
                 ["--store", f"file://{missing}", "ls", "x"], ["stats", "--store", str(missing)]):
        p = run(args, env, check=False)
        assert p.returncode == 1, args
        assert p.stderr.strip() == (f"casfs: error: --store {missing} does not exist (to start a new store "
                                    f"there, build into it or create the directory: mkdir -p {missing})")
        assert not missing.exists()
    p = run(["images"], {**env, "CASFS_STORE": str(missing)}, check=False)
    assert p.returncode == 1 and "$CASFS_STORE" in p.stderr and not missing.exists()
    # the default store is created on first use; a build creates the store it is told to use
    assert "TAG" in run(["images"], env).stdout
    assert os.path.isdir(tmp_path / "home" / "store")
    write_tree(tmp_path / "src", {"a": b"1"})
    p = run(["build", str(tmp_path / "src"), "--tag", "t", "--store", str(missing)], env)
    assert f"creating a new store at {missing}" in p.stderr
    assert "t " in run(["images", "--store", str(missing)], env).stdout


def test_global_options_are_accepted_after_the_command(tmp_path, env):
    write_tree(tmp_path / "src", {"a": b"hello"})
    run(["build", "--store", str(tmp_path / "s"), str(tmp_path / "src"), "--tag", "t"], env)
    assert run(["cat", "t", "a", "--store", str(tmp_path / "s")], env).stdout == "hello"
    assert run(["--store", str(tmp_path / "s"), "cat", "t", "a"], env).stdout == "hello"
    # a value before the command is not reset by the command's own parser
    assert "t " in run(["--store", str(tmp_path / "s"), "images", "-v"], env).stdout


def test_a_tag_that_is_not_utf8_or_not_text_is_listed_with_its_problem(tmp_path, env):
    write_tree(tmp_path / "src", {"a": b"1"})
    st = str(tmp_path / "s")
    run(["--store", st, "build", str(tmp_path / "src"), "--tag", "good"], env)
    image_id = open(os.path.join(st, "tags", fanout_name("good")), "rb").read()
    bad = os.path.join(st, "tags").encode() + b"/ba/bad\xff"
    os.makedirs(os.path.dirname(bad), exist_ok=True)
    open(bad, "wb").write(image_id)
    os.makedirs(os.path.join(st, "tags", "co"), exist_ok=True)
    open(os.path.join(st, "tags", "co", "corrupt"), "wb").write(b"\xff\xfe")
    out = run(["--store", st, "images"], env).stdout.splitlines()
    assert out[1].startswith("good")
    assert any(line.startswith("bad\\xff") and "not a valid tag name" in line for line in out)
    assert any(line.startswith("corrupt") and "not an image id" in line for line in out)
    with casfs.open_store(st) as s:
        assert set(s.tags()) == {"good"}
        assert {n for n, _ in s.unreadable_tags()} == {"bad\\xff", "corrupt"}


def test_an_export_over_corrupt_data_ends_with_its_one_error_line(tmp_path, env):
    files = {f"d/f{i:03d}": os.urandom(9000) for i in range(60)}
    write_tree(tmp_path / "src", files)
    st = str(tmp_path / "s")
    run(["--store", st, "build", str(tmp_path / "src"), "--tag", "t", "--chunk-size", "4096"], env)
    for dp, _, fs in os.walk(os.path.join(st, "chunks")):
        for f in fs:
            p = os.path.join(dp, f)
            raw = bytearray(open(p, "rb").read())
            raw[-1] ^= 1
            open(p, "wb").write(bytes(raw))
    for dp, _, fs in os.walk(os.path.join(st, "packs")):
        for f in fs:
            p = os.path.join(dp, f)
            raw = bytearray(open(p, "rb").read())
            for k in range(100, len(raw), 4000):
                raw[k] ^= 1
            open(p, "wb").write(bytes(raw))
    p = run(["--store", st, "export", "t", str(tmp_path / "out")], env, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1
    assert lines[-1].startswith("casfs: error: ") and "corrupt" in lines[-1]
    assert len(lines) <= 12, p.stderr
    assert "more warnings not shown (-v shows them all)" in lines[-2]
    assert not (tmp_path / "out").exists()


def test_copy_replaces_an_object_the_destination_holds_when_it_is_corrupt(tmp_path, env):
    write_tree(tmp_path / "src", {"big": os.urandom(300_000), "small": b"s" * 10})
    src, dst = str(tmp_path / "a"), str(tmp_path / "b")
    run(["--store", src, "build", str(tmp_path / "src"), "--tag", "t", "--chunk-size", "65536"], env)
    run(["copy", "t", "--from", src, "--to", dst], env)
    victims = []
    for dp, _, fs in os.walk(dst):
        if os.path.basename(os.path.dirname(dp)) in ("chunks", "packs", "indexes"):
            victims += [os.path.join(dp, f) for f in fs]
    assert len(victims) >= 2  # a pack, the index
    for p in victims:
        raw = bytearray(open(p, "rb").read())
        raw[len(raw) // 2] ^= 0xFF
        open(p, "wb").write(bytes(raw))
    out = run(["copy", "t", "--from", src, "--to", dst, "--no-progress"], env)
    assert out.stderr.count("replacing it") == len(victims)
    for p in victims:  # every damaged object was replaced by the source's good copy
        rel = os.path.relpath(p, dst)
        assert open(p, "rb").read() == open(os.path.join(src, rel), "rb").read()
    assert run(["--store", dst, "cat", "t", "small"], env).stdout == "s" * 10
    out = run(["copy", "t", "--from", src, "--to", dst, "--no-progress"], env)
    assert "0 of" in out.stdout and "replacing" not in out.stderr


def test_the_local_store_flushes_the_directory_after_each_rename(tmp_path, monkeypatch):
    """os.replace and os.fsync are wrapped to record the calls (the real ones still run)."""
    calls = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b, **k: (calls.append(("rename", str(b))), real_replace(a, b, **k))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    write_tree(tmp_path / "src", {"f": os.urandom(10000)})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", progress=False)
    renames = [i for i, c in enumerate(calls) if c[0] == "rename"]
    assert len(renames) >= 3  # a pack or chunk, the index, the tag
    for i in renames:
        target = calls[i][1]
        assert ("fsync", os.path.dirname(target)) in calls[i + 1:i + 2], (target, calls[i:i + 2])
        assert ("fsync", [c for c in calls[:i] if c[0] == "fsync"][-1][1]) and calls[i - 1][0] == "fsync"
