"""CPU snapshots: CRIU checkpoints of process trees, stored as casfs images, restored from them.

The flow::

    proc = snapshot.spawn(["python", "serve.py"], stdout="/var/log/serve.log")
    ref = snapshot.checkpoint(proc, store, "serve-v1")       # waits for snapshot.ready()
    live = snapshot.restore("serve-v1", store, lazy=True)     # as many at once as you like
    live.wait()

* ``spawn`` starts a process the way CRIU needs it: PID 1 of its own PID namespace
  (``unshare -p -f``, so restores get fresh outer PIDs and many can run at once), a session
  leader without a terminal (``setsid``), stdin from /dev/null and stdout/stderr appended to
  files (``O_APPEND``: CRIU does not check the size of such files) or /dev/null.
* ``checkpoint`` checks the rules a snapshotted process must follow (``criu.tree_rule_problems``),
  dumps the tree with ``criu dump``, and stores the image directory as a casfs image: page
  images are cut into chunks that are deduplicated against the store's other images. A JSON
  file ``casfs-snapshot.json`` in the image holds the metadata: the compatibility key (host
  key of ``snapshot.compat`` plus CRIU version, Python and library versions, and the sizes of
  the files the process maps), CRIU's flags, the files it had open, copies of link_remap files
  and /dev/shm segments.
* ``restore`` refuses an incompatible host (``IncompatibleHost``), brings the image directory
  back from the store (exported once per host into a cache directory, or read through a casfs
  FUSE mount with ``source="mount"``), puts back what CRIU does not carry (/dev/shm segments,
  link_remap files, missing append-only logs), and runs ``criu restore``. With ``lazy=True``
  CRIU's lazy-pages daemon (userfaultfd) serves memory pages on first touch, so the process
  runs before its pages arrive; with ``source="mount"`` those pages are read from the casfs
  store on demand through the mount.
* ``restore_or_start`` restores, or falls back to a cold start (optionally taking the
  snapshot for next time) when the snapshot is missing or cannot be restored here.

Everything here runs as root (CRIU needs CAP_SYS_ADMIN and friends).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import stat as statmod
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import casfs

from . import compat, criu as criumod, lifecycle
from .compat import IncompatibleHost
from .criu import CriuError, RuleViolation

__all__ = [
    "META_FILE",
    "RestoredProcess",
    "SnapshotRef",
    "SpawnedProcess",
    "Started",
    "checkpoint",
    "cpu_snapshot_key",
    "drop_export",
    "list_snapshots",
    "read_meta",
    "restore",
    "restore_or_start",
    "restore_problems",
    "spawn",
]

log = logging.getLogger("snapshot.cpu")

META_FILE = "casfs-snapshot.json"
META_FORMAT = 1
EXTRA_DIR = "casfs-extra"
DUMP_FLAGS = ["--tcp-established", "--file-locks", "--link-remap", "--ghost-limit", "64M",
              "--network-lock", "nftables"]
RESTORE_FLAGS = ["--tcp-established", "--file-locks"]


# ---------------------------------------------------------------------------------------------
# spawn


class SpawnedProcess:
    """A process started by ``spawn``: PID 1 of its own PID namespace, ready to be checkpointed.

    Attributes:
        pid: the process to dump (outer PID of the namespace's init).
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
          deterministic: bool = False, ready: bool = True) -> SpawnedProcess:
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
    argv = ["unshare", "-p", "-f", "setsid"]
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
    pid = _first_child(launcher)
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


# ---------------------------------------------------------------------------------------------
# compatibility key


def _mapped_files(pids: list[int]) -> dict[str, int]:
    """path -> size of every regular file mapped by ``pids`` (deleted ones left out)."""
    out: dict[str, int] = {}
    for p in pids:
        try:
            with open(f"/proc/{p}/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/") or parts[5].endswith("(deleted)"):
                continue
            path = parts[5]
            if path in out:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if statmod.S_ISREG(st.st_mode):
                out[path] = st.st_size
    return out


def _dist_version(name: str, where: str) -> str | None:
    """Version of distribution ``name`` installed in the directory ``where`` (None if none).

    Read from the ``<name>-<version>.dist-info`` directory name (one listdir, no metadata
    parsing: this runs on every restore).
    """
    if not where:
        return None
    norm = name.lower().replace("-", "_").replace(".", "_")
    try:
        entries = os.listdir(where)
    except OSError:
        return None
    for entry in entries:
        if entry.endswith(".dist-info"):
            dist, _, version = entry[:-len(".dist-info")].partition("-")
            if dist.lower().replace("-", "_").replace(".", "_") == norm and version:
                return version
    return None


