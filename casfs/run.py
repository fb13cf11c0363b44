"""Container roots: run a command in a real OCI container whose root filesystem is a lazy mount.

Layout of one run (all under a private temporary directory)::

    lower/          casfs mount of the image (read-only, lazy)
    upper/          tmpfs holding the overlay's upper and work dirs (writes vanish after the run)
    bundle/rootfs   overlayfs(lower, upper): what the container sees as /
    bundle/config.json

The runtime is ``runc`` by default (Debian's crun 1.8 fails on this kernel: "cgroups in hybrid
mode not supported"); ``crun`` is used when asked for. Everything mounted is unmounted again
when the command ends, whatever happened: a signal (SIGINT, SIGTERM, SIGHUP) is passed to the
container and the run cleans up after it; if this process is killed outright, its guard
(``casfs.lifeline``) deletes the container and unmounts everything, and the next ``casfs run``
sweeps up after runs whose guard died too.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

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
        tmpfs_size: size limit of the writable layer (a tmpfs): "512M", "1G", "50%"...
        hostname: container hostname.
        mount_options: keyword options for ``casfs.mount`` (read_ahead_kb, record_profile...).
        stop_timeout: seconds a container gets after a passed-on signal before it is killed.
    """

    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    host_network: bool = False
    runtime: str = "runc"
    tmpfs_size: str = "1g"
    hostname: str = "casfs"
    mount_options: dict = field(default_factory=dict)
    stop_timeout: float = 10.0


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


def check_size(text: str) -> str:
    """A tmpfs size (``512m``, ``1G``, ``2048k``, a byte count, or ``50%`` of memory) in the form
    ``mount -o size=`` takes; returns it lower-cased.

    Raises:
        ValueError: naming the accepted forms.
    """
    t = text.strip().lower().removesuffix("ib").removesuffix("b") if not text.strip().endswith("%") else text.strip()
    if re.fullmatch(r"[1-9][0-9]*[kmg]?", t) or re.fullmatch(r"[1-9][0-9]?%|100%", t):
        return t
    raise ValueError(f"bad size {text!r} for the writable layer: use e.g. 512M, 1G, 2048K or 50%")


