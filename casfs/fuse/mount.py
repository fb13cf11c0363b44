"""Mounting and unmounting images: ``casfs.mount`` / ``casfs.unmount``, mount records, control.

``mount(image, mountpoint)`` returns once the mount answers; a daemon process serves it (see
``casfs.fuse.daemon``). Each mount has a record in the runtime directory
(``$CASFS_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/casfs``, else ``/run/casfs`` for root, else
``/tmp/casfs-<uid>``), named by a hash of the mount point: ``<key>.json`` (pid, image, socket,
log), ``<key>.sock`` (the daemon's control socket) and ``<key>.log`` (its log).

This module stays cheap to import (it is part of ``import casfs``): pyfuse3 and trio load only
in the process that serves a mount.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CasfsError
from ..fsutil import atomic_open
from ..lifeline import alive
from .kernel import detach, find_mount, is_mounted, resolve

if TYPE_CHECKING:
    from ..image import Image

log = logging.getLogger("casfs.fuse")

# From benchmarks/bench_readahead.py (1 GiB file, 2-core VM): 128 KiB 0.45-0.61 GiB/s cold,
# 1024 0.55-0.81, 2048-4096 0.75-0.87, 8192-32768 0.49-0.64 (thrashing). Requests stay 1 MiB
# (libfuse 3.14's cap): more readahead only adds requests in flight, which max_background must allow.
DEFAULT_READ_AHEAD_KB = 4096
DEFAULT_MAX_BACKGROUND = 64


class MountError(CasfsError):
    """A mount could not be started, found, or stopped."""


@dataclass
class MountOptions:
    """How to serve a mount.

    Attributes:
        allow_other: let users other than the mounter see the files (needs root or
            ``user_allow_other`` in /etc/fuse.conf).
        read_ahead_kb: kernel readahead for the mount in KiB (None: ``DEFAULT_READ_AHEAD_KB``).
        max_background: FUSE background requests in flight (None: ``DEFAULT_MAX_BACKGROUND``).
        record_profile: record a startup profile for this many seconds (None: do not).
        replay_profile: prefetch the image's stored startup profile in the background.
        readahead: user-space sequential readahead and safetensors prefetch.
        fetch_threads: chunk fetches running at once for foreground reads.
        replay_concurrency: profile chunks fetched at once while no foreground read waits (16:
            blob requests are round-trip bound; 4 -> 16 cut a replayed import torch over a 50 ms
            link from 9.2 s to 6.0-6.8 s).
        timeout: seconds the kernel caches entries and attributes.
        log_file: the daemon's log (None: ``<runtime dir>/<key>.log``).
        verbose: daemon log level: 0 warnings, 1 info, 2 debug.
    """

    allow_other: bool = False
    read_ahead_kb: int | None = None
    max_background: int | None = None
    record_profile: float | None = None
    replay_profile: bool = True
    readahead: bool = True
    fetch_threads: int = 32
    replay_concurrency: int = 16
    timeout: float = 86400.0
    log_file: str | None = None
    verbose: int = 1


@dataclass
class MountInfo:
    """A running mount, as recorded in the runtime directory."""

    mountpoint: str
    pid: int
    image_id: str
    name: str
    store_url: str
    socket: str
    log: str
    started: float
    pid_start: str = ""
    kernel: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# runtime records


def runtime_dir() -> str:
    """Where mount records, control sockets and daemon logs live (created 0700)."""
    d = os.environ.get("CASFS_RUNTIME_DIR")
    if not d:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg:
            d = os.path.join(xdg, "casfs")
        elif os.geteuid() == 0:
            d = "/run/casfs"
        else:
            d = f"/tmp/casfs-{os.getuid()}"
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def runtime_key(mountpoint: str) -> str:
    """Path prefix (without suffix) of the runtime files of the mount at ``mountpoint``."""
    from ..digest import digest_bytes

    name = digest_bytes(resolve(mountpoint).encode("utf-8", "surrogateescape")).hex()[:16]
    return os.path.join(runtime_dir(), name)


def read_record(mountpoint: str) -> MountInfo | None:
    """The record of the casfs mount at ``mountpoint``, or None."""
    try:
        with open(runtime_key(mountpoint) + ".json") as f:
            return MountInfo(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def write_record(info: MountInfo) -> None:
    path = runtime_key(info.mountpoint) + ".json"
    with atomic_open(path) as f:
        json.dump(asdict(info), f)


def remove_record(mountpoint: str, pid: int) -> None:
    """Delete the record and socket of ``mountpoint`` if they belong to ``pid``."""
    rec = read_record(mountpoint)
    if rec is not None and rec.pid != pid:
        return  # a newer mount owns them
    key = runtime_key(mountpoint)
    for suffix in (".json", ".sock"):
        try:
            os.unlink(key + suffix)
        except OSError:
            pass


def _dead_mount(path: str) -> bool:
    """True when the FUSE mount at ``path`` has no daemon any more (ENOTCONN)."""
    import errno

    try:
        os.listdir(path)  # a stat may be answered from the kernel's cache; a listing may not
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def sweep_stale_mounts() -> list[str]:
    """Remove the records of mounts whose daemon is gone (killed), detaching the dead mount
    ("Transport endpoint is not connected") when it is still there. Returns one line per
    mount cleaned up."""
    d = runtime_dir()
    done = []
    try:
        names = [n for n in os.listdir(d) if n.endswith(".json")]
    except OSError:
        return []
    for n in names:
        key = os.path.join(d, n[:-5])
        try:
            with open(key + ".json") as f:
                rec = MountInfo(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue
        if alive(rec.pid, rec.pid_start) or runtime_key(rec.mountpoint) != key:
            continue
        m = find_mount(rec.mountpoint)
        if m is not None and m[2] == "fuse.casfs" and _dead_mount(rec.mountpoint):
            detach(rec.mountpoint)
        for suffix in (".json", ".sock"):
            try:
                os.unlink(key + suffix)
            except OSError:
                pass
        done.append(f"the mount of {rec.name} at {rec.mountpoint} (daemon pid {rec.pid} was killed)")
    return done


# ---------------------------------------------------------------------------------------------
# the control socket, client side


def control(mountpoint: str, cmd: str, timeout: float = 30.0) -> dict:
    """Send ``cmd`` (``ping``, ``stats``, ``profile-stop``) to the daemon serving ``mountpoint``.

    Returns its JSON reply.

    Raises:
        MountError: when no daemon serves it, it does not answer, or the command failed.
    """
    import socket

    rec = read_record(mountpoint)
    if rec is None:
        raise MountError(f"{mountpoint}: no casfs mount recorded here (see `casfs mount`)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    buf = b""
    try:
        s.connect(rec.socket)
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        while not buf.endswith(b"\n"):
            got = s.recv(1 << 16)
            if not got:
                break
            buf += got
    except OSError as e:
        raise MountError(f"{mountpoint}: the casfs daemon (pid {rec.pid}) does not answer: "
                         f"{e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise MountError(f"{mountpoint}: bad reply from the casfs daemon: {buf[:200]!r}") from None
    if not reply.get("ok"):
        raise MountError(f"{mountpoint}: {reply.get('error', 'command failed')}")
    return reply


# ---------------------------------------------------------------------------------------------
# mount / unmount


def _read_ready(fd: int, timeout: float) -> str:
    import select

    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                return "error the casfs daemon did not become ready in time"
            if not select.select([fd], [], [], left)[0]:
                continue
            got = os.read(fd, 4096)
            if not got:
                break
            buf += got
    finally:
        os.close(fd)
    return buf.decode("utf-8", "replace").strip()


def check_mountpoint(mountpoint: str) -> None:
    """Refuse a mount point that is missing, not a directory, or not empty. A non-empty one is
    refused rather than warned about: the mount would hide its files until unmounted (a
    mistyped path over a real directory looks like data loss), and nothing casfs mounts needs
    to sit on top of files.

    Raises:
        MountError: saying which, and what to do.
    """
    if not os.path.lexists(mountpoint):
        raise MountError(f"{mountpoint}: mount point does not exist (create it: mkdir -p {mountpoint})")
    if not os.path.isdir(mountpoint):
        raise MountError(f"{mountpoint}: mount point is not a directory")
    try:
        with os.scandir(mountpoint) as it:
            first = next(it, None)
    except OSError as e:
        raise MountError(f"{mountpoint}: cannot read the mount point ({e.strerror})") from None
    if first is not None:
        raise MountError(f"{mountpoint}: mount point is not empty (it holds {first.name!r}, ...); "
                         "mounting would hide its files: use an empty directory")


def mount(image: "Image", mountpoint: str, options: MountOptions | None = None, *,
          foreground: bool = False, ready_timeout: float = 60.0, **kw: Any) -> MountInfo:
    """Mount ``image`` read-only at ``mountpoint``; returns once the mount answers.

    Options come as a ``MountOptions`` or as its fields by keyword
    (``casfs.mount(image, "/mnt/x", read_ahead_kb=4096, record_profile=30)``). A daemon
    serves the mount; stop it with ``unmount(mountpoint)`` (or SIGTERM, or ``umount``). With
    ``foreground=True`` this process serves it and the call returns after it was unmounted.

    Raises:
        MountError: when the mount fails (the message says why; the daemon's log has more).
        TypeError: for unknown options.
    """
    from . import daemon

    if options is not None and kw:
        raise TypeError("pass options either as a MountOptions or as keywords, not both")
    opts = options or MountOptions(**kw)
    mountpoint = resolve(mountpoint)
    if foreground:
        got: list[MountInfo] = []
        daemon.serve(image, mountpoint, opts, on_ready=got.append)
        if not got:
            raise MountError(f"{mountpoint}: the mount ended before it was ready")
        return got[0]
    sweep_stale_mounts()  # a daemon killed here before leaves a dead mount in the way
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint}: something is already mounted here (casfs umount {mountpoint})")
    check_mountpoint(mountpoint)
    log_path = opts.log_file or runtime_key(mountpoint) + ".log"
    try:  # the daemon logs there: a path it cannot open would fail it silently
        os.close(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise MountError(f"log file {log_path}: cannot write it ({e.strerror}); choose another --log-file") from None
    r, w = os.pipe()
    start = daemon.fork if daemon.forkable(image) else daemon.spawn
    start(image, mountpoint, opts, r, w, log_path)
    msg = _read_ready(r, ready_timeout)
    if not msg.startswith("ready"):
        raise MountError(msg.partition(" ")[2] if msg.startswith("error") else
                         f"the casfs daemon exited before mounting (see {log_path})")
    os.stat(mountpoint)  # returns once the mount answers
    rec = read_record(mountpoint)
    if rec is None:
        raise MountError(f"{mountpoint}: the daemon reported ready but left no record in {runtime_dir()}")
    return rec


def unmount(mountpoint: str, timeout: float = 20.0) -> None:
    """Unmount the casfs mount at ``mountpoint`` and wait for its daemon to exit.

    The daemon gets SIGTERM (it saves a profile being recorded, unmounts, exits); one that is
    gone or stuck past ``timeout`` seconds is killed and the mount detached lazily.

    Raises:
        MountError: when nothing casfs is mounted (or recorded) at ``mountpoint``.
    """
    import signal

    mountpoint = resolve(mountpoint)
    rec = read_record(mountpoint)
    m = find_mount(mountpoint)
    if rec is None and (m is None or m[2] != "fuse.casfs"):
        raise MountError(f"{mountpoint}: no casfs mount here")
    if rec is not None and alive(rec.pid, rec.pid_start):
        os.kill(rec.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(rec.pid, rec.pid_start) and time.monotonic() < deadline:
            _reap(rec.pid)
            time.sleep(0.005)
        if alive(rec.pid, rec.pid_start):
            log.warning("casfs daemon %d did not exit in %.0f s: killing it", rec.pid, timeout)
            os.kill(rec.pid, signal.SIGKILL)
        _reap(rec.pid)
    if is_mounted(mountpoint):
        detach(mountpoint)
    if rec is not None:
        remove_record(mountpoint, rec.pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


__all__ = ["DEFAULT_MAX_BACKGROUND", "DEFAULT_READ_AHEAD_KB", "MountError", "MountInfo", "MountOptions",
           "control", "is_mounted", "mount", "read_record", "runtime_dir", "unmount"]
