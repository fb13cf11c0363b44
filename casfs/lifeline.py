"""Lifelines: whatever kills a supervisor (``casfs run``, a serve replica's supervisor), the
helpers it started go with it, and the next start cleans up what a killed one left behind.

A supervisor that starts helpers (a FUSE mount daemon, a tmpfs and an overlay, a runc container,
a worker process group) writes what it started, as it starts it, to a record in the runtime
directory (``<runtime dir>/lifelines/<id>.json``) and starts a *guard*: a small process in its
own session that watches the supervisor through a pidfd. When the supervisor ends without
closing its lifeline (SIGKILL from an orchestrator's grace period, the OOM killer, a crash),
the guard undoes the record, last item first: kills the worker's process group, deletes the
container, unmounts, removes the work directory. A supervisor that ends normally cleans up
itself and closes the lifeline (record removed, guard stopped).

Why a guard and not PR_SET_PDEATHSIG in each helper: the helpers are not all ours to start
(runc forks the container's init; a FUSE daemon double-forks so that ``casfs mount`` returns),
the parent-death signal fires when the forking *thread* ends, and a helper that dies leaves
mounts and containers that only an outside process can remove. One guard per supervisor covers
them all; it runs this file as a script (standard library only: ``python -S``, ~20 ms to start).

When the guard dies too (a cgroup kill takes the whole tree), the record stays: ``sweep()``,
called when ``casfs run`` / ``casfs serve`` / ``casfs mount`` start, undoes every record whose
supervisor and guard are both gone. Liveness is a pid plus its start time (a reused pid is not
taken for the owner).

Item kinds (undone in reverse order of ``add``):
    ``group``      a process group: SIGTERM, SIGKILL after ``grace`` seconds
    ``process``    one process (e.g. a restored tree's init): SIGTERM, then SIGKILL
    ``container``  an OCI container: ``<runtime> delete --force <id>``
    ``mount``      a casfs FUSE mount: SIGTERM to its daemon, then a lazy unmount
    ``umount``     any mount point: a lazy unmount (``umount -l``)
    ``dir``        a directory removed once nothing is mounted under it
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

__all__ = ["Lifeline", "alive", "proc_start", "sweep", "sweep_leftovers", "undo"]

GRACE = 3.0  # seconds a process group gets between SIGTERM and SIGKILL


def proc_start(pid: int) -> str:
    """Start time of ``pid`` (field 22 of /proc/pid/stat), "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rpartition(b")")[2].split()
    except OSError:
        return ""
    return rest[19].decode() if len(rest) > 19 else ""


def alive(pid: int, start: str = "") -> bool:
    """True while ``pid`` runs (a zombie counts as gone) and, with ``start``, is that process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rpartition(b")")[2].split()
    except OSError:
        return False
    if not rest or rest[0] in (b"Z", b"X"):
        return False
    return not start or (len(rest) > 19 and rest[19].decode() == start)


def _lifelines_dir(runtime_dir: str) -> str:
    d = os.path.join(runtime_dir, "lifelines")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _write(path: str, record: dict) -> None:
    """Replace the record atomically (the guard, a stdlib-only script, never writes one)."""
    from .fsutil import atomic_write  # its temporary names end in .tmp: sweep() removes stale ones

    atomic_write(path, json.dumps(record))


class Lifeline:
    """The record of what one supervisor started, and the guard that undoes it if the
    supervisor dies. Use as a context manager or call ``close()`` at a normal end.

    Args:
        what: a description for logs (``"casfs run debian"``).
        runtime_dir: where records live (default ``casfs.runtime_dir()``).
        guard: start the guard process (False: only the record, for ``sweep``).
    """

    def __init__(self, what: str, runtime_dir: str | None = None, *, guard: bool = True) -> None:
        if runtime_dir is None:
            from .fuse.mount import runtime_dir as default_runtime_dir

            runtime_dir = default_runtime_dir()
        self.path = os.path.join(_lifelines_dir(runtime_dir), f"{uuid.uuid4().hex}.json")
        self.record: dict[str, Any] = {"what": what, "owner": os.getpid(), "owner_start": proc_start(os.getpid()),
                                       "guard": 0, "guard_start": "", "created": time.time(), "items": []}
        _write(self.path, self.record)
        self.guard: subprocess.Popen | None = None
        if guard:
            self.guard = subprocess.Popen(
                [sys.executable, "-S", os.path.abspath(__file__), "guard", self.path],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True, cwd="/")
            self.record["guard"] = self.guard.pid
            self.record["guard_start"] = proc_start(self.guard.pid)
            _write(self.path, self.record)

    def add(self, kind: str, **fields: Any) -> dict:
        """Record a helper (see the module doc for kinds and fields); returns the item. A
        ``pid`` without a ``start`` gets the process's start time read now."""
        item = {"kind": kind, **fields}
        if item.get("pid") and not item.get("start"):
            item["start"] = proc_start(int(item["pid"]))
        self.record["items"].append(item)
        _write(self.path, self.record)
        return item

    def discard(self, item: dict) -> None:
        """Forget ``item`` (the supervisor cleaned it up itself)."""
        with contextlib.suppress(ValueError):
            self.record["items"].remove(item)
            _write(self.path, self.record)

    def close(self) -> None:
        """A normal end: remove the record and stop the guard (nothing is undone)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self.guard is not None and self.guard.poll() is None:
            with contextlib.suppress(OSError):
                self.guard.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.guard.wait(5)

    def __enter__(self) -> "Lifeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- undoing ---------------------------------------------------------------------------------


def _mounted(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except (OSError, IndexError):
        return False


def _mounted_under(path: str) -> bool:
    prefix = path.rstrip("/") + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4].startswith(prefix) or line.split()[4] == path for line in f)
    except (OSError, IndexError):
        return False


def _stop(pid: int, start: str, group: bool, grace: float) -> None:
    if pid <= 0 or not start or not alive(pid, start):
        return  # gone, or never known for sure (a pid alone may have been reused since)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and alive(pid, start):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)
        if not alive(pid, start):
            if group:  # the leader is gone; the rest of its group gets the same end
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            return


def _undo_item(item: dict) -> None:
    kind = item.get("kind")
    if kind in ("group", "process"):
        _stop(int(item["pid"]), str(item.get("start", "")), kind == "group", float(item.get("grace", GRACE)))
    elif kind == "container":
        subprocess.run([item["runtime"], "delete", "--force", item["id"]], capture_output=True, timeout=60)
    elif kind == "mount":
        path = item["path"]
        if item.get("pid"):
            _stop(int(item["pid"]), str(item.get("start", "")), False, float(item.get("grace", 5.0)))
        if _mounted(path):
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=60)
        for suffix in (".json", ".sock"):
            if item.get("record"):
                with contextlib.suppress(OSError):
                    os.unlink(item["record"] + suffix)
    elif kind == "umount":
        if _mounted(item["path"]):
            subprocess.run(["umount", "-l", item["path"]], capture_output=True, timeout=60)
    elif kind == "dir":
        if not _mounted_under(item["path"]):
            shutil.rmtree(item["path"], ignore_errors=True)


def undo(record: dict) -> list[str]:
    """Undo a record's items, last first; returns what failed (one line each)."""
    errors = []
    for item in reversed(record.get("items") or []):
        try:
            _undo_item(item)
        except Exception as e:  # noqa: BLE001 - undo the rest whatever one item does
            errors.append(f"{item.get('kind')} {item.get('path') or item.get('id') or item.get('pid')}: {e}")
    return errors


