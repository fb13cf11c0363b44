"""Debian's containerd (1.6) on private root/state/socket directories, with the casfs
snapshotter as a proxy plugin, and ``ctr`` pointed at it; for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from .procs import log_tail, stop

__all__ = ["CONTAINERD", "CTR", "Containerd", "SnapshotterProc", "containerd_server", "snapshotter_process"]

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONF = """\
version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.tracing",
                    "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{base}/c.sock"
[ttrpc]
  address = "{base}/c.sock.ttrpc"
[debug]
  address = ""
  level = "{level}"
[metrics]
  address = ""
[proxy_plugins]
  [proxy_plugins.casfs]
    type = "snapshot"
    address = "{snapshotter}"
"""


@dataclass
class Containerd:
    """A running containerd: its socket, directories and log; ``ctr(...)`` runs ctr against it."""

    base: str
    socket: str
    log: str
    namespace: str = "casfs-test"

    def ctr(self, *args: str, timeout: float = 300.0, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``ctr --address SOCKET --namespace NS ARGS`` (output captured as bytes).

        Raises:
            RuntimeError: with ctr's stderr when ``check`` and it fails.
        """
        p = subprocess.run([CTR, "--address", self.socket, "--namespace", self.namespace, *args],
                           capture_output=True, timeout=timeout, input=input,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({p.returncode}): "
                               f"{p.stderr.decode(errors='replace').strip()}\n--- containerd log:\n"
                               f"{log_tail(self.log, 3000)}")
        return p


@contextlib.contextmanager
def containerd_server(snapshotter_socket: str, *, start_timeout: float = 30.0,
                      level: str = "info") -> Iterator[Containerd]:
    """Run containerd with its own root, state and sockets in a fresh short temp dir (unix
    socket paths are limited to 107 bytes), the casfs snapshotter at ``snapshotter_socket`` as
    proxy plugin ``casfs``, CRI disabled; yield a ``Containerd``. On exit every container of
    its namespace is killed and deleted, containerd stopped and its directories removed.

    Raises:
        RuntimeError: with its log when it exits or does not answer in time.
    """
    base = tempfile.mkdtemp(prefix="ctd-", dir="/tmp")
    conf = os.path.join(base, "config.toml")
    log = os.path.join(base, "containerd.log")
    with open(conf, "w") as f:
        f.write(_CONF.format(base=base, snapshotter=snapshotter_socket, level=level))
    with open(log, "wb") as out:
        proc = subprocess.Popen([CONTAINERD, "--config", conf], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    cd = Containerd(base, os.path.join(base, "c.sock"), log)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {proc.returncode}:\n{log_tail(log)}")
            if os.path.exists(cd.socket) and cd.ctr("version", check=False, timeout=10).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer within {start_timeout:.0f} s:\n{log_tail(log)}")
            time.sleep(0.1)
        yield cd
    finally:
        try:
            if proc.poll() is None:
                _remove_everything(cd)
        finally:
            stop(proc)
            _unmount_under(base)
            shutil.rmtree(base, ignore_errors=True)


def _remove_everything(cd: Containerd) -> None:
    """Kill and delete the namespace's tasks and containers (shims included)."""
    p = cd.ctr("task", "ls", "-q", check=False, timeout=30)
    for tid in p.stdout.decode().split():
        cd.ctr("task", "kill", "-s", "SIGKILL", tid, check=False, timeout=30)
    time.sleep(0.2)
    for tid in p.stdout.decode().split():
        cd.ctr("task", "delete", "-f", tid, check=False, timeout=30)
    p = cd.ctr("container", "ls", "-q", check=False, timeout=30)
    for cid in p.stdout.decode().split():
        cd.ctr("container", "delete", cid, check=False, timeout=30)


def _unmount_under(base: str, casfs_first: bool = False) -> None:
    """Unmount everything still mounted below ``base`` (deepest first), lazily; with
    ``casfs_first`` each mount is first offered to ``casfs.unmount`` (which also stops its
    daemon)."""
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return
    for mp in sorted((m for m in points if m.startswith(base + "/")), key=len, reverse=True):
        if casfs_first:
            try:
                import casfs

                casfs.unmount(mp)
            except Exception:  # noqa: BLE001 - best effort, then detach
                pass
        subprocess.run(["umount", "-l", mp], capture_output=True)


@dataclass
class SnapshotterProc:
    """A running ``casfs snapshotter`` process."""

    socket: str
    root: str
    log: str
    proc: subprocess.Popen
    args: Sequence[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_snapshotter(socket: str, root: str, log: str, extra: Sequence[str] = (),
                      start_timeout: float = 60.0) -> SnapshotterProc:
    """Start ``python -m casfs.cli.main snapshotter`` (this checkout on PYTHONPATH); returns
    once its socket accepts.

    Raises:
        RuntimeError: with its log when it exits or does not serve in time.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    args = [sys.executable, "-m", "casfs.cli.main", "snapshotter", "--socket", socket, "--root", root, *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    deadline = time.monotonic() + start_timeout
    import socket as socketmod

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"casfs snapshotter exited with {proc.returncode}:\n{log_tail(log)}")
        if os.path.exists(socket):
            s = socketmod.socket(socketmod.AF_UNIX)
            try:
                s.connect(socket)
                break
            except OSError:
                pass
            finally:
                s.close()
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"casfs snapshotter did not serve within {start_timeout:.0f} s:\n{log_tail(log)}")
        time.sleep(0.05)
    return SnapshotterProc(socket, root, log, proc, args)


@contextlib.contextmanager
def snapshotter_process(extra: Sequence[str] = ()) -> Iterator[SnapshotterProc]:
    """A ``casfs snapshotter`` on a fresh short temp dir (socket, root, log); on exit it is
    stopped, every casfs image mount under its root unmounted and the directory removed."""
    base = tempfile.mkdtemp(prefix="csn-", dir="/tmp")
    sp = None
    try:
        sp = start_snapshotter(os.path.join(base, "s.sock"), os.path.join(base, "root"),
                               os.path.join(base, "snapshotter.log"), extra)
        yield sp
    finally:
        if sp is not None:
            sp.stop()
        _unmount_under(base, casfs_first=True)
        shutil.rmtree(base, ignore_errors=True)
