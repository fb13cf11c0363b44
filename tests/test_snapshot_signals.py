"""`kill PID` works on a spawned and on a restored snapshot process (issue 17, defect 5: the
program was PID 1 of its namespace, and the kernel drops signals PID 1 has no handler for).

Real CRIU, real processes: a program with no signal handlers at all runs under the namespace's
init (tini), is snapshotted, restored, and sent SIGTERM/SIGHUP through the PID the caller has.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import casfs
import snapshot
from snapshot import cpu

PROGRAM = r'''
import os, sys, time, snapshot
restored = snapshot.ready()
print("up", restored, os.getpid(), flush=True)
child = os.fork()
if child == 0:              # a child that leaves an orphan behind: the init must reap it
    if os.fork() == 0:
        time.sleep(0.2)
        os._exit(0)
    os._exit(0)
os.waitpid(child, 0)
while True:                 # no signal handler: the default action must apply
    time.sleep(0.05)
'''


@pytest.fixture(scope="module")
def snap(tmp_path_factory, criu):
    if snapshot.spawning.init_program() is None:
        pytest.fail("tini is not installed (scripts/setup.sh installs it: apt-get install tini)")
    root = tmp_path_factory.mktemp("sig")
    prog = root / "prog.py"
    prog.write_text(PROGRAM)
    store = casfs.open_store(str(root / "store"))
    proc = cpu.spawn([sys.executable, str(prog)], stdout=str(root / "out.log"))
    cpu.checkpoint(proc, store, "sig-app")
    proc.wait(10)
    yield {"store": store, "prog": str(prog), "root": root}
    store.close()


def test_sigterm_to_a_spawned_process_ends_it_as_outside_a_namespace(snap):
    seen = _text(snap).count("up False")
    proc = cpu.spawn([sys.executable, snap["prog"]], ready=False, stdout=str(snap["root"] / "out.log"))
    try:
        _wait_for(lambda: _text(snap).count("up False") > seen)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_a_restored_process_ends_it_as_outside_a_namespace(snap, tmp_path, sig):
    seen = _text(snap).count("up True")
    live = cpu.restore("sig-app", snap["store"], cache_dir=str(tmp_path / "cache"))
    try:
        _wait_for(lambda: _text(snap).count("up True") > seen)  # past ready(): in its loop
        os.kill(live.pid, sig)  # the PID a caller has: the restored tree's root
        assert live.wait(10) == 128 + sig
    except subprocess.TimeoutExpired:
        pytest.fail(f"the restored process ignored {signal.Signals(sig).name}")
    finally:
        if live.poll() is None:
            live.kill()


def test_the_namespace_init_reaps_orphans(snap, tmp_path):
    live = cpu.restore("sig-app", snap["store"], cache_dir=str(tmp_path / "cache"))
    try:
        import time

        time.sleep(1.0)  # the orphan exited
        zombies = []
        for p in snapshot.process_tree(live.pid):
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rpartition(")")[2].split()[0] == "Z":
                        zombies.append(p)
            except OSError:
                pass
        assert not zombies
    finally:
        live.kill()


def _wait_for(cond, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the program did not start"
        time.sleep(0.02)


def _text(snap) -> str:
    try:
        return (snap["root"] / "out.log").read_text()
    except OSError:
        return ""
