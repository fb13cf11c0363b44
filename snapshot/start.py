"""Restore, or start cold: the boot path of a snapshotted program."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import casfs

from .checkpointing import checkpoint
from .compat import IncompatibleHost
from .criu import CriuError
from .meta import SnapshotRef
from .restoring import RestoredProcess, restore
from .spawning import SpawnedProcess, spawn

__all__ = ["Started", "restore_or_start"]

log = logging.getLogger("snapshot.cpu")


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

