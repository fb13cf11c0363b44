"""`casfs run` and signals (issue 17, defect 4): SIGTERM and SIGHUP are handled like SIGINT
(passed to the container, then everything cleaned up); a SIGKILLed `casfs run` is cleaned up
by its guard; when the guard is killed too, the next `casfs run` cleans up. Also the writable
layer's size (`--tmpfs-size`) and the mount's counters at exit (`--stats`).

All real: `casfs run` subprocesses, runc containers, FUSE mounts, tmpfs and overlayfs; each
test has its own runtime directory (CASFS_RUNTIME_DIR) so it sees only its own records.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

import casfs

BUSYBOX = "/bin/busybox"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="containers need root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed (apt-get install runc)"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed"),
]

# waits for a signal in a loop; reports which one arrived and exits with a code of its own
TRAPPER = ("trap 'echo got TERM; exit 7' TERM; trap 'echo got HUP; exit 8' HUP; "
           "trap 'echo got INT; exit 9' INT; echo started; while true; do sleep 0.1; done")
STUBBORN = "trap '' TERM HUP INT; echo started; while true; do sleep 0.1; done"


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "root"
    os.makedirs(root / "bin")
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "echo", "cat", "sleep", "dd", "df", "true"):
        os.symlink("busybox", root / "bin" / applet)
    for d in ("proc", "dev", "sys", "tmp", "etc", "root"):
        os.makedirs(root / d, exist_ok=True)
    (root / "etc" / "motd").write_text("hi\n")
    e = dict(os.environ, CASFS_HOME=str(tmp_path / "home"), CASFS_RUNTIME_DIR=str(tmp_path / "run"),
             PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-m", "casfs.cli.main", "build", str(root), "--tag", "bb"], env=e,
                   check=True, capture_output=True)
    return e


def _start(env, *args):
    return subprocess.Popen([sys.executable, "-m", "casfs.cli.main", "run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def _wait_line(p, text, timeout=60.0):
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([p.stdout], [], [], 0.2)[0]:
            got = os.read(p.stdout.fileno(), 4096)
            if not got:
                break
            buf += got
            if text.encode() in buf:
                return buf.decode()
    raise AssertionError(f"no {text!r} from casfs run (got {buf!r}; stderr {p.stderr.read1() if p.poll() is not None else ''!r})")


def _record(env) -> tuple[str, dict]:
    d = os.path.join(env["CASFS_RUNTIME_DIR"], "lifelines")
    for _ in range(100):
        names = [n for n in os.listdir(d) if n.endswith(".json")] if os.path.isdir(d) else []
        if names:
            path = os.path.join(d, names[0])
            with open(path) as f:
                rec = json.load(f)
            if any(i["kind"] == "process" for i in rec["items"]):
                return path, rec
        time.sleep(0.05)
    raise AssertionError("casfs run left no lifeline record")


def _items(rec, kind):
    return [i for i in rec["items"] if i["kind"] == kind]


def _leftovers(rec) -> list[str]:
    """What of a run's helpers still exists."""
    left = []
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    work = _items(rec, "dir")[0]["path"]
    left += [f"mount {m}" for m in mounts if m.startswith(work)]
    if os.path.exists(work):
        left.append(f"dir {work}")
    for c in _items(rec, "container"):
        if subprocess.run(["runc", "state", c["id"]], capture_output=True).returncode == 0:
            left.append(f"container {c['id']}")
    for m in _items(rec, "mount"):
        if casfs.lifeline.alive(m["pid"], m["start"]):
            left.append(f"daemon {m['pid']}")
    return left


def _gone_within(rec, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _leftovers(rec):
            return
        time.sleep(0.1)
    raise AssertionError(f"left behind after {seconds} s: {_leftovers(rec)}")


@pytest.mark.parametrize("sig,code,said", [(signal.SIGTERM, 7, "got TERM"), (signal.SIGHUP, 8, "got HUP"),
                                           (signal.SIGINT, 9, "got INT")])
def test_a_signal_to_casfs_run_reaches_the_container_and_everything_is_cleaned_up(env, sig, code, said):
    p = _start(env, "bb", "--", "sh", "-c", TRAPPER)
    try:
        _wait_line(p, "started")
        path, rec = _record(env)
        t = time.monotonic()
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        stop = time.monotonic() - t
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err
    assert said in out.decode()
    assert not _leftovers(rec)
    assert not os.path.exists(path)
    assert stop < 10, stop  # the container's own exit, then the cleanup: not a stop_timeout


def test_a_container_that_ignores_the_signal_is_killed_after_the_stop_timeout(env):
    p = _start(env, "--stop-timeout", "1", "bb", "--", "sh", "-c", STUBBORN)
    try:
        _wait_line(p, "started")
        _, rec = _record(env)
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 137  # SIGKILL, passed through by runc
    assert not _leftovers(rec)


def test_a_sigkilled_casfs_run_is_cleaned_up_by_its_guard(env):
    p = _start(env, "bb", "--", "sh", "-c", TRAPPER)
    try:
        _wait_line(p, "started")
        path, rec = _record(env)
        assert _leftovers(rec)  # container, mounts, daemon: all there
        p.kill()
        p.wait(10)
        _gone_within(rec, 30)
        assert not os.path.exists(path)
    finally:
        if p.poll() is None:
            p.kill()


def test_the_next_casfs_run_cleans_up_after_one_killed_with_its_guard(env):
    p = _start(env, "bb", "--", "sh", "-c", TRAPPER)
    try:
        _wait_line(p, "started")
        path, rec = _record(env)
        os.kill(rec["guard"], signal.SIGKILL)  # a cgroup kill takes the guard too
        p.kill()
        p.wait(10)
        time.sleep(1)
        assert _leftovers(rec) and os.path.exists(path)  # nobody cleaned up yet
        q = subprocess.run([sys.executable, "-m", "casfs.cli.main", "run", "bb", "--", "true"], env=env,
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert q.returncode == 0, q.stderr
        assert not _leftovers(rec)
        assert not os.path.exists(path)
    finally:
        if p.poll() is None:
            p.kill()


def test_the_writable_layer_takes_its_size_from_tmpfs_size(env):
    p = subprocess.run([sys.executable, "-m", "casfs.cli.main", "run", "--tmpfs-size", "2M", "bb", "--",
                        "sh", "-c", "dd if=/dev/zero of=/big bs=1024 count=4096 2>&1; echo rc=$?"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "rc=1" in p.stdout and "No space left" in p.stdout, p.stdout
    p = subprocess.run([sys.executable, "-m", "casfs.cli.main", "run", "--tmpfs-size", "lots", "bb", "--", "true"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0
    assert "bad size 'lots'" in p.stderr and "512M, 1G" in p.stderr


def test_casfs_run_stats_prints_the_mounts_counters_at_exit(env):
    p = subprocess.run([sys.executable, "-m", "casfs.cli.main", "run", "--stats", "bb", "--",
                        "cat", "/etc/motd"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "hi\n"
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("mount of bb (the container's root) (image ") and "reads: " in lines[1]
    assert "HIT RATE" in p.stderr and any(line.strip().startswith("blob") for line in lines), p.stderr