def cpu_snapshot_key(report: dict | None, pids: list[int], criu: criumod.Criu) -> dict[str, Any]:
    """The compatibility key of a CPU snapshot: ``compat.snapshot_key(gpu=False)`` plus
    ``criu`` (version), ``runtime`` (Python and key library versions, from the ready report)
    and ``files`` (path -> size of every file the tree maps: the same must exist at restore)."""
    key = compat.snapshot_key(gpu=False)
    key["criu"] = criu.version_text
    runtime: dict[str, Any] = {}
    if report:
        libs = {}
        for name, info in (report.get("libraries") or {}).items():
            libs[name] = {"version": info.get("version", ""), "path": info.get("path", ""),
                          "dist": _dist_version(name, info.get("path", ""))}
        runtime = {"python": report.get("python"), "executable": report.get("executable"),
                   "libraries": libs}
    key["runtime"] = runtime
    key["files"] = _mapped_files(pids)
    return key


def restore_problems(key: dict[str, Any], criu: criumod.Criu | None = None) -> list[str]:
    """Why a snapshot with ``key`` cannot be restored on this host ([] when it can).

    ``compat.compatibility_problems`` (architecture, CPU flags) plus: CRIU of the same major
    version and not older; the same library versions installed at the recorded paths; every
    mapped file present with its recorded size.
    """
    current = compat.snapshot_key(gpu=False)
    problems = compat.compatibility_problems(key, current)
    if criu is not None and key.get("criu"):
        rec = tuple(int(x) for x in str(key["criu"]).split(".") if x.isdigit())
        if rec[:1] != criu.version[:1] or criu.version < rec:
            problems.append(f"the snapshot was taken with CRIU {key['criu']}, this host has "
                            f"{criu.version_text}: use CRIU {rec[0]}.x >= {key['criu']}")
    for name, info in ((key.get("runtime") or {}).get("libraries") or {}).items():
        want = info.get("dist")
        if want is None:
            continue
        have = _dist_version(name, info.get("path", ""))
        if have != want:
            problems.append(f"{name} {want} is not installed at {info.get('path')} "
                            f"({'found ' + have if have else 'not found'})")
    bad = []
    for path, size in (key.get("files") or {}).items():
        try:
            st = os.stat(path)
            if st.st_size != size:
                bad.append(f"{path} is {st.st_size} bytes, was {size}")
        except OSError:
            bad.append(f"{path} is missing")
    if bad:
        problems.append(f"{len(bad)} file(s) the process maps differ on this host (restore where "
                        f"the same files are at the same paths): " + "; ".join(bad[:5])
                        + (" ..." if len(bad) > 5 else ""))
    return problems


# ---------------------------------------------------------------------------------------------
# checkpoint


@dataclass
class SnapshotRef:
    """A stored CPU snapshot: the casfs image holding it, its tag and its metadata."""

    image_id: str
    tag: str | None
    meta: dict = field(repr=False)
    store_url: str = ""
    timings: dict = field(default_factory=dict)


