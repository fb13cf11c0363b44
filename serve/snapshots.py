"""CPU snapshots of a replica, for serve.boot: the bridge to ``snapshot``'s CPU snapshots (CRIU).

How a replica is snapshotted and restored:

* **create** (``casfs serve IMG --snapshot TAG --create``): the worker is started with
  ``snapshot.spawn`` (its own PID namespace under tini, setsid, stdio to an append-only
  log). It loads the engine and warms it up, then calls ``snapshot.ready()`` *before* opening
  its listening socket, so the snapshot holds no socket tied to a port. The supervisor dumps it
  with ``snapshot.checkpoint`` (stored as a casfs image tagged TAG; the dump ends the
  process) and restores it at once, as below, to serve. Not ``leave_running``: with CRIU's
  ``--leave-running`` CRIU deletes its link_remap files at the end of the dump, and vLLM's
  EngineCore maps an unlinked glibc semaphore that needs one.
* **restore** (``casfs serve IMG --snapshot TAG``): after the model image is mounted at the same
  path as at create time (the path depends on the image id only), ``snapshot.restore``
  brings the tree back and wakes it; ``ready()`` returns True in the worker, which then waits
  for its *restore instructions* (serve.instructions: listen address, random seed, control
  token), written here. The worker reseeds, binds the
  address it is given and serves. Because each restore gets its own PID namespace and no socket is carried
  in the snapshot, several restores of one snapshot can serve on one host at once, each on its
  own port.

:func:`open_backend` returns the backend, or raises :class:`SnapshotUnavailable` saying what
is missing (snapshot.cpu, a usable CRIU).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import casfs

from .errors import BootError
from .instructions import write_instructions


class SnapshotUnavailable(BootError):
    """Snapshots cannot be taken or restored on this host or checkout; the message says why."""


@dataclass
class Restored:
    """A restored replica: ``process`` (snapshot.RestoredProcess: poll/wait/kill), the
    root ``pid`` of its tree, and timings/details for the boot report."""

    process: Any
    pid: int
    detail: dict[str, Any] = field(default_factory=dict)
    shm: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        """After the tree exited: remove the /dev/shm segments restore put back that no process
        maps any more (vLLM does not unlink them all when it stops)."""
        import snapshot

        for path in self.shm:
            if os.path.exists(path) and not snapshot.mapped_anywhere(path):
                with contextlib.suppress(OSError):
                    os.unlink(path)


class CriuBackend:
    """Snapshots through snapshot's CPU snapshots (see the module docstring)."""

    def __init__(self, lazy: bool | None = True, source: str = "store") -> None:
        import snapshot

        self.snapshot = snapshot
        self.lazy = lazy
        self.source = source

    def spawn(self, argv: list[str], env: dict[str, str], log_path: str) -> Any:
        """Start the worker for a later ``create`` (returns snapshot.SpawnedProcess).

        Started ``deterministic`` (no address-space randomisation, a fixed hash seed): every
        restore of one snapshot shares its layout anyway, and snapshots of the same engine
        taken apart (another model, another host) then lay out memory alike, so their page
        chunks deduplicate in the store."""
        return self.snapshot.spawn(argv, stdout=log_path, stderr=True, env=env, cwd="/",
                                   deterministic=True)

    def wait_ready(self, proc: Any, timeout: float) -> dict:
        """Block until the worker called snapshot.ready() (engine loaded and warm)."""
        try:
            return proc.wait_ready(timeout)
        except self.snapshot.CriuError as e:
            raise BootError(f"the replica did not become ready for its snapshot: {e}") from None

    def create(self, proc: Any, store: Any, tag: str) -> dict:
        """Snapshot the ready worker as ``tag`` (the dump ends it). Returns details.

        snapshot.cpu's rule check refuses files open read-write; vLLM's multiprocess executor
        keeps its /dev/shm/psm_* message-queue segments open that way. snapshot.cpu saves those
        segments with the snapshot and puts them back before a restore, so its rule check
        exempts them (no warning either); every other rule still refuses the snapshot.
        """
        snap = self.snapshot
        try:
            shm = snap.shm_segments(snap.process_tree(proc.pid))
            problems = snap.tree_rule_problems(proc.pid, saved=shm)
            if problems:
                raise BootError(f"the replica cannot be snapshotted: {'; '.join(problems)}")
            ref = snap.checkpoint(proc, store, tag, leave_running=False, strict=False)
        except snap.CriuError as e:
            raise BootError(f"snapshot {tag} could not be taken: {e}") from None
        meta = ref.meta
        return {"tag": tag, "image_id": ref.image_id, "timings": ref.timings,
                "pages_bytes": meta.get("pages_bytes"), "layout": meta.get("layout"),
                "shm_segments": len(meta.get("shm") or []),
                "link_remap": len(meta.get("link_remap") or [])}

    gpu_state = False  # GpuCriuBackend (serve.gpu_snapshots): snapshots with GPU state

    def restore(self, store: Any, tag: str, *, listen: str, seed: int, token: str,
                weights: dict | None = None) -> Restored:
        """Restore ``tag`` and hand the worker its instructions (listen address, random seed,
        the supervisor's control token; ``weights`` is for GPU snapshots and unused here).

        Raises:
            SnapshotUnavailable: the snapshot cannot be restored on this host (incompatible,
                missing); fall back to a cold boot.
            BootError: CRIU failed.
        """
        snap = self.snapshot
        try:
            live = snap.restore(tag, store, lazy=self.lazy, source=self.source)
        except snap.IncompatibleHost as e:
            raise SnapshotUnavailable(f"snapshot {tag} does not fit this host: {e}") from None
        except casfs.ImageNotFound:
            raise SnapshotUnavailable(f"no snapshot {tag} in the store: create one with "
                                      f"`casfs serve IMAGE --snapshot {tag} --create`") from None
        except ValueError as e:
            raise SnapshotUnavailable(str(e)) from None
        except snap.CriuError as e:
            raise BootError(f"restoring snapshot {tag} failed: {e}") from None
        # to the worker (ready_pid), not the tree's root: that is the namespace's init (tini)
        write_instructions(live.ready_pid, {"listen": listen, "seed": seed, "control_token": token})
        try:
            shm = [i["path"] for i in snap.read_meta(store.open_image(live.image_id)).get("shm") or []]
        except (casfs.CasfsError, ValueError):
            shm = []
        return Restored(live, live.pid, {"timings": live.timings, "lazy": live.timings.get("lazy", self.lazy),
                                         "source": live.timings.get("source", self.source),
                                         "image_id": live.image_id}, shm)

    @staticmethod
    def booted(restored: Restored) -> None:
        """The restored replica answered its first request: let the rest of its memory stream
        in at full speed (``RestoredProcess.boot_done``) and note what the page server had
        served until then."""
        proc = restored.process
        if hasattr(proc, "boot_done"):
            restored.detail["pages_at_first_token"] = proc.pages()
            proc.boot_done()


