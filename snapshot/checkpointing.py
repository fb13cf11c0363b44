"""Checkpointing: dump a process tree with CRIU and store the images as a casfs image.

``checkpoint`` checks the rules a snapshotted process must follow (``criu.tree_rule_problems``),
dumps the tree with ``criu dump``, and stores the image directory as a casfs image: page
images are cut into chunks that are deduplicated against the store's other images. What CRIU
does not carry is copied into the image too: link_remap files and /dev/shm segments.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat as statmod
import subprocess
import tempfile
import time
import uuid
from typing import TYPE_CHECKING

import casfs

from . import criu as criumod, lifecycle, pagelayout
from .criu import RuleViolation
from .hostkey import cpu_snapshot_key
from .meta import EXTRA_DIR, META_FILE, META_FORMAT, SnapshotRef
from .shm import shm_segments
from .spawning import SpawnedProcess, ready_caller_pid

if TYPE_CHECKING:
    from .gpu import Suspended

__all__ = ["DUMP_FLAGS", "RESTORE_FLAGS", "SNAPSHOT_CHUNK_SIZE", "checkpoint"]

log = logging.getLogger("snapshot.cpu")

# 64 KiB: a fault fetches and verifies 64 KiB instead of 4 MiB, and windows of the address space
# that two snapshots of one engine share become shared chunks (55% of a second tiny vLLM
# snapshot's pages at 64 KiB, 38% at 256 KiB, 5.5% at 4 MiB; docs/benchmarks.md).
SNAPSHOT_CHUNK_SIZE = 64 << 10

DUMP_FLAGS = ["--tcp-established", "--file-locks", "--link-remap", "--ghost-limit", "64M",
              "--network-lock", "nftables"]
RESTORE_FLAGS = ["--tcp-established", "--file-locks"]


def _copy_extra(src: str, dumpdir: str, kind: str) -> str:
    """Copy ``src`` into the dump's extra dir; returns its path relative to the dump dir."""
    rel = os.path.join(EXTRA_DIR, kind, uuid.uuid4().hex)
    dest = os.path.join(dumpdir, rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(src, dest)
    return rel


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
               strict: bool = True, chunk_size: int = SNAPSHOT_CHUNK_SIZE,
               dump_dir: str | None = None, gpu: "Suspended | None" = None,
               layout: str = "windows") -> SnapshotRef:
    """Dump ``proc`` with CRIU and store the images in ``store`` as a casfs image tagged ``tag``.

    Args:
        proc: a ``SpawnedProcess`` (waited on until it calls ``snapshot.ready()`` when
            ``wait_ready``), or the PID of a tree root started some other way.
        leave_running: keep the process running after the dump (``ready()`` then returns
            False in it); by default CRIU kills it.
        strict: refuse to dump a tree that breaks a rule (``RuleViolation``); False only logs.
        chunk_size: casfs chunk size of the image, and the page window (``snapshot.pagelayout``):
            smaller: finer dedup and smaller fetches on a fault, more objects (small frames
            travel in packs). Default 64 KiB (see ``SNAPSHOT_CHUNK_SIZE``).
        dump_dir: where CRIU writes before the images are stored (default: a temp dir).
        gpu: the process's GPU state, already moved into its host memory by
            ``snapshot.suspend`` (a GPU snapshot): the key then records the GPU models, driver
            and CUDA versions (a restore host must match them), and the snapshot stores what
            ``Suspended.from_dict`` needs to ``resume`` the restored process.
        layout: "windows" (default): lazily restorable pages are stored by address window
            (``snapshot.pagelayout``: dedup between snapshots of one engine, restores from the
            store); "criu": CRIU's own pages files, as dumped (readable through a mount).

    Returns:
        a ``SnapshotRef`` with the image id; ``timings`` has ``dump`` and ``store`` seconds.

    Raises:
        RuleViolation: the tree breaks a rule (each reason says how to fix it).
        CriuError: the process died before ready, or CRIU failed (its reason, explained).
        CriuUnavailable: no usable CRIU.
    """
    if layout not in ("windows", "criu"):
        raise ValueError(f"layout must be 'windows' or 'criu', not {layout!r}")
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
    shm = shm_segments(pids)  # stored with the images and put back before every restore
    problems = criumod.tree_rule_problems(pid, saved=shm)
    if problems:
        if strict:
            raise RuleViolation(f"process {pid} cannot be snapshotted: " + "; ".join(problems),
                                reasons=problems)
        for p in problems:
            log.warning("snapshot of %d: %s", pid, p)
    files = [f | {"pid": p} for p in pids for f in criumod.open_files(p)]
    key = cpu_snapshot_key(report, pids, criu)
    if gpu is not None:
        key["gpu"] = gpu.key
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
                os.kill(ready_caller_pid(pid, report), lifecycle.SIG_CONTINUE)
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
            "gpu": gpu.to_dict() if gpu is not None else None,
            "pages_bytes": sum(os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp)
                               if n.startswith("pages-")),
        }
        if layout == "windows":
            meta["layout"] = {"kind": "windows", "window": chunk_size,
                              **pagelayout.relayout_dump(tmp, chunk_size)}

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

