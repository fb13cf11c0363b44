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


# -- command groups of other packages (the casfs.commands entry points) ------------------------


def _plugin_site(tmp_path, entries: str, modules: dict[str, str] | None = None) -> str:
    """A directory holding an installed distribution's metadata (a dist-info with
    entry_points.txt, as pip writes it) plus its modules: put on PYTHONPATH, importlib.metadata
    finds it like any installed package."""
    site = tmp_path / "site"
    info = site / "casfs_test_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: casfs-test-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[casfs.commands]\n" + entries)
    for name, text in (modules or {}).items():
        (site / f"{name}.py").write_text(text)
    return str(site)


def _with_path(env, site: str) -> dict:
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")])))


def test_help_lists_the_serve_and_snapshot_commands_their_packages_register(env):
    out = run(["--help"], env)
    assert "serve a model image over an OpenAI-compatible API" in out.stdout
    assert "CPU snapshots of processes (CRIU)" in out.stdout
    assert out.stderr == ""
    assert "--snapshot TAG" in run(["serve", "--help"], env).stdout
    assert "restore" in run(["snapshot", "--help"], env).stdout


def test_a_plugin_that_cannot_be_imported_costs_one_warning_line_not_the_command_line(tmp_path, env):
    site = _plugin_site(tmp_path, "broken = casfs_no_such_module:register\n")
    p = run(["--help"], _with_path(env, site))
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "'broken'" in lines[0], p.stderr
    assert "No module named 'casfs_no_such_module'" in lines[0]
    assert "Traceback" not in p.stderr
    for cmd in ("build", "serve", "snapshot"):
        assert cmd in p.stdout
    assert run(["images"], _with_path(env, site)).returncode == 0  # and commands still run


def test_a_plugin_whose_register_raises_is_skipped_with_one_line(tmp_path, env):
    site = _plugin_site(tmp_path, "bad = casfs_bad_plugin:register\n",
                        {"casfs_bad_plugin": "def register(sub):\n    raise RuntimeError('no engine here')\n"})
    p = run(["--help"], _with_path(env, site))
    assert p.stderr.strip() == ("casfs: warning: command plugin 'bad' (casfs_bad_plugin:register) "
                                "not loaded: RuntimeError: no engine here")


def test_an_installed_plugin_adds_a_command_that_opens_the_store_of_the_global_options(tmp_path, env):
    plugin = (
        "def register(sub):\n"
        "    p = sub.add_parser('hello', help='say which store the global options name')\n"
        "    p.set_defaults(func=lambda args: print('hello', args.open_store().url) or 0)\n")
    site = _plugin_site(tmp_path, "hello = casfs_hello_plugin:register\n", {"casfs_hello_plugin": plugin})
    penv = _with_path(env, site)
    assert "say which store" in run(["--help"], penv).stdout
    (tmp_path / "st").mkdir()  # (a --store that does not exist is an error)
    out = run(["--store", str(tmp_path / "st"), "hello"], penv).stdout
    assert out.strip() == f"hello file://{tmp_path / 'st'}"


def test_a_plugin_cannot_replace_a_casfs_command(tmp_path, env):
    site = _plugin_site(tmp_path, "build = casfs_no_such_module:register\n")
    p = run(["--help"], _with_path(env, site))
    assert "command plugin 'build'" in p.stderr and "casfs already has a 'build' command" in p.stderr
    assert "--tag" in run(["build", "--help"], _with_path(env, site)).stdout
