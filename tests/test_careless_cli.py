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
