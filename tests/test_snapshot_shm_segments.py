"""A process that keeps a /dev/shm segment open read-write and mapped (as vLLM's EngineCore does
with its psm_* message queues) snapshots quietly and restores with the segment's contents: the
snapshot stores the segment and puts it back, so CRIU's file-size rule does not apply to it
(issue 17: the warning it used to print gave advice no user could act on). Real CRIU, real
processes; nothing is mocked.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

import pytest

import casfs
import snapshot
from snapshot import cpu

PROGRAM = r'''
import mmap, os, sys, snapshot
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)   # read-write, no O_APPEND: like psm_*
os.ftruncate(fd, 4096)
m = mmap.mmap(fd, 4096)
m[:5] = b"queue"
restored = snapshot.ready()
print("shm", restored, bytes(m[:5]).decode(), flush=True)
sys.exit(4)
'''


def test_a_mapped_shm_segment_open_read_write_snapshots_without_a_warning_and_comes_back(criu, tmp_path, caplog):
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    seg = f"/dev/shm/casfs-test-psm_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out.log"
    store = casfs.open_store(str(tmp_path / "store"))
    proc = cpu.spawn([sys.executable, str(prog), seg], stdout=str(out))
    live = None
    try:
        with caplog.at_level(logging.WARNING):
            ref = cpu.checkpoint(proc, store, "shm-app", strict=True)  # used to be a RuleViolation
        proc.wait(10)
        assert not [r for r in caplog.records if seg in r.getMessage()]
        assert [i["path"] for i in ref.meta["shm"]] == [seg]
        os.unlink(seg)  # a fresh host: restore must put it back
        live = cpu.restore("shm-app", store, cache_dir=str(tmp_path / "cache"))
        assert live.wait(60) == 4
        assert out.read_text().splitlines()[-1] == "shm True queue"
    finally:
        if proc.poll() is None:
            proc.kill()
        if live is not None and live.poll() is None:
            live.kill()
        if os.path.exists(seg):
            os.unlink(seg)
        store.close()
