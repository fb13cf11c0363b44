"""Restore instructions: what the supervisor tells a worker restored from a CPU snapshot.

After ``snapshot.restore`` wakes the worker (``ready()`` returns True in it), the worker waits
for a JSON file ``<casfs runtime dir>/serve-restore/<outer pid>.json``: its listen address, a
fresh random seed and the supervisor's control token (serve.snapshots writes it, serve.worker
reads it). The snapshot carries no socket, so each restore can serve on its own port.
"""

from __future__ import annotations

import json
import os
import time

import casfs

__all__ = ["INSTRUCTIONS_TIMEOUT_S", "instructions_path", "outer_pid", "wait_instructions",
           "write_instructions"]

INSTRUCTIONS_TIMEOUT_S = 60.0


def instructions_path(outer_pid: int) -> str:
    """Where the supervisor leaves a restored worker's instructions (see the module docstring)."""
    d = os.path.join(casfs.runtime_dir(), "serve-restore")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return os.path.join(d, f"{outer_pid}.json")


def outer_pid() -> int:
    """This process's PID as the host sees it (first NSpid entry; /proc is the host's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return os.getpid()


def wait_instructions(timeout: float = INSTRUCTIONS_TIMEOUT_S) -> dict:
    """(Worker side, after a restore) the instructions the supervisor wrote for this process.

    Raises:
        TimeoutError: when none arrive within ``timeout`` seconds.
    """
    path = instructions_path(outer_pid())
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            os.unlink(path)
            return data
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no restore instructions at {path} after {timeout:.0f} s")
        time.sleep(0.002)


def write_instructions(pid: int, data: dict) -> str:
    """(Supervisor side) hand the restored worker ``pid`` its instructions; returns the path.

    Written atomically (``casfs.atomic_write``), so the worker never reads half of it.
    """
    path = instructions_path(pid)
    casfs.atomic_write(path, json.dumps(data))
    return path