def _copy_extra(src: str, dumpdir: str, kind: str) -> str:
    """Copy ``src`` into the dump's extra dir; returns its path relative to the dump dir."""
    rel = os.path.join(EXTRA_DIR, kind, uuid.uuid4().hex)
    dest = os.path.join(dumpdir, rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(src, dest)
    return rel


def _shm_segments(pids: list[int]) -> list[str]:
    """Non-deleted files under /dev/shm mapped by ``pids`` (CRIU does not store their contents)."""
    seen: list[str] = []
    for p in pids:
        try:
            with open(f"/proc/{p}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6:
                        path = parts[5].strip()
                        if path.startswith("/dev/shm/") and not path.endswith("(deleted)") \
                                and path not in seen:
                            seen.append(path)
        except OSError:
            continue
    return seen


def _deleted_mapping_dirs(pids: list[int]) -> set[str]:
    """Directories of deleted files that ``pids`` only map (no fd): CRIU's --link-remap puts
    link_remap files there too (vLLM's EngineCore maps an unlinked glibc semaphore in /dev/shm)."""
    dirs: set[str] = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].startswith("/") and parts[5].rstrip().endswith("(deleted)"):
                        dirs.add(os.path.dirname(parts[5].rstrip()[:-len(" (deleted)")]))
        except OSError:
            continue
    return dirs


def checkpoint(proc: SpawnedProcess | int, store: casfs.Store, tag: str | None, *,
               leave_running: bool = False, wait_ready: bool = True, ready_timeout: float = 300.0,
               strict: bool = True, chunk_size: int = casfs.DEFAULT_CHUNK_SIZE,
               dump_dir: str | None = None) -> SnapshotRef:
    """Dump ``proc`` with CRIU and store the images in ``store`` as a casfs image tagged ``tag``.

    Args:
        proc: a ``SpawnedProcess`` (waited on until it calls ``snapshot.ready()`` when
            ``wait_ready``), or the PID of a tree root started some other way.
        leave_running: keep the process running after the dump (``ready()`` then returns
            False in it); by default CRIU kills it.
        strict: refuse to dump a tree that breaks a rule (``RuleViolation``); False only logs.
        chunk_size: casfs chunk size of the image (smaller: finer dedup, more objects).
        dump_dir: where CRIU writes before the images are stored (default: a temp dir).

    Returns:
        a ``SnapshotRef`` with the image id; ``timings`` has ``dump`` and ``store`` seconds.

    Raises:
        RuleViolation: the tree breaks a rule (each reason says how to fix it).
        CriuError: the process died before ready, or CRIU failed (its reason, explained).
        CriuUnavailable: no usable CRIU.
    """
    criu = criumod.find_criu()
    report = None
    if isinstance(proc, SpawnedProcess):
        if wait_ready:
            report = proc.wait_ready(ready_timeout)
        pid = proc.pid
    else:
        pid = int(proc)
    pids = criumod.process_tree(pid)
    cmd = proc.cmd if isinstance(proc, SpawnedProcess) else _cmdline(pid)
    problems = criumod.tree_rule_problems(pid)
    if problems:
        if strict:
            raise RuleViolation(f"process {pid} cannot be snapshotted: " + "; ".join(problems),
                                reasons=problems)
        for p in problems:
            log.warning("snapshot of %d: %s", pid, p)
    files = [f | {"pid": p} for p in pids for f in criumod.open_files(p)]
    key = cpu_snapshot_key(report, pids, criu)
    shm = _shm_segments(pids)
    deleted_dirs = {os.path.dirname(f["target"][:-len(" (deleted)")]) for f in files
                    if f["regular"] and f["deleted"] and f["target"].startswith("/")}
    deleted_dirs |= _deleted_mapping_dirs(pids)  # mapped-only (e.g. glibc semaphores in /dev/shm)
    before_remap = {d: set(_link_remaps(d)) for d in deleted_dirs}

    tmp = dump_dir or tempfile.mkdtemp(prefix="casfs-dump-")
    os.makedirs(tmp, exist_ok=True)
    logs = tempfile.mkdtemp(prefix="casfs-dumplog-")
    try:
        t0 = time.perf_counter()
        args = ["dump", "-t", str(pid), "-D", tmp, *DUMP_FLAGS]
        if leave_running:
            args.append("--leave-running")
        criumod.run(criu, args, log=os.path.join(logs, "dump.log"), action="dump")
        t_dump = time.perf_counter() - t0
        if isinstance(proc, SpawnedProcess) and not leave_running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.launcher.wait(10)
        link_remap = []
        for d in deleted_dirs:
            for name in sorted(set(_link_remaps(d)) - before_remap[d]):
                path = os.path.join(d, name)
                link_remap.append({"path": path, "stored": _copy_extra(path, tmp, "link_remap"),
                                   "mode": statmod.S_IMODE(os.stat(path).st_mode)})  # CRIU checks it
        shm_list = []
        for path in shm:
            with contextlib.suppress(OSError):
                shm_list.append({"path": path, "stored": _copy_extra(path, tmp, "shm"),
                                 "mode": statmod.S_IMODE(os.stat(path).st_mode)})
        if leave_running and isinstance(proc, SpawnedProcess) and report is not None:
            # everything outside CRIU's images is copied: the process may go on (not waiting
            # for the store) and ready() returns False in it
            with contextlib.suppress(ProcessLookupError):
                os.kill(_ready_pid(pid, report), lifecycle.SIG_CONTINUE)
        meta = {
            "format": META_FORMAT, "kind": "cpu", "created": time.time(), "key": key,
            "criu": {"version": criu.version_text, "dump_flags": DUMP_FLAGS + (
                ["--leave-running"] if leave_running else []), "restore_flags": RESTORE_FLAGS},
            "root_pid": pid, "ready": report,
            "cmd": cmd,
            "open_files": [{"path": f["target"], "flags": f["flags"], "size": f["size"],
                            "fd": f["fd"], "pid": f["pid"]}
                           for f in files if f["regular"] and not f["deleted"]],
            "link_remap": link_remap, "shm": shm_list,
            "pages_bytes": sum(os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp)
                               if n.startswith("pages-")),
        }
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        t1 = time.perf_counter()
        res = casfs.build(store, tmp, tag=tag, chunk_size=chunk_size, progress=False)
        t_store = time.perf_counter() - t1
    finally:
        if dump_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    if isinstance(proc, SpawnedProcess) and not leave_running:
        shutil.rmtree(proc.control_dir, ignore_errors=True)
    return SnapshotRef(res.image_id, tag, meta, store.url,
                       {"dump": t_dump, "store": t_store, "new_bytes": res.pack.bytes_new_raw,
                        "bytes": res.pack.bytes_in})


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _link_remaps(d: str) -> list[str]:
    try:
        return [n for n in os.listdir(d) if n.startswith("link_remap.")]
    except OSError:
        return []


