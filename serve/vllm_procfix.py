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

``apply()`` makes that read go to ``/proc/self/status`` when /proc belongs to another PID
namespace (``/proc/self`` names a PID other than ``os.getpid()``); elsewhere it changes
nothing. It runs in every vLLM process through ``serve.vllm_loader.register`` (the
``vllm.general_plugins`` entry point, loaded by vLLM's EngineCore and model workers before
they build anything). Mounting a /proc of the namespace's own would need a mount namespace,
which CRIU would then have to dump and restore with every mount in it (the model's casfs
FUSE mount among them): not done.
"""

from __future__ import annotations

import os

__all__ = ["apply", "foreign_proc"]

_applied = False


def foreign_proc() -> bool:
    """True when /proc belongs to another PID namespace than this process's."""
    try:
        return int(os.readlink("/proc/self")) != os.getpid()
    except (OSError, ValueError):
        return False


def _own_memory_affinity(original):
    def get_memory_affinity(pid: int = 0) -> list[int]:
        if pid not in (0, os.getpid()):
            return original(pid)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Mems_allowed_list:"):
                    from vllm.utils.cpu_resource_utils import parse_id_list

                    return parse_id_list(line.split(":", 1)[1].strip())
        return []

    return get_memory_affinity


def apply() -> None:
    """Point vLLM's reads of this process's /proc files at ``/proc/self`` when /proc is the
    host's (see the module docstring); idempotent, and a no-op without vLLM."""
    global _applied
    if _applied or not foreign_proc():
        return
    try:
        from vllm.utils import cpu_resource_utils
    except ImportError:
        return
    cpu_resource_utils.get_memory_affinity = _own_memory_affinity(cpu_resource_utils.get_memory_affinity)
    _applied = True
