"""The compatibility key of a CPU snapshot, and why a host does not match one.

The key is ``snapshot.compat``'s host key plus the CRIU version, the Python and library
versions the process reported in ``snapshot.ready()``, and the sizes of the files the process
maps: the same files must be at the same paths at restore.
"""

from __future__ import annotations

import os
import stat as statmod
from typing import Any

from . import compat, criu as criumod

__all__ = ["cpu_snapshot_key", "restore_problems"]


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
    if key.get("gpu"):  # a GPU snapshot: this host's GPUs, driver and CUDA must match
        try:
            current["gpu"] = compat.gpu_key()
        except compat.GpuUnavailable:
            pass
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