def open_backend(*, source: str = "auto") -> CriuBackend:
    """The CPU snapshot backend.

    Args:
        source: where restores read the snapshot: "store" (lazily, nothing unpacked: pages come
            from the casfs store as the replica touches them; needs userfaultfd), "export" (the
            snapshot exported once per host, restored eagerly), or "auto" (default): per restore,
            the host's export when it has one (the faster restore), else "store" where the
            kernel has userfaultfd, else "export" (``snapshot.restore``'s "auto").

    Raises:
        SnapshotUnavailable: snapshot.cpu is not importable or no usable CRIU is found (the
            message lists what was tried and how to build one); "store" without userfaultfd.
    """
    if source not in ("auto", "store", "export"):
        raise SnapshotUnavailable(f"snapshot source must be auto, store or export, not {source!r}")
    try:
        import snapshot

        snapshot.restore  # noqa: B018 - imports the CPU snapshot modules (ImportError if absent)
        find_criu, CriuUnavailable = snapshot.find_criu, snapshot.CriuUnavailable
    except ImportError as e:
        raise SnapshotUnavailable(
            "replica snapshots need snapshot.cpu (CRIU 4.2.1: scripts/build_criu.sh), which this "
            f"checkout does not have ({e}); boot without --snapshot") from None
    try:
        criu = find_criu()
    except CriuUnavailable as e:
        raise SnapshotUnavailable(f"replica snapshots need CRIU >= 4.2: {e}") from None
    if os.geteuid() != 0:
        raise SnapshotUnavailable("replica snapshots need root (CRIU dumps and restores process trees)")
    uffd = bool(criu.features.get("uffd-noncoop"))
    if source == "store" and not uffd:
        raise SnapshotUnavailable("--snapshot-source store needs userfaultfd, which this kernel lacks: "
                                  "use --snapshot-source export")
    if source == "auto":
        if not uffd:
            return CriuBackend(lazy=False, source="export")
        return CriuBackend(lazy=None, source="auto")  # per restore: snapshot.restore's choose_source
    return CriuBackend(lazy=source == "store", source=source)
