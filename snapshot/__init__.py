"""snapshot: skip the device-side start of an inference replica, on top of casfs's public API.

* ``snapshot.weights``: stream safetensors from casfs chunks into CPU or GPU tensors
  (``load_safetensors``, ``load_into_module``).
* ``snapshot.gpu``: suspend/resume a process's GPU state with the driver's checkpoint API
  (``suspend``, ``resume``), transactional, so a failed restore never leaves a stuck process;
  ``resume(..., device_map={old_uuid: new_uuid})`` restores onto another GPU of the same model
  (``snapshot.devicemap`` completes the map the driver needs; ``DeviceMapError``).
* ``snapshot.gpugroup``: the ranks of a tensor-parallel replica suspended and resumed together
  (``suspend_group``: lock every rank before checkpointing any; ``resume_group``: restore every
  rank before unlocking any; rollback or kill, never a partial group).
* ``snapshot.compat``: the host/GPU compatibility key a snapshot carries.
* ``snapshot.regions``: memory regions (CUDA virtual memory, or anonymous CPU mappings) whose
  memory can be released and re-mapped at the same addresses (``allocate_region``), so a
  replica's weights and KV cache leave a snapshot while its CUDA graphs stay valid.
* ``snapshot.cpu``: CRIU checkpoints of process trees stored as casfs images (``spawn``,
  ``checkpoint``, ``restore``, ``restore_or_start``), one step per module: ``spawning``,
  ``hostkey``, ``checkpointing``, ``meta``, ``shm``, ``exports``, ``restoring``, ``start``;
  ``snapshot.criu`` finds CRIU >= 4.2 and explains its failures; ``snapshot.lifecycle``:
  ``ready()`` and ``after_restore`` hooks for the snapshotted program.

The names below (``__all__``) are the public API; ``serve/`` uses nothing else
(``tests/test_layers.py`` checks it).

Submodules are imported on first use, so ``import snapshot`` needs neither torch nor CUDA.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_safetensors": "weights", "load_into_module": "weights", "LoadStats": "weights",
    "InvalidSafetensors": "weights", "ModuleMismatch": "weights",
    "suspend": "gpu", "resume": "gpu", "Suspended": "gpu", "CheckpointError": "gpu",
    "RestoreFailed": "gpu", "GpuUnavailable": "compat", "DeviceMapError": "devicemap",
    "suspend_group": "gpugroup", "resume_group": "gpugroup", "SuspendedGroup": "gpugroup",
    "GroupFailed": "gpugroup", "GroupResumed": "gpugroup",
    "host_key": "compat", "gpu_key": "compat", "gpu_devices": "compat", "snapshot_key": "compat",
    "compatibility_problems": "compat", "check_compatible": "compat", "IncompatibleHost": "compat",
    "spawn": "spawning", "SpawnedProcess": "spawning",
    "checkpoint": "checkpointing",
    "restore": "restoring", "RestoredProcess": "restoring",
    "restore_or_start": "start", "Started": "start",
    "SnapshotRef": "meta", "list_snapshots": "meta", "read_meta": "meta",
    "restore_problems": "hostkey", "drop_export": "exports",
    "check_export": "verify", "record_export": "verify",
    "shm_segments": "shm", "mapped_anywhere": "shm",
    "CriuError": "criu", "CriuUnavailable": "criu", "RuleViolation": "criu", "find_criu": "criu",
    "process_tree": "criu", "tree_rule_problems": "criu",
    "allocate_region": "regions", "region_layout": "regions", "MemoryRegion": "regions",
    "RegionError": "regions",
    "ready": "lifecycle", "after_restore": "lifecycle", "reseed_random": "lifecycle",
    "restored": "lifecycle", "supervised": "lifecycle",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'snapshot' has no attribute {name!r}")
    return getattr(importlib.import_module(f"snapshot.{mod}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
