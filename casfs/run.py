"""Container roots: run a command in a real OCI container whose root filesystem is a lazy mount.

Layout of one run (all under a private temporary directory)::

    lower/          casfs mount of the image (read-only, lazy)
    upper/          tmpfs holding the overlay's upper and work dirs (writes vanish after the run)
    bundle/rootfs   overlayfs(lower, upper): what the container sees as /
    bundle/config.json

The runtime is ``runc`` by default (Debian's crun 1.8 fails on this kernel: "cgroups in hybrid
mode not supported"); ``crun`` is used when asked for. Everything mounted is unmounted again
when the command ends, whatever happened.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from .errors import CasfsError

if TYPE_CHECKING:
    from .image import Image

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
         "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
         "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


class ContainerError(CasfsError):
    """The container could not be set up or started (not: the command exited nonzero)."""


@dataclass
class RunOptions:
    """How to run a container.

    Attributes:
        env: extra environment variables (PATH defaults to the usual system path).
        cwd: working directory inside the container.
        host_network: share the host's network namespace (default: a private one with only lo).
        runtime: "runc" or "crun" (a path works too).
        tmpfs_size: size limit of the writable layer, e.g. "1g".
        hostname: container hostname.
        mount_options: keyword options for ``casfs.mount`` (read_ahead_kb, record_profile...).
    """

    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    host_network: bool = False
    runtime: str = "runc"
    tmpfs_size: str = "1g"
    hostname: str = "casfs"
    mount_options: dict = field(default_factory=dict)


def oci_config(args: Sequence[str], opts: RunOptions) -> dict:
    """An OCI runtime config (spec 1.0) for ``args`` in a rootfs at ``bundle/rootfs``."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "xterm"}
    env.update(opts.env)
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    nofile = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # never above our own
    if not opts.host_network:
        namespaces.append({"type": "network"})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": opts.cwd,
            "capabilities": {k: list(_CAPS) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": opts.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=256m"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
                            "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


def _sh(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise ContainerError(f"{' '.join(cmd)} failed: {p.stderr.strip() or p.returncode}")


def _runtime_path(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise ContainerError(f"container runtime {name!r} not found: apt-get install runc (or crun)")
    return path


def run_container(image: "Image", args: Sequence[str], options: RunOptions | None = None, *,
                  stdin=None, stdout=None, stderr=None, timeout: float | None = None) -> int:
    """Run ``args`` in a container whose root is a lazy mount of ``image``; return its exit code.

    The image is mounted read-only; a tmpfs overlay takes the container's writes and is
    discarded afterwards. Needs root, /dev/fuse, overlayfs and a runtime (runc).

    Raises:
        ContainerError: when the mount, overlay or runtime cannot be set up.
        subprocess.TimeoutExpired: when ``timeout`` passes (the container is killed first).
    """
    from .fuse.mount import mount, unmount

    opts = options or RunOptions()
    if not args:
        raise ContainerError("no command given: casfs run NAME -- CMD [ARGS...]")
    if os.geteuid() != 0:
        raise ContainerError("casfs run needs root (mounts and a container runtime)")
    runtime = _runtime_path(opts.runtime)
    work = tempfile.mkdtemp(prefix="casfs-run-")
    lower, upper = os.path.join(work, "lower"), os.path.join(work, "upper")
    bundle = os.path.join(work, "bundle")
    rootfs = os.path.join(bundle, "rootfs")
    for d in (lower, upper, rootfs):
        os.makedirs(d)
    cid = f"casfs-{uuid.uuid4().hex[:12]}"
    mounted: list[str] = []
    casfs_mounted = False
    started = False
    try:
        mount(image, lower, **opts.mount_options)
        casfs_mounted = True
        _sh(["mount", "-t", "tmpfs", "-o", f"size={opts.tmpfs_size},mode=755", "casfs-upper", upper])
        mounted.append(upper)
        os.makedirs(os.path.join(upper, "upper"))
        os.makedirs(os.path.join(upper, "work"))
        _sh(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={upper}/upper,workdir={upper}/work", rootfs])
        mounted.append(rootfs)
        for d in ("proc", "dev", "sys", "tmp"):
            os.makedirs(os.path.join(rootfs, d), exist_ok=True)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(oci_config(args, opts), f, indent=1)
        started = True
        p = subprocess.run([runtime, "run", "--bundle", bundle, cid], stdin=stdin, stdout=stdout,
                           stderr=stderr, timeout=timeout)
        return p.returncode
    finally:
        if started:
            subprocess.run([runtime, "delete", "--force", cid], capture_output=True)
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", m], capture_output=True)
        if casfs_mounted:
            try:
                unmount(lower)
            except CasfsError:
                subprocess.run(["umount", "-l", lower], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
