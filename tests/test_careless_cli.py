"""A careless user's inputs to the casfs command line (found in a hostile-user review): each is
refused or reported in one line that says what to do, and nothing is created, lost or left
behind. Real ``casfs`` subprocesses on real local stores and directories."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import write_tree

CASFS = [sys.executable, "-m", "casfs.cli.main"]


def casfs_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(CASFS + list(args), env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["CASFS_HOME"] = str(tmp_path / "home")
    e.pop("CASFS_STORE", None)
    return e


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("casfs: error: "), p.stderr
    return p.stderr


def test_building_from_a_device_or_fifo_says_what_it_is_not(tmp_path, env):
    """``casfs build /dev/null`` said "no such file or directory" about a path that exists."""
    os.mkfifo(tmp_path / "fifo")
    for path in ("/dev/null", str(tmp_path / "fifo")):
        err = one_line_error(casfs_cli("--store", str(tmp_path / "store"), "build", path, "-t", "x", env=env))
        assert "not a directory, tar archive or OCI layout" in err


@pytest.mark.parametrize("args", [["MISSING", "-t", "x"], ["SRC", "-t", "bad tag"], ["SRC", "-t", "x", "--chunk-size", "3K"],
                                  ["/dev/null", "-t", "x"]])
def test_a_build_refused_for_its_inputs_creates_no_store(tmp_path, env, args):
    """A typo in a build's source, tag or chunk size used to create the new --store directory
    before the build was refused, leaving an empty store behind."""
    write_tree(tmp_path / "src", {"f": b"data"})
    args = [str(tmp_path / "src") if a == "SRC" else str(tmp_path / "missing") if a == "MISSING" else a
            for a in args]
    one_line_error(casfs_cli("--store", str(tmp_path / "new-store"), "build", *args, env=env))
    assert not os.path.exists(tmp_path / "new-store")


def test_a_cache_server_over_a_missing_local_store_is_refused_not_served_empty(tmp_path, env):
    """``casfs cache-server --store /typo`` served (and created) an empty store: every request
    a miss, for ever."""
    for args in (["cache-server", "--store", str(tmp_path / "typo")],
                 ["--store", str(tmp_path / "typo"), "cache-server"]):
        err = one_line_error(casfs_cli(*args, "--listen", "127.0.0.1:0", env=env))
        assert f"--store {tmp_path / 'typo'} does not exist" in err
    assert not os.path.exists(tmp_path / "typo")


def test_an_unusable_cache_dir_is_named_in_the_error(tmp_path, env):
    """``--cache-dir /proc/x`` printed "No such file or directory: /proc/x" (which option? what
    to do?); a file given as a cache dir failed deep inside."""
    (tmp_path / "store").mkdir()
    (tmp_path / "afile").write_text("x")
    for d, why in (("/proc/casfs-nope", "cannot create it (No such file or directory)"),
                   (str(tmp_path / "afile"), "exists and is not a directory")):
        err = one_line_error(casfs_cli("--store", str(tmp_path / "store"), "--cache-dir", d, "images", env=env))
        assert f"--cache-dir {d}" in err and why in err
        err = one_line_error(casfs_cli("cache-server", "--store", str(tmp_path / "store"), "--cache-dir", d,
                                       "--listen", "127.0.0.1:0", env=env))
        assert f"--cache-dir {d}" in err and why in err
    assert (tmp_path / "afile").read_text() == "x"


def test_copying_an_unknown_image_creates_no_destination_store(tmp_path, env):
    write_tree(tmp_path / "src", {"f": b"data"})
    assert casfs_cli("--store", str(tmp_path / "store"), "build", str(tmp_path / "src"), "-t", "t",
                     env=env).returncode == 0
    err = one_line_error(casfs_cli("--store", str(tmp_path / "store"), "copy", "typo", "--to",
                                   str(tmp_path / "dest"), env=env))
    assert "no image or tag 'typo'" in err and "(tags: t)" in err
    assert not os.path.exists(tmp_path / "dest")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_an_export_onto_a_full_disk_names_its_destination_and_leaves_nothing(tmp_path, env):
    """On a full disk ``casfs export`` said only "No space left on device"."""
    write_tree(tmp_path / "src", {"big": os.urandom(3 << 20), "small": b"x"})
    assert casfs_cli("--store", str(tmp_path / "store"), "build", str(tmp_path / "src"), "-t", "t",
                     env=env).returncode == 0
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "casfs-test-full", str(disk)], check=True)
    try:
        err = one_line_error(casfs_cli("--store", str(tmp_path / "store"), "export", "t", str(disk / "out"),
                                       env=env))
        assert f"export to {disk / 'out'} failed (No space left on device); nothing was left there" in err
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("dest, why", [("REG/casfs/t:.hidden", "invalid tag '.hidden'"),
                                       ("REG/casfs/t:a+b", "cannot be a registry tag"),
                                       ("REG/casfs/t:" + "x" * 129, "invalid tag")])
def test_a_push_to_a_tag_no_registry_takes_is_refused_before_anything_is_sent(tmp_path, env, dest, why):
    """An invalid registry tag was found after every object had been uploaded. The registry
    here is a port nobody listens on: the refusal must come before any connection."""
    write_tree(tmp_path / "src", {"f": b"data"})
    assert casfs_cli("--store", str(tmp_path / "store"), "build", str(tmp_path / "src"), "-t", "t",
                     env=env).returncode == 0
    err = one_line_error(casfs_cli("--store", str(tmp_path / "store"), "push", "t",
                                   dest.replace("REG", "127.0.0.1:1"), "--no-progress", env=env))
    assert why in err and "Connection refused" not in err


def test_a_push_with_an_unbalanced_quote_in_cmd_names_the_option(tmp_path, env):
    write_tree(tmp_path / "src", {"f": b"data"})
    assert casfs_cli("--store", str(tmp_path / "store"), "build", str(tmp_path / "src"), "-t", "t",
                     env=env).returncode == 0
    err = one_line_error(casfs_cli("--store", str(tmp_path / "store"), "push", "t", "127.0.0.1:1/casfs/t",
                                   "--cmd", "sh -c 'echo", env=env))
    assert "--cmd \"sh -c 'echo\": No closing quotation" in err


def test_an_export_whose_destination_appears_meanwhile_says_so_and_leaves_nothing(tmp_path):
    """Two exports to one new path: the loser said "Directory not empty: <its temp dir>". The
    race is made deterministic with a real local store whose reads wait until the destination
    was created by "the other export"."""
    import threading

    import casfs
    from casfs.objects.local import LocalObjectStore
    from casfs.store import Store

    write_tree(tmp_path / "src", {"a": os.urandom(100_000), "b/c": b"c"})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "src"), tag="t", progress=False)
    reading, go = threading.Event(), threading.Event()

    class HeldStore(LocalObjectStore):
        def local_path(self, key):
            reading.set()
            go.wait(30)
            return super().local_path(key)

        def get_range(self, key, offset, length):
            reading.set()
            go.wait(30)
            return super().get_range(key, offset, length)

    dest = tmp_path / "out"
    out: dict = {}
    with Store(HeldStore(str(tmp_path / "store")), memory_bytes=0) as store:
        image = store.open_image("t")
        t = threading.Thread(target=lambda: out.setdefault("r", _try(casfs.export, image, str(dest), progress=False)))
        t.start()
        assert reading.wait(30)
        dest.mkdir()
        (dest / "theirs").write_text("the other export's\n")
        go.set()
        t.join(60)
    e = out["r"]
    assert isinstance(e, FileExistsError) and "appeared while exporting" in str(e), e
    assert os.listdir(dest) == ["theirs"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.")] == []


def _try(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - handed to the test
        return e
