"""The kernel side of a mount: finding it in /proc/self/mountinfo, tuning it, detaching it.

Tuning (root only; a mount works untuned, only slower): ``read_ahead_kb`` of the mount's bdi
(``/sys/class/bdi/<maj>:<min>/``) sets how far the kernel reads ahead, and so how large its
FUSE read requests are (up to libfuse's 1 MiB cap); ``max_background`` and
``congestion_threshold`` of the FUSE connection (``/sys/fs/fuse/connections/<dev>/``, fusectl
is mounted there when absent) bound how many readahead requests are in flight at once.

None of these functions stat the mount point itself: that blocks while the daemon does not
answer, and deadlocks the daemon when it is the one asking.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

log = logging.getLogger("casfs.fuse")

FUSECTL_DIR = "/sys/fs/fuse/connections"
MNT_DETACH = 2


def resolve(mountpoint: str) -> str:
    """Absolute, symlink-free path of ``mountpoint``; only its parent is resolved (see above)."""
    path = os.path.abspath(mountpoint)
    parent, name = os.path.split(path)
    if not name:
        return path
    return os.path.join(os.path.realpath(parent), name)


def _unescape(field: str) -> str:
    if "\\" not in field:
        return field
    raw = field.encode("utf-8", "surrogateescape").decode("unicode_escape").encode("latin-1")
    return raw.decode("utf-8", "surrogateescape")


def find_mount(mountpoint: str) -> tuple[int, int, str] | None:
    """(major, minor, fstype) of the topmost mount at ``mountpoint``, or None."""
    target = resolve(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 10 or _unescape(parts[4]) != target:
                    continue
                sep = parts.index("-", 6)
                maj, _, mn = parts[2].partition(":")
                found = (int(maj), int(mn), parts[sep + 1])
    except (OSError, ValueError):
        return None
    return found


def is_mounted(mountpoint: str) -> bool:
    """True when a FUSE filesystem is mounted at ``mountpoint``."""
    m = find_mount(mountpoint)
    return m is not None and m[2].startswith("fuse")


def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def ensure_fusectl() -> bool:
    """Mount fusectl at /sys/fs/fuse/connections when it is not mounted (root). True if usable."""
    m = find_mount(FUSECTL_DIR)
    if m is not None and m[2] == "fusectl":
        return True
    if os.geteuid() != 0 or not os.path.isdir(FUSECTL_DIR):
        return False
    if _libc().mount(b"fusectl", FUSECTL_DIR.encode(), b"fusectl", 0, None) != 0:
        e = _errno()
        if e != errno.EBUSY:
            log.warning("cannot mount fusectl at %s: %s", FUSECTL_DIR, os.strerror(e))
            return False
    return True


def _write_sys(path: str, value: int) -> str | None:
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
        return None
    except OSError as e:
        return f"{path}: {e.strerror}"


def tune(mountpoint: str, read_ahead_kb: int, max_background: int) -> dict[str, Any]:
    """Set readahead and FUSE background limits for the FUSE mount at ``mountpoint``.

    Must run after the kernel's FUSE_INIT was answered: INIT clamps readahead to what the
    daemon accepted. Failures are logged and listed under ``errors``, never raised.
    """
    out: dict[str, Any] = {"errors": []}
    m = find_mount(mountpoint)
    if m is None:
        out["errors"].append(f"{mountpoint} is not in /proc/self/mountinfo")
        return out
    maj, mn, _ = m
    out["device"] = f"{maj}:{mn}"
    err = _write_sys(f"/sys/class/bdi/{maj}:{mn}/read_ahead_kb", read_ahead_kb)
    if err:
        out["errors"].append(err)
    else:
        out["read_ahead_kb"] = read_ahead_kb
    if ensure_fusectl():
        conn = os.path.join(FUSECTL_DIR, str((maj << 20) | mn))  # the kernel's dev_t
        congestion = max(1, max_background * 3 // 4)
        # max_background first: congestion_threshold may not exceed it
        for name, value in (("max_background", max_background), ("congestion_threshold", congestion)):
            err = _write_sys(os.path.join(conn, name), value)
            if err:
                out["errors"].append(err)
            else:
                out[name] = value
    else:
        out["errors"].append("fusectl is not available (not root?)")
    for e in out["errors"]:
        log.warning("kernel tuning: %s", e)
    return out


def detach(mountpoint: str) -> None:
    """Lazily detach the mount at ``mountpoint`` (root: umount2 MNT_DETACH; else fusermount3 -u -z)."""
    if os.geteuid() == 0:
        if _libc().umount2(resolve(mountpoint).encode("utf-8", "surrogateescape"), MNT_DETACH) == 0:
            return
        e = _errno()
        if e in (errno.EINVAL, errno.ENOENT):
            return  # not mounted (any more)
        log.warning("umount2(%s) failed: %s", mountpoint, os.strerror(e))
    import subprocess

    for tool in ("fusermount3", "fusermount"):
        try:
            subprocess.run([tool, "-u", "-z", mountpoint], check=False, capture_output=True, timeout=30)
            return
        except FileNotFoundError:
            continue
