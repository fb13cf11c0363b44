"""The casfs command line, run as a real subprocess against a real local store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


def test_help_explains_every_command(env):
    out = run(["--help"], env).stdout
    for cmd in ("build", "images", "ls", "cat", "export", "copy", "stats", "gc"):
        assert cmd in out
    assert "store selection" in out
    assert "--tag" in run(["build", "--help"], env).stdout


def test_build_list_read_export_copy_gc_round_trip(tmp_path, env):
    files = {"etc/hosts": b"127.0.0.1 localhost\n", "bin/tool": os.urandom(70000), "empty": b""}
    write_tree(tmp_path / "src", files)
    out = run(["build", str(tmp_path / "src"), "--tag", "demo"], env).stdout
    assert "built demo" in out
    assert "demo" in run(["images"], env).stdout
    assert "hosts" in run(["ls", "demo", "etc"], env).stdout
    assert subprocess.run(CASFS + ["cat", "demo", "bin/tool"], env=env, capture_output=True).stdout == files["bin/tool"]
    run(["export", "demo", str(tmp_path / "out")], env)
    for rel, data in files.items():
        assert (tmp_path / "out" / rel).read_bytes() == data
    run(["copy", "demo", "--to", str(tmp_path / "other")], env)
    assert "demo" in run(["--store", str(tmp_path / "other"), "images"], env).stdout
    # an untagged image's objects are collected; tagged ones never are
    write_tree(tmp_path / "src2", {"x": os.urandom(5000)})
    run(["build", str(tmp_path / "src2"), "--tag", "tmp"], env)
    run(["rm", "tmp"], env)
    dry = run(["gc", "--dry-run", "--grace", "0"], env).stdout
    assert "would delete 2" in dry
    run(["gc", "--grace", "0"], env)
    assert subprocess.run(CASFS + ["cat", "demo", "bin/tool"], env=env, capture_output=True).stdout == files["bin/tool"]


def test_errors_are_one_actionable_line_without_traceback(tmp_path, env):
    p = run(["cat", "nope", "x"], env, check=False)
    assert p.returncode == 1 and "no image or tag 'nope'" in p.stderr and "Traceback" not in p.stderr
    p = run(["build", str(tmp_path / "missing"), "--tag", "x"], env, check=False)
    assert p.returncode == 1 and "no such file or directory" in p.stderr
    p = run(["build", str(tmp_path), "--tag", "x", "--chunk-size", "banana"], env, check=False)
    assert p.returncode == 1 and "bad size" in p.stderr
    p = run(["--store", "ftp://x/y", "images"], env, check=False)
    assert p.returncode == 1 and "unknown store scheme" in p.stderr
    write_tree(tmp_path / "src", {"d/f": b"1"})
    run(["build", str(tmp_path / "src"), "--tag", "t"], env)
    p = run(["cat", "t", "d"], env, check=False)
    assert p.returncode == 1 and "not a regular file" in p.stderr
    p = run(["cat", "t", "d/missing"], env, check=False)
    assert p.returncode == 1 and "does not exist" in p.stderr
