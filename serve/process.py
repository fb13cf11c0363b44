"""Process control for replicas: start the worker in its own session, stop its group, read its log."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

__all__ = ["exit_reason", "log_tail", "pid_alive", "spawn_worker", "terminate"]


def spawn_worker(argv: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
    """Start the worker in its own session, stdin/stdout on /dev/null, stderr appending to
    ``log_path`` (O_APPEND: CRIU restores files opened for append without size checks)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, env=env,
                                start_new_session=True, cwd="/", close_fds=True)
    finally:
        os.close(fd)


def exit_reason(proc: Any, log_path: str) -> str | None:
    """None while ``proc`` (Popen, or snapshot.cpu's process handles) runs, else why it is gone."""
    rc = proc.poll()
    if rc is None:
        return None
    return f"the replica exited with status {rc} while booting; last lines of {log_path}:\n{log_tail(log_path)}"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie or a dead process counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def terminate(pid: int, proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM the process group of ``pid`` (the process alone if it has none), SIGKILL after
    ``timeout`` seconds; returns once it is gone (or 10 s after the SIGKILL), after a SIGKILL
    to whatever is left of its group. ``proc``, when given, is polled instead of /proc (it
    reaps our own child)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 10)
        while time.monotonic() < deadline:
            if (proc.poll() is not None) if proc is not None else not pid_alive(pid):
                try:  # the leader is gone: the rest of its group (vLLM's EngineCore) goes too
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                return
            time.sleep(0.02)


def log_tail(path: str, n: int = 30) -> str:
    """The last ``n`` lines of the log at ``path`` (of its last 16 KiB; "" when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return ""
