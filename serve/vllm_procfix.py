"""vLLM inside a snapshot's PID namespace, whose /proc is the host's.

``snapshot.spawn`` starts a replica that will be snapshotted in a PID namespace of its own
(``unshare -p -f``: restores of one snapshot then keep their PIDs side by side) but not in a
mount namespace: /proc still shows the host's processes. vLLM's CPU worker reads its memory
affinity from ``/proc/{os.getpid()}/status`` (``vllm.utils.cpu_resource_utils
.get_memory_affinity``), that is a *host* process with the replica's namespace PID: another
process's file, or none at all. Found by the serve-boot benchmark on 2026-12-04: a default-mode
``--snapshot --create`` boot whose model worker had namespace PID 35 failed with
``FileNotFoundError: '/proc/35/status'`` when the host had no PID 35, and fell back to a cold
boot; with a PID 35 on the host it read that process's affinity instead.

``apply()`` makes those reads (and psutil's ``Process(os.getpid())``, which vLLM's CPU worker
uses for its RSS when it sizes the KV cache itself) name this process's host PID (what
``/proc/self`` links to) when /proc belongs to another PID namespace; elsewhere it changes
nothing. It runs in every vLLM process through ``serve.vllm_loader.register`` (the
``vllm.general_plugins`` entry point, loaded by vLLM's EngineCore and model workers before
they build anything). The psutil patch is process-wide: ``psutil.Process()`` then *is* this
process by its host PID, so its ``.pid`` is the host PID (right for /proc, wrong for
``os.kill`` inside the namespace), and a host process whose PID equals this one's namespace
PID is taken for this one. vLLM's CPU path only reads RSS and affinity through it. Mounting
a /proc of the namespace's own would need a mount namespace,
which CRIU would then have to dump and restore with every mount in it (the model's casfs
FUSE mount among them): not done.
"""

from __future__ import annotations

import os

__all__ = ["apply", "foreign_proc"]

_applied = False


def host_pid() -> int:
    """This process's PID in the namespace /proc belongs to (``/proc/self``); it changes with
    every restore of a snapshot, so it is read each time."""
    return int(os.readlink("/proc/self"))


def foreign_proc() -> bool:
    """True when /proc belongs to another PID namespace than this process's."""
    try:
        return host_pid() != os.getpid()
    except (OSError, ValueError):
        return False


def _mine(pid: int | None) -> bool:
    """Whether ``pid`` (as vLLM passes it: None or 0 for "this process", or ``os.getpid()``)
    means this process. A host process whose PID equals this one's namespace PID is then
    taken for this process too: no caller here can tell them apart."""
    return pid is None or pid == os.getpid()


def apply() -> None:
    """Point vLLM's reads of this process's /proc files (its memory affinity, and psutil's
    ``Process(os.getpid())``: the model worker's RSS when it sizes the KV cache itself) at
    this process when /proc is the host's (see the module docstring); idempotent, and a no-op
    without vLLM."""
    global _applied
    if _applied or not foreign_proc():
        return
    try:
        import psutil
        from vllm.utils import cpu_resource_utils
    except ImportError:
        return
    affinity = cpu_resource_utils.get_memory_affinity

    def get_memory_affinity(pid: int = 0) -> list[int]:
        return affinity(host_pid() if pid == 0 or _mine(pid) else pid)

    cpu_resource_utils.get_memory_affinity = get_memory_affinity
    init = psutil.Process.__init__

    def process_init(self, pid: int | None = None) -> None:
        init(self, host_pid() if _mine(pid) else pid)

    psutil.Process.__init__ = process_init
    _applied = True