def _ready_pid(root_pid: int, report: dict | None) -> int:
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


# ---------------------------------------------------------------------------------------------
# reading snapshots back


def read_meta(image: casfs.Image) -> dict:
    """The snapshot metadata of ``image``.

    Raises:
        ValueError: when the image is not a CPU snapshot (no ``casfs-snapshot.json``).
    """
    try:
        data = image.read(META_FILE)
    except casfs.PathNotFound:
        raise ValueError(f"image {image.name} is not a CPU snapshot (no {META_FILE})") from None
    meta = json.loads(data)
    if meta.get("format") != META_FORMAT or meta.get("kind") != "cpu":
        raise ValueError(f"image {image.name}: snapshot format {meta.get('format')!r} is not "
                         f"{META_FORMAT}: take the snapshot again")
    return meta


def list_snapshots(store: casfs.Store) -> list[tuple[str, str, dict]]:
    """(tag, image id, metadata) of every tagged CPU snapshot in ``store``, sorted by tag."""
    out = []
    for tag in sorted(store.tags()):
        try:
            image = store.open_image(tag)
            if not image.exists(META_FILE):
                continue
            out.append((tag, image.id, read_meta(image)))
        except (casfs.CasfsError, ValueError):
            continue
    return out


def snapshot_cache_dir() -> str:
    """Where exported snapshot images are kept: ``$CASFS_SNAPSHOT_CACHE``, else
    ``$CASFS_HOME/snapshots`` (default ``~/.local/share/casfs/snapshots``)."""
    if os.environ.get("CASFS_SNAPSHOT_CACHE"):
        return os.environ["CASFS_SNAPSHOT_CACHE"]
    home = os.environ.get("CASFS_HOME", "~/.local/share/casfs")
    return os.path.join(os.path.abspath(os.path.expanduser(home)), "snapshots")


def export_image(image: casfs.Image, dest: str, *, span_chunks: int = 8) -> int:
    """Write every file and directory of ``image`` under the new directory ``dest``.

    Large files are read in spans of ``span_chunks`` chunks with the next span prefetched.
    Returns the bytes written.
    """
    os.makedirs(dest, exist_ok=True)
    total = 0
    span = image.chunk_size * span_chunks
    for path, st in image.walk(""):
        if not path:
            continue
        target = os.path.join(dest, path)
        if st.is_dir:
            os.makedirs(target, exist_ok=True)
            continue
        if st.is_symlink:
            os.symlink(image.readlink(path), target)
            continue
        if not st.is_file:
            continue
        entry = image.lookup(path)
        image.prefetch_entry(entry, 0, span)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, statmod.S_IMODE(st.mode) or 0o600)
        try:
            off = 0
            while off < st.size:
                if off + span < st.size:
                    image.prefetch_entry(entry, off + span, span)
                data = image.read_entry(entry, off, span)
                if not data:
                    break
                mv = memoryview(data)
                while mv:
                    n = os.write(fd, mv)
                    mv = mv[n:]
                off += len(data)
                total += len(data)
        finally:
            os.close(fd)
    return total


