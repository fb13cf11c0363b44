"""`casfs serve` and what it started (issue 17, defect 4): SIGTERM stops the replica and its model
mount promptly; a SIGKILLed supervisor's worker and mount daemon are stopped by its guard; the
next `casfs serve` cleans up after one killed together with its guard.

Real processes: `casfs serve` subprocesses with the echo engine (the replica process, HTTP
server and lazy FUSE mount of the model image are the real ones; only the model is a stand-in,
so a boot takes seconds), each test with its own runtime directory.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

import casfs
from conftest import write_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path):
    write_tree(tmp_path / "model", {"config.json": b"{}", "model.safetensors": b"\0" * 4096})
    with casfs.open_store(str(tmp_path / "store")) as s:
        casfs.build(s, str(tmp_path / "model"), tag="m", progress=False)
    return {**os.environ, "CASFS_HOME": str(tmp_path / "home"), "CASFS_RUNTIME_DIR": str(tmp_path / "run"),
            "PYTHONPATH": ROOT, "STORE": str(tmp_path / "store"), "WORK": str(tmp_path / "work")}


def _serve(env, *extra):
    listen = f"127.0.0.1:{_free_port()}"
    p = subprocess.Popen([sys.executable, "-m", "casfs.cli.main", "--store", env["STORE"], "serve", "m",
                          "--engine", "echo", "--no-gpu-check", "--materialize", "mount", "--listen", listen,
                          "--workdir", env["WORK"], *extra], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 120
    buf = b""
    while time.monotonic() < deadline and b"\n" not in buf:
        if select.select([p.stdout], [], [], 0.5)[0]:
            got = os.read(p.stdout.fileno(), 65536)
            if not got:
                break
            buf += got
        elif p.poll() is not None:
            break
    if b"\n" not in buf:
        p.kill()
        raise AssertionError(f"casfs serve did not boot: {p.stderr.read().decode()[-2000:]}")
    p.report = json.loads(buf.split(b"\n")[0])
    d = os.path.join(env["CASFS_RUNTIME_DIR"], "lifelines")
    names = [n for n in os.listdir(d) if n.endswith(".json")]
    assert len(names) == 1
    with open(os.path.join(d, names[0])) as f:
        rec = json.load(f)
    return p, os.path.join(d, names[0]), rec


def _helpers(rec):
    worker = [i for i in rec["items"] if i["kind"] == "group"][0]
    mount = [i for i in rec["items"] if i["kind"] == "mount"][0]
    return worker, mount


def _leftovers(rec):
    worker, mount = _helpers(rec)
    left = []
    if casfs.lifeline.alive(worker["pid"], worker["start"]):
        left.append(f"worker {worker['pid']}")
    if casfs.lifeline.alive(mount["pid"], mount["start"]):
        left.append(f"mount daemon {mount['pid']}")
    with open("/proc/self/mountinfo") as f:
        if any(line.split()[4] == mount["path"] for line in f):
            left.append(f"mount {mount['path']}")
    return left


def _gone_within(rec, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _leftovers(rec):
        time.sleep(0.05)
    assert not _leftovers(rec), _leftovers(rec)


def test_sigterm_stops_casfs_serve_its_replica_and_its_mount_promptly(env):
    p, path, rec = _serve(env)
    try:
        assert len(_leftovers(rec)) == 3
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        took = time.monotonic() - t
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0
    assert not _leftovers(rec) and not os.path.exists(path)
    print(f"casfs serve (echo engine) stopped {took:.2f} s after SIGTERM")


def test_a_sigkilled_casfs_serve_takes_its_replica_and_mount_with_it(env):
    p, path, rec = _serve(env)
    try:
        p.kill()
        p.wait(10)
        _gone_within(rec, 20)
        assert not os.path.exists(path)
    finally:
        if p.poll() is None:
            p.kill()


def test_the_next_casfs_serve_cleans_up_after_one_killed_with_its_guard(env):
    p, path, rec = _serve(env)
    os.kill(rec["guard"], signal.SIGKILL)
    p.kill()
    p.wait(10)
    time.sleep(0.5)
    assert len(_leftovers(rec)) == 3  # nobody cleaned up
    q, path2, rec2 = _serve(env)
    try:  # the old worker and daemon are gone; the model is mounted again by a new daemon
        assert [x for x in _leftovers(rec) if not x.startswith("mount /")] == []
        assert not os.path.exists(path)
        assert _helpers(rec2)[1]["pid"] != _helpers(rec)[1]["pid"]
    finally:
        q.send_signal(signal.SIGTERM)
        q.wait(30)
    assert not _leftovers(rec2)


def test_a_casfs_mount_whose_daemon_was_killed_is_detached_by_the_next_mount(env, tmp_path):
    with casfs.open_store(env["STORE"]) as s:
        image = s.open_image("m")
        os.environ["CASFS_RUNTIME_DIR"] = env["CASFS_RUNTIME_DIR"]
        try:
            mp = tmp_path / "mnt"
            mp.mkdir()
            info = casfs.mount(image, str(mp))
            os.kill(info.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while casfs.lifeline.alive(info.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(OSError):  # a dead FUSE mount: "Transport endpoint is not connected"
                os.listdir(mp)
            casfs.mount(image, str(mp))  # sweeps the dead one first
            assert os.listdir(mp) == ["config.json", "model.safetensors"] or sorted(os.listdir(mp)) == \
                ["config.json", "model.safetensors"]
            casfs.unmount(str(mp))
        finally:
            with open("/proc/self/mountinfo") as f:
                if any(line.split()[4] == str(mp) for line in f):
                    subprocess.run(["umount", "-l", str(mp)], capture_output=True)
            del os.environ["CASFS_RUNTIME_DIR"]


def test_a_replica_restored_from_a_snapshot_serves_and_stops_on_sigterm(env):
    """Create a snapshot (echo engine: seconds), then boot from it: the restored worker (under
    its namespace's init) takes its instructions, serves, and SIGTERM stops it and its mount."""
    import snapshot

    try:
        snapshot.find_criu()
    except snapshot.CriuUnavailable as e:
        pytest.skip(f"no usable CRIU: {e}")
    env = {**env, "CASFS_SNAPSHOT_CACHE": os.path.join(env["WORK"], "snapshot-cache")}
    p, _, _ = _serve(env, "--snapshot", "s1", "--create")
    assert list(p.report["phases"])[-3:] == ["snapshot", "restore", "first_token"], p.report.get("details")
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0
    p, path, rec = _serve(env, "--snapshot", "s1")
    try:
        assert p.report["mode"] == "restore", p.report.get("details")
        root = [i for i in rec["items"] if i["kind"] == "process"][0]
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        assert time.monotonic() - t < 10
        assert not casfs.lifeline.alive(root["pid"], root["start"])
        assert not os.path.exists(path)
    finally:
        if p.poll() is None:
            p.kill()