def run_container(image: "Image", args: Sequence[str], options: RunOptions | None = None, *,
                  stdin=None, stdout=None, stderr=None, timeout: float | None = None,
                  stats: Callable[[dict], None] | None = None) -> int:
    """Run ``args`` in a container whose root is a lazy mount of ``image``; return its exit code.

    The image is mounted read-only; a tmpfs overlay takes the container's writes and is
    discarded afterwards. Needs root, /dev/fuse, overlayfs and a runtime (runc).

    Signals: SIGINT, SIGTERM and SIGHUP received while the container runs are passed to it;
    if it has not exited ``opts.stop_timeout`` seconds later it is killed. Received while the
    container is being set up, they stop the setup. Either way everything is cleaned up (the
    container deleted, the overlay, tmpfs and mount undone) before this returns or raises,
    and a guard process does the same if this process is killed outright
    (``casfs.lifeline``); the exit code is then the container's (143 for SIGTERM).

    Args:
        stats: called with the mount's counters (the daemon's ``stats`` reply) just before
            it is unmounted.

    Raises:
        ContainerError: when the mount, overlay or runtime cannot be set up.
        Interrupted: when a signal arrived during setup (``.signum``).
        subprocess.TimeoutExpired: when ``timeout`` passes (the container is killed first).
    """
    from .fuse.kernel import find_mount
    from .fuse.mount import control, is_mounted, mount, runtime_dir, unmount
    from .lifeline import Lifeline, proc_start, sweep

    opts = options or RunOptions()
    if not args:
        raise ContainerError("no command given: casfs run NAME -- CMD [ARGS...]")
    if os.geteuid() != 0:
        raise ContainerError("casfs run needs root (mounts and a container runtime)")
    try:
        size = check_size(opts.tmpfs_size)
    except ValueError as e:
        raise ContainerError(str(e)) from None
    runtime = _runtime_path(opts.runtime)
    sweep(runtime_dir())  # what killed runs (and their guards) left behind
    sig = _Signals()
    work = tempfile.mkdtemp(prefix="casfs-run-")
    lower, upper = os.path.join(work, "lower"), os.path.join(work, "upper")
    bundle = os.path.join(work, "bundle")
    rootfs = os.path.join(bundle, "rootfs")
    cid = f"casfs-{uuid.uuid4().hex[:12]}"
    mounted: list[str] = []
    casfs_mounted = False
    started = False
    life = Lifeline(f"casfs run {image.name}", runtime_dir())
    life.add("dir", path=work)
    try:
        for d in (lower, upper, rootfs):
            os.makedirs(d)
        info = mount(image, lower, **opts.mount_options)
        casfs_mounted = True
        life.add("mount", path=lower, pid=info.pid, start=info.pid_start)
        _sh(["mount", "-t", "tmpfs", "-o", f"size={size},mode=755", "casfs-upper", upper])
        mounted.append(upper)
        life.add("umount", path=upper)
        os.makedirs(os.path.join(upper, "upper"))
        os.makedirs(os.path.join(upper, "work"))
        _sh(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={upper}/upper,workdir={upper}/work", rootfs])
        mounted.append(rootfs)
        life.add("umount", path=rootfs)
        for d in ("proc", "dev", "sys", "tmp"):
            os.makedirs(os.path.join(rootfs, d), exist_ok=True)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(oci_config(args, opts), f, indent=1)
        life.add("container", runtime=runtime, id=cid)
        started = True
        p = subprocess.Popen([runtime, "run", "--bundle", bundle, cid], stdin=stdin, stdout=stdout, stderr=stderr)
        life.add("process", pid=p.pid, start=proc_start(p.pid))
        sig.running = True
        return _wait(p, runtime, cid, sig, opts.stop_timeout, timeout)
    finally:
        sig.restore()
        if started:
            subprocess.run([runtime, "delete", "--force", cid], capture_output=True)
        for m in (rootfs, upper):  # by what is mounted: a signal may have cut a step short
            if m in mounted or find_mount(m) is not None:
                subprocess.run(["umount", "-l", m], capture_output=True)
        if casfs_mounted or is_mounted(lower):
            if stats is not None:
                try:
                    stats(control(lower, "stats", timeout=5))
                except CasfsError:
                    pass
            try:
                unmount(lower)
            except CasfsError:
                subprocess.run(["umount", "-l", lower], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        life.close()


class Interrupted(CasfsError):
    """A signal stopped ``run_container`` while it set the container up (everything it had set
    up was undone). ``signum`` is the signal; a CLI exits 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} while setting up the container; "
                         "nothing was left behind")
        self.signum = signum


class _Signals:
    """SIGINT/SIGTERM/SIGHUP while ``run_container`` works: during setup they raise
    Interrupted (the ``finally`` undoes the setup); once the container runs they are queued
    for ``_wait`` to pass on. Installed only in the main thread (Python's rule)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.running = False
        self.received: list[int] = []
        self.old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.old[s] = signal.signal(s, self._on)

    def _on(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        if not self.running:
            raise Interrupted(signum)

    def restore(self) -> None:
        self.running = True  # a late signal must not raise inside the cleanup
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old.clear()


def _wait(p: subprocess.Popen, runtime: str, cid: str, sig: _Signals, stop_timeout: float,
          timeout: float | None) -> int:
    """Wait for ``runtime run`` to end, passing on queued signals, killing the container
    ``stop_timeout`` seconds after the first one (or at ``timeout``)."""
    end = None if timeout is None else time.monotonic() + timeout
    passed = 0
    kill_at = None
    while True:
        try:
            return p.wait(0.05)
        except subprocess.TimeoutExpired:
            pass
        while passed < len(sig.received):
            name = signal.Signals(sig.received[passed]).name
            subprocess.run([runtime, "kill", cid, name], capture_output=True)
            passed += 1
            if kill_at is None:
                kill_at = time.monotonic() + stop_timeout
        now = time.monotonic()
        if kill_at is not None and now > kill_at:
            subprocess.run([runtime, "kill", cid, "KILL"], capture_output=True)
            kill_at = now + 5  # and again, should the first be lost
        if end is not None and now > end:
            subprocess.run([runtime, "kill", cid, "KILL"], capture_output=True)
            p.wait(30)
            raise subprocess.TimeoutExpired(p.args, timeout or 0)