def _materialize(image: casfs.Image, cache_dir: str | None) -> tuple[str, bool]:
    """The image exported under the cache dir (done once per image id); (path, was it cached)."""
    root = cache_dir or snapshot_cache_dir()
    final = os.path.join(root, image.id)
    if os.path.isfile(os.path.join(final, META_FILE)):
        return final, True
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{image.id[:16]}.", dir=root)
    try:
        export_image(image, tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent restore exported it first
            if not os.path.isfile(os.path.join(final, META_FILE)):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final, False


def drop_export(image_id: str, cache_dir: str | None = None) -> bool:
    """Remove the per-host export of snapshot image ``image_id`` (True if there was one).

    Exports are kept until removed (they make repeat restores fast). Do not drop one that a
    lazy restore still reads (``RestoredProcess.lazy_done()``).
    """
    path = os.path.join(cache_dir or snapshot_cache_dir(), image_id)
    if not os.path.isdir(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _mapped_by_anyone(path: str) -> bool:
    """Whether any process on this host maps or holds ``path`` open."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                if any(line.rstrip().endswith(" " + path) for line in f):
                    return True
        except OSError:
            continue
    return False


def _prepare_host(meta: dict, imgdir: str) -> None:
    """Put back what CRIU does not carry: /dev/shm segments, link_remap files, missing logs.

    Raises:
        CriuError: when a file the process had open read-only is missing here.
    """
    for kind in ("shm", "link_remap"):
        for item in meta.get(kind) or []:
            if kind == "shm" and os.path.exists(item["path"]) and not _mapped_by_anyone(item["path"]):
                with contextlib.suppress(OSError):  # left by an earlier replica: stale contents
                    os.unlink(item["path"])
            if os.path.exists(item["path"]):
                continue
            os.makedirs(os.path.dirname(item["path"]), exist_ok=True)
            # unique per thread too: concurrent restores may run in one process
            tmp = f"{item['path']}.casfs-{os.getpid()}-{threading.get_ident()}"
            shutil.copyfile(os.path.join(imgdir, item["stored"]), tmp)
            os.chmod(tmp, item.get("mode", 0o600))  # restore refuses a link_remap whose mode differs
            with contextlib.suppress(OSError):
                os.link(tmp, item["path"])  # never replaces one a concurrent restore put back
            os.unlink(tmp)
    missing = []
    for f in meta.get("open_files") or []:
        if os.path.exists(f["path"]):
            continue
        acc = f["flags"] & os.O_ACCMODE
        if acc == os.O_WRONLY and f["flags"] & os.O_APPEND:
            os.makedirs(os.path.dirname(f["path"]), exist_ok=True)
            os.close(os.open(f["path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
        else:
            missing.append(f["path"])
    if missing:
        raise CriuError("files the snapshotted process had open are missing on this host: "
                        + ", ".join(missing[:5]) + ": restore where they exist")


# ---------------------------------------------------------------------------------------------
# restore


class RestoredProcess:
    """A process tree restored by ``restore``.

    A small reaper process stays its parent (so it is reaped and its status known); ``pid`` is the
    restored tree's root (outer PID), ``ready_pid`` the process woken from ``ready()``.
    ``timings`` (seconds): ``open`` (index + metadata + key check), ``fetch`` (images out of
    casfs, or the mount), ``lazy_start`` (the lazy-pages daemon up; 0 when eager), ``criu``
    (restore until the tree runs), ``total``; ``cached`` says the export was reused.
    """

    def __init__(self, criu_proc: subprocess.Popen, pid: int, ready_pid: int, workdir: str,
                 lazy_proc: subprocess.Popen | None, mountpoint: str | None, image_id: str,
                 timings: dict) -> None:
        self.criu_proc = criu_proc
        self.pid = pid
        self.ready_pid = ready_pid
        self.workdir = workdir
        self.lazy_proc = lazy_proc
        self.mountpoint = mountpoint
        self.image_id = image_id
        self.timings = timings
        self._cleanup_lock = threading.Lock()
        self._cleaned = False
        self._releaser: threading.Thread | None = None
        if lazy_proc is not None or mountpoint is not None:
            self._releaser = threading.Thread(target=self._release_sources, daemon=True,
                                              name=f"snapshot-restore-{pid}")
            self._releaser.start()

    def __repr__(self) -> str:
        return f"<RestoredProcess pid={self.pid} running={self.poll() is None}>"

    def _release_sources(self) -> None:
        """Unmount the image once nothing reads it (the lazy-pages daemon finished)."""
        if self.lazy_proc is not None:
            self.lazy_proc.wait()
        if self.mountpoint is not None:
            with contextlib.suppress(casfs.CasfsError, OSError):
                casfs.unmount(self.mountpoint)

    def lazy_done(self, timeout: float | None = None) -> bool:
        """Wait for the lazy-pages daemon to finish serving pages (True at once if eager)."""
        if self.lazy_proc is None:
            return True
        try:
            self.lazy_proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def poll(self) -> int | None:
        return self.criu_proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the restored tree to exit; returns its root's exit status (128+N: signal N).

        Raises:
            subprocess.TimeoutExpired: after ``timeout`` seconds.
        """
        rc = self.criu_proc.wait(timeout)
        self.close()
        return rc

    def kill(self) -> None:
        """Kill the restored tree (SIGKILL to its init) and clean up."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.criu_proc.wait(10)
        self.close()

    def close(self) -> None:
        """Remove the restore's work dir (logs) once the tree has exited."""
        with self._cleanup_lock:
            if self._cleaned or self.criu_proc.poll() is None:
                return
            self._cleaned = True
        if self.lazy_proc is not None and self.lazy_proc.poll() is None:
            self.lazy_proc.kill()
            self.lazy_proc.wait()
        if self._releaser is not None:
            self._releaser.join(30)  # the mount under the work dir is gone before it is removed
        shutil.rmtree(self.workdir, ignore_errors=True)


def _open_snapshot(ref: SnapshotRef | str, store: casfs.Store) -> tuple[casfs.Image, dict]:
    name = ref.image_id if isinstance(ref, SnapshotRef) else ref
    image = store.open_image(name)
    return image, read_meta(image)


def _wait_pidfile(proc: subprocess.Popen, path: str, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                text = f.read()
            if text.endswith("\n") or text.strip().isdigit():
                return int(text.strip())
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.01)
    return None


def restore(ref: SnapshotRef | str, store: casfs.Store, *, lazy: bool = False,
            source: str = "export", cache_dir: str | None = None, check: bool = True,
            timeout: float = 300.0) -> RestoredProcess:
    """Restore a CPU snapshot (a ``SnapshotRef``, tag or image id) from ``store`` and run it.

    Many restores of one snapshot can run at once (each gets its own PID namespace).

    Args:
        lazy: run the process before its memory arrives (CRIU lazy-pages, userfaultfd).
        source: "export": the image is exported once per host into ``cache_dir`` (default
            ``snapshot_cache_dir()``) and CRIU reads it there; "mount": CRIU reads a casfs FUSE
            mount of the image (with ``lazy``, pages come from the store as they are touched).
        check: refuse a host the snapshot's key does not match.

    Raises:
        IncompatibleHost: the key does not match this host (fall back to a cold start).
        CriuError: CRIU failed (the reason from its log, with the fix for known rules).
        CriuUnavailable: no usable CRIU here.
        casfs.ImageNotFound: no such snapshot.
    """
    if source not in ("export", "mount"):
        raise ValueError(f"source must be 'export' or 'mount', not {source!r}")
    t0 = time.perf_counter()
    criu = criumod.find_criu()
    if lazy and not criu.features.get("uffd-noncoop", False):
        raise CriuError("lazy restore needs userfaultfd with non-cooperative events, which this "
                        "kernel lacks: restore with lazy=False")
    image, meta = _open_snapshot(ref, store)
    if check:
        key = dict(meta["key"])  # files put back by _prepare_host need not be here yet
        own = {i["path"] for kind in ("shm", "link_remap") for i in meta.get(kind) or []}
        key["files"] = {p: n for p, n in (key.get("files") or {}).items() if p not in own}
        problems = restore_problems(key, criu)
        if problems:
            raise IncompatibleHost(problems)
    t_open = time.perf_counter() - t0
    work = tempfile.mkdtemp(prefix="casfs-restore-")
    mountpoint = None
    lazy_proc = None
    try:
        if source == "mount":
            mountpoint = os.path.join(work, "images")
            os.mkdir(mountpoint)
            casfs.mount(image, mountpoint)
            imgdir, cached = mountpoint, False
        else:
            imgdir, cached = _materialize(image, cache_dir)
        t_fetch = time.perf_counter() - t0 - t_open
        _prepare_host(meta, imgdir)
        flags = list((meta.get("criu") or {}).get("restore_flags") or RESTORE_FLAGS)
        pidfile = os.path.join(work, "pid")
        args = ["restore", "-D", imgdir, "-W", work, "--pidfile", pidfile, *flags]
        t_lazy = time.perf_counter()
        if lazy:
            sock = os.path.join(work, "lazy-pages.socket")
            lazy_proc = criumod.start(criu, ["lazy-pages", "-D", imgdir, "-W", work],
                                      log=os.path.join(work, "lazy-pages.log"),
                                      stderr_path=os.path.join(work, "lazy-pages.err"))
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if lazy_proc.poll() is not None or time.monotonic() > deadline:
                    raise criumod.failure("criu lazy-pages did not start",
                                          os.path.join(work, "lazy-pages.log"))
                time.sleep(0.0005)
            args.append("--lazy-pages")
        t2 = time.perf_counter()
        t_lazy = t2 - t_lazy
        proc = criumod.start_restore(criu, args, log=os.path.join(work, "restore.log"),
                                     stderr_path=os.path.join(work, "restore.err"))
        pid = _wait_pidfile(proc, pidfile, timeout)
        if pid is None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise criumod.failure(f"criu restore of {image.name} failed (exit {proc.returncode})",
                                  os.path.join(work, "restore.log"),
                                  extra=criumod.read_tail(os.path.join(work, "restore.err")))
        t_criu = time.perf_counter() - t2
    except BaseException:
        if lazy_proc is not None and lazy_proc.poll() is None:
            lazy_proc.kill()
            lazy_proc.wait()
        if mountpoint is not None:
            with contextlib.suppress(casfs.CasfsError, OSError):
                casfs.unmount(mountpoint)
        # keep the logs of a failed restore for the user (the message names them)
        raise
    ready_pid = _ready_pid(pid, meta.get("ready"))
    if meta.get("ready"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(ready_pid, lifecycle.SIG_RESTORED)
    timings = {"open": t_open, "fetch": t_fetch, "lazy_start": t_lazy, "criu": t_criu, "cached": cached,
               "total": time.perf_counter() - t0}
    return RestoredProcess(proc, pid, ready_pid, work, lazy_proc, mountpoint, image.id, timings)


# ---------------------------------------------------------------------------------------------
# restore, or start cold


@dataclass
class Started:
    """What ``restore_or_start`` did: ``process`` runs; ``restored`` says how it started;
    ``reason`` is why a restore was not possible (None when restored); ``snapshot`` is the
    snapshot taken on a cold start (when asked for)."""

    process: RestoredProcess | SpawnedProcess
    restored: bool
    reason: str | None = None
    snapshot: SnapshotRef | None = None


def restore_or_start(store: casfs.Store, tag: str, cmd: Sequence[str], *, lazy: bool = False,
                     create: bool = True, source: str = "export", cache_dir: str | None = None,
                     stdout: str | None = None,
                     stderr: str | None | bool = True, cwd: str | None = None,
                     env: dict[str, str] | None = None, ready_timeout: float = 300.0) -> Started:
    """Restore snapshot ``tag``; when it is missing or cannot restore here, start ``cmd`` cold.

    On a cold start with ``create``, the process is snapshotted once it calls
    ``snapshot.ready()`` and left running (the snapshot is tagged ``tag`` for the next boot).
    A restore failure for any reason (missing, incompatible host, CRIU failure, no CRIU)
    falls back; the reason is in ``Started.reason`` and logged.

    Raises:
        CriuError/RuleViolation: only from the snapshot taken on a cold start.
    """
    try:
        return Started(restore(tag, store, lazy=lazy, source=source, cache_dir=cache_dir), True)
    except (IncompatibleHost, CriuError, casfs.CasfsError, ValueError) as e:
        reason = str(e)
        log.warning("snapshot %s not restored, starting cold: %s", tag, reason)
    proc = spawn(cmd, stdout=stdout, stderr=stderr, cwd=cwd, env=env, ready=create)
    ref = None
    if create:
        try:
            ref = checkpoint(proc, store, tag, leave_running=True, ready_timeout=ready_timeout)
        except BaseException:
            proc.kill()
            raise
    return Started(proc, False, reason, ref)
