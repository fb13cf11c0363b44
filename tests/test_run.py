"""casfs run: a real runc container whose root filesystem is a lazy casfs mount."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import casfs

BUSYBOX = "/bin/busybox"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="containers need root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (apt-get install runc)"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed"),
]


def _busybox_root(root):
    os.makedirs(root / "bin")
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "echo", "cat", "ls", "mount", "id", "wc"):
        os.symlink("busybox", root / "bin" / applet)
    for d in ("proc", "dev", "sys", "tmp", "etc", "root"):
        os.makedirs(root / d, exist_ok=True)
    (root / "etc" / "motd").write_text("hello from a lazily mounted image\n")


def _mounts_under(root) -> list[str]:
    """Mount points at or below ``root`` (this test's own paths: other processes on the machine
    may mount and unmount elsewhere meanwhile)."""
    root = os.path.realpath(root)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return sorted(p for p in points if p == root or p.startswith(root + "/"))


def test_a_container_runs_from_a_lazy_mount_and_passes_its_exit_code(tmp_path, monkeypatch):
    _busybox_root(tmp_path / "root")
    store = casfs.open_store(str(tmp_path / "store"))
    casfs.build(store, str(tmp_path / "root"), tag="bb", progress=False)
    image = store.open_image("bb")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the run's work dir: ours
    assert _mounts_under(tmp_path) == []
    from casfs.run import run_container

    during: list[str] = []
    out = tmp_path / "out.txt"
    with open(out, "wb") as f:
        rc = run_container(image, ["sh", "-c", "cat /etc/motd; echo pid=$$; echo scratch > /etc/new; "
                                              "cat /etc/new; ls /proc/self >/dev/null && exit 3"],
                           stdout=f, stderr=subprocess.STDOUT, timeout=120,
                           stats=lambda _: during.extend(_mounts_under(tmp_path)))
    text = out.read_text()
    assert rc == 3, text
    assert "hello from a lazily mounted image" in text
    assert "pid=1" in text  # its own PID namespace
    assert "scratch" in text  # the overlay takes writes
    assert not store.open_image("bb").exists("etc/new")  # the image itself is untouched
    # the image's mount (the last thing undone) lived under our paths, and nothing is left there
    assert [os.path.basename(p) for p in during] == ["lower"]
    assert _mounts_under(tmp_path) == []
    assert os.listdir(tmp_path / "tmp") == []  # and its work dir removed


def test_the_cli_runs_a_command_and_returns_its_status(tmp_path):
    _busybox_root(tmp_path / "root")
    env = dict(os.environ, CASFS_HOME=str(tmp_path / "home"))
    casfs_bin = [sys.executable, "-m", "casfs.cli.main"]
    subprocess.run(casfs_bin + ["build", str(tmp_path / "root"), "--tag", "bb"], env=env, check=True,
                   capture_output=True)
    p = subprocess.run(casfs_bin + ["run", "bb", "--", "sh", "-c", "echo ok; exit 5"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 5, p.stderr
    assert p.stdout.strip() == "ok"
    p = subprocess.run(casfs_bin + ["run", "bb"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "no command given" in p.stderr


def test_a_run_records_a_profile_and_writes_what_it_touched_and_fetched(tmp_path):
    """--record-profile saves a startup profile when the command ends; --stats-json writes the
    mount's statistics (bytes read through FUSE, bytes each tier served)."""
    _busybox_root(tmp_path / "root")
    (tmp_path / "root" / "etc" / "big").write_bytes(os.urandom(300_000))
    env = dict(os.environ, CASFS_HOME=str(tmp_path / "home"))
    casfs_bin = [sys.executable, "-m", "casfs.cli.main"]
    subprocess.run(casfs_bin + ["build", str(tmp_path / "root"), "--tag", "bb"], env=env, check=True,
                   capture_output=True)
    stats = tmp_path / "stats.json"
    p = subprocess.run(casfs_bin + ["run", "--record-profile", "60", "--stats-json", str(stats), "bb", "--",
                                    "sh", "-c", "cat /etc/motd /etc/big | wc -c"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(300_000 + len("hello from a lazily mounted image\n"))
    import json

    st = json.loads(stats.read_text())
    assert st["mount"]["read_bytes"] >= 300_000
    assert {t["tier"] for t in st["tiers"]} >= {"memory", "blob"}
    assert sum(t["bytes_read"] for t in st["tiers"] if t["tier"] == "blob") > 0
    p = subprocess.run(casfs_bin + ["profile", "show", "bb"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "big" in p.stdout, p.stdout + p.stderr


def test_options_after_the_image_name_are_options_not_the_command(tmp_path):
    """``casfs run bb -e FOO=bar -- sh ...`` ran "-e" as the container's command (argparse gave
    everything after NAME to CMD); options between NAME and ``--`` are options now, and an
    option-like command without ``--`` is refused in one line."""
    _busybox_root(tmp_path / "root")
    env = dict(os.environ, CASFS_HOME=str(tmp_path / "home"))
    casfs_bin = [sys.executable, "-m", "casfs.cli.main"]
    subprocess.run(casfs_bin + ["build", str(tmp_path / "root"), "--tag", "bb"], env=env, check=True,
                   capture_output=True)
    p = subprocess.run(casfs_bin + ["run", "bb", "-e", "FOO=bar", "-w", "/tmp", "--", "sh", "-c", "echo $FOO; pwd"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["bar", "/tmp"]
    p = subprocess.run(casfs_bin + ["run", "bb", "--tmpfs-size", "64M", "echo", "hi"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "'--tmpfs-size' is not a command: put options before NAME, or end them with --" in p.stderr
