"""Starting a process the way CRIU needs it, and finding its PIDs again.

``spawn`` makes the program PID 1 of its own PID namespace (``unshare -p -f``, so restores get
fresh outer PIDs and many can run at once; ``pid_namespace=False`` for GPU processes), a session leader without a terminal (``setsid``),
with stdin from /dev/null and stdout/stderr appended to files (``O_APPEND``: CRIU does not
check the size of such files) or /dev/null. ``ready_pid`` maps the PID that called
``snapshot.ready()`` inside the namespace to its outer PID.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Sequence

from . import criu as criumod, lifecycle
from .criu import CriuError

__all__ = ["SpawnedProcess", "init_program", "ready_caller_pid", "spawn"]

log = logging.getLogger("snapshot.spawning")
TINI_ENV = "CASFS_TINI"


def init_program() -> str | None:
    """The init to run as PID 1 of a spawned namespace: ``$CASFS_TINI``, else ``tini`` or
    ``tini-static`` on PATH; None when there is none (Debian: apt-get install tini)."""
    path = os.environ.get(TINI_ENV)
    if path:
        return path if os.access(path, os.X_OK) else None
    return shutil.which("tini") or shutil.which("tini-static")


class SpawnedProcess:
    """A process started by ``spawn`` in its own PID namespace, ready to be checkpointed.

    Attributes:
        pid: the process to dump (outer PID of the namespace's init: tini, whose child is the
            program; signals sent to it reach the program).
        launcher: the ``unshare`` process (our child) that waits for it.
        ready_path: where ``snapshot.ready()`` writes its report.
    """

    def __init__(self, launcher: subprocess.Popen, pid: int, ready_path: str, control_dir: str,
                 stdout: str | None, cmd: list[str] | None = None) -> None:
        self.launcher = launcher
        self.cmd = cmd or []
        self.pid = pid
        self.ready_path = ready_path
        self.control_dir = control_dir
        self.stdout = stdout

    def __repr__(self) -> str:
        return f"<SpawnedProcess pid={self.pid} running={self.poll() is None}>"

    def poll(self) -> int | None:
        return self.launcher.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; returns its exit status (``unshare`` passes it on)."""
        rc = self.launcher.wait(timeout)
        shutil.rmtree(self.control_dir, ignore_errors=True)
        return rc

    def kill(self) -> None:
        """Kill the whole tree (SIGKILL to the namespace's init) and reap the launcher."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.launcher.wait(10)
        shutil.rmtree(self.control_dir, ignore_errors=True)

    def wait_ready(self, timeout: float = 300.0) -> dict:
        """Wait until the process called ``snapshot.ready()``; returns its report.

        Raises:
            CriuError: when the process exits first (with its output's tail) or ``timeout``
                seconds pass.
        """
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            try:
                with open(self.ready_path, encoding="utf-8") as f:
                    return json.load(f)
            except (OSError, ValueError):
                pass
            rc = self.poll()
            if rc is not None:
                raise CriuError(f"process {self.pid} exited with status {rc} before calling "
                                f"snapshot.ready(){_tail_note(self.stdout)}")
            if time.monotonic() > deadline:
                raise CriuError(f"process {self.pid} did not call snapshot.ready() within "
                                f"{timeout:.0f} s{_tail_note(self.stdout)}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _tail_note(path: str | None, n: int = 1500) -> str:
    if not path:
        return ""
    text = criumod.read_tail(path, n).strip()
    return f"; its output ({path}) ends with:\n{text}" if text else ""


def _open_append(path: str | None) -> int:
    if path is None:
        return os.open(os.devnull, os.O_WRONLY)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def spawn(cmd: Sequence[str], *, stdout: str | None = None, stderr: str | None | bool = True,
          cwd: str | None = None, env: dict[str, str] | None = None,
          deterministic: bool = False, ready: bool = True, pid_namespace: bool = True) -> SpawnedProcess:
    """Start ``cmd`` so that it can be checkpointed (see the module docstring).

    Args:
        cmd: the program and its arguments.
        stdout: file its stdout is appended to (opened ``O_WRONLY|O_APPEND``); None: /dev/null.
        stderr: a file path, True (same file as stdout), or None (/dev/null).
        cwd, env: as for subprocess (``env`` default: this process's environment).
        deterministic: start it without address-space randomisation (``setarch -R``) and
            with ``PYTHONHASHSEED=0`` (unless ``env`` sets it), so that snapshots of separate
            runs of one program lay out memory alike and deduplicate in the store (measured,
            second snapshot of a separate run, 256 KiB chunks: a small single-threaded torch
            program stored 35 MB of 159 MB, the benchmark's program 130 MB of 160 MB; without
            this, all of it: docs/benchmarks.md). Every restore of one snapshot shares its
            layout and hash seed anyway; this makes separate snapshots share them too.
        ready: tell the process a supervisor waits for its ``snapshot.ready()`` (False: that
            call returns at once, as in a process never snapshotted).
        pid_namespace: start it in its own PID namespace under tini (the default). False starts
            it in this PID namespace (still a session leader): what a process that uses a GPU
            needs, since CUDA fails to initialise in a PID namespace whose /proc is the host's
            (error 304, "OS call failed"; DESIGN.md). A restore then gets the same PID back,
            so one restore of such a snapshot runs at a time on a host, after the original
            process is gone.

    Raises:
        FileNotFoundError: when ``unshare``/``setsid`` are missing.
    """
    for tool in ("unshare", "setsid"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} is not installed (Debian: util-linux)")
    control = tempfile.mkdtemp(prefix="casfs-spawn-")
    ready_path = os.path.join(control, "ready.json")
    penv = dict(os.environ if env is None else env)
    if ready:
        penv[lifecycle.ENV_READY] = ready_path
    else:
        penv.pop(lifecycle.ENV_READY, None)
    argv = ["unshare", "-p", "-f", "setsid"] if pid_namespace else []
    if pid_namespace:  # an init as PID 1, so that signals reach the program (module doc)
        init = init_program()
        if init is not None:
            argv += [init, "-s", "--"]  # -s: a subreaper too, should it ever not be PID 1
        else:
            log.warning("tini is not installed: %s runs as PID 1 of its namespace and ignores SIGTERM "
                        "unless it handles it (apt-get install tini, or set $%s)",
                        cmd[0] if cmd else "the program", TINI_ENV)
    if deterministic:
        argv += ["setarch", "-R"]
        penv.setdefault("PYTHONHASHSEED", "0")
    argv += list(cmd)
    out_fd = _open_append(stdout)
    err_fd = out_fd if stderr is True else _open_append(stderr if isinstance(stderr, str) else None)
    try:
        launcher = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_fd, stderr=err_fd,
                                    cwd=cwd, env=penv, start_new_session=True, close_fds=True)
    finally:
        os.close(out_fd)
        if err_fd != out_fd:
            os.close(err_fd)
    pid = _first_child(launcher) if pid_namespace else launcher.pid
    return SpawnedProcess(launcher, pid, ready_path, control, stdout, list(cmd))


def _first_child(launcher: subprocess.Popen, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    path = f"/proc/{launcher.pid}/task/{launcher.pid}/children"
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        except OSError:
            pass
        if launcher.poll() is not None:
            raise CriuError(f"unshare exited with status {launcher.returncode} before starting "
                            "the process (is this root, with PID namespaces enabled?)")
        time.sleep(0.001)
    raise CriuError("unshare did not start the process within 10 s")


def ready_caller_pid(root_pid: int, report: dict | None) -> int:
    """Outer PID of the process that called ready(), found by its PID inside the namespace."""
    if not report:
        return root_pid
    ns_pid = (report.get("ns_pids") or [report.get("pid")])[-1]
    if ns_pid == 1:
        return root_pid
    for p in criumod.process_tree(root_pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        if int(line.split()[-1]) == ns_pid:
                            return p
                        break
        except OSError:
            continue
    return root_pid