def sweep(runtime_dir: str) -> list[str]:
    """Undo the records of supervisors that are gone and whose guard is gone too. Returns a
    description of each record undone (``"casfs run debian (pid 123)"``)."""
    d = os.path.join(runtime_dir, "lifelines")
    try:
        names = os.listdir(d)
    except OSError:
        return []
    done = []
    for name in names:
        path = os.path.join(d, name)
        if not name.endswith(".json"):
            if name.endswith(".tmp") and time.time() - os.path.getmtime(path) > 60:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            continue
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if alive(int(rec.get("owner", 0)), str(rec.get("owner_start", ""))):
            continue
        if rec.get("guard") and alive(int(rec["guard"]), str(rec.get("guard_start", ""))):
            continue  # its guard is on it
        undo(rec)
        with contextlib.suppress(OSError):
            os.unlink(path)
        done.append(f"{rec.get('what', '?')} (pid {rec.get('owner')})")
    return done


def sweep_leftovers() -> list[str]:
    """What killed supervisors left behind, cleaned up: lifelines whose supervisor and guard
    are gone (``sweep``) and records of casfs mounts whose daemon is gone (a dead mount is
    detached). Returns one line per thing cleaned up. Called when ``casfs run``, ``casfs
    serve`` and ``casfs mount`` start; cheap when there is nothing (two directory listings)."""
    from .fuse.mount import runtime_dir, sweep_stale_mounts

    d = runtime_dir()
    return sweep(d) + sweep_stale_mounts()


# -- the guard process -----------------------------------------------------------------------


def _guard(path: str) -> int:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # the owner closed its lifeline
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return 0
    owner, start = int(rec["owner"]), str(rec.get("owner_start", ""))
    try:
        fd = os.pidfd_open(owner)
    except OSError:
        fd = -1
    if fd >= 0 and alive(owner, start):
        p = select.poll()
        p.register(fd, select.POLLIN)
        while not p.poll(60_000):
            if not os.path.exists(path):
                return 0  # closed (and our SIGTERM lost)
    elif fd < 0:
        while alive(owner, start):  # no pidfd (old kernel): poll
            time.sleep(0.2)
    try:
        with open(path) as f:
            rec = json.load(f)  # the latest items
    except (OSError, ValueError):
        return 0  # closed normally
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the undo whatever happens now
    undo(rec)
    with contextlib.suppress(OSError):
        os.unlink(path)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "guard":
        sys.exit(_guard(sys.argv[2]))
    print("usage: python lifeline.py guard RECORD", file=sys.stderr)
    sys.exit(2)
