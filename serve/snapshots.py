"""CPU snapshots of a replica, for serve.boot: the bridge to ``snapshot.cpu``.

A :class:`SnapshotBackend` starts the worker so that it can be snapshotted (``spawn``),
snapshots a ready replica into the casfs store under a tag (``create``), and restores one
(``restore``). :func:`open_backend` returns the CRIU backend when ``snapshot.cpu`` is
available, else raises :class:`SnapshotUnavailable` saying what is missing.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any, Protocol

from .boot import BootError


class SnapshotUnavailable(BootError):
    """Snapshots cannot be taken or restored on this host or checkout; the message says why."""


@dataclass
class Restored:
    """A restored replica: the root pid of its tree, its control token, log, and details."""

    pid: int
    control_token: str
    log_path: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


class SnapshotBackend(Protocol):
    def spawn(self, argv: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen:
        """Start the worker the way a later ``create`` needs it started."""

    def create(self, store: Any, tag: str, *, pid: int, model_dir: str, listen: str, control_token: str,
               log_path: str, image_id: str) -> dict:
        """Snapshot the ready replica ``pid`` into ``store`` as ``tag``; it keeps serving.
        Returns details (sizes, durations) for the boot report."""

    def restore(self, store: Any, tag: str, *, model_dir: str, listen: str) -> Restored:
        """Restore the replica snapshotted as ``tag``; returns once its processes run."""


def open_backend() -> SnapshotBackend:
    """The CPU snapshot backend.

    Raises:
        SnapshotUnavailable: snapshot.cpu is not importable, or CRIU is not usable here.
    """
    try:
        import snapshot.cpu  # noqa: F401
    except ImportError as e:
        raise SnapshotUnavailable(
            "replica snapshots need snapshot.cpu (CRIU 4.2.1: scripts/build_criu.sh), which this "
            f"checkout does not have yet ({e}); boot without --snapshot") from None
    raise SnapshotUnavailable("serve has no adapter for this version of snapshot.cpu yet; boot without --snapshot")
