"""Device maps: which GPU each GPU of a checkpointed process is restored onto (issue 16).

NVIDIA's driver (580+, CUDA 13) restores a checkpointed process onto other GPUs of the same
chip when ``cuCheckpointProcessRestore`` gets GPU UUID pairs (``CUcheckpointRestoreArgs
.gpuPairs``; ``cuda-checkpoint --device-map old=new,...``). What the driver accepts, and what
this module therefore builds, was read from its documentation and from the reports of others
(none of it was run here: no two-GPU machine was lent; see docs/multigpu.md):

* "If an array of GPU UUID pairs is specified, it must contain every checkpointed GPU", and the
  pairs must form a permutation: mapping only the GPU that moves (``GPU0=GPU1`` on a host
  whose process saw four GPUs) fails with CUDA_ERROR_INVALID_VALUE (NVIDIA/cuda-checkpoint#35),
  while the full swap ``GPU0=GPU1,GPU1=GPU0,GPU2=GPU2,GPU3=GPU3`` works (the form CRIU's
  ``--gpu-device-map`` example and NVIDIA's own migration tests use). So a caller names only
  the GPUs it wants moved and :func:`plan` completes the map: every other GPU the process saw
  keeps its GPU where that GPU is free in the map, else takes a leftover GPU of its model.
* The new GPU must be of the same chip and have the memory the process needs (checked by the
  caller, ``snapshot.gpu.restore_problems``).
* A process started with ``CUDA_VISIBLE_DEVICES`` naming a subset of the GPUs was reported to
  fail a remap even with identity pairs (NVIDIA/cuda-python#1983); the GPUs a process saw are
  recorded (:func:`visible_gpus`) so a failure can say so.
* After a move the process's libcuda still answers the old PCI bus ids
  (NVIDIA/cuda-checkpoint#48): NVML lookups by bus id inside the process then find the old GPU
  (NCCL's communicator set-up among them). Single-GPU replicas do not look their GPU up by bus
  id; a tensor-parallel group is only restored onto the GPUs it was made on
  (``snapshot.gpugroup``).

UUIDs are NVML's strings (``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``); the driver wants their
16 raw bytes (:func:`uuid_bytes`). MIG instances (``MIG-...``) cannot be remapped.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["DeviceMapError", "describe", "is_identity", "plan", "uuid_bytes", "visible_gpus"]

_UUID = re.compile(r"^GPU-([0-9a-fA-F]{8})-([0-9a-fA-F]{4})-([0-9a-fA-F]{4})-([0-9a-fA-F]{4})-([0-9a-fA-F]{12})$")


class DeviceMapError(ValueError):
    """A device map that cannot be used; ``problems`` lists every reason (one line each)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("device map refused: " + "; ".join(problems))
        self.problems = problems


def uuid_bytes(uuid: str) -> bytes:
    """The 16 bytes the driver's ``CUuuid`` holds for an NVML GPU UUID string.

    Raises:
        DeviceMapError: not a ``GPU-`` UUID (a MIG instance, an index, a typo).
    """
    m = _UUID.match(uuid.strip()) if isinstance(uuid, str) else None
    if m is None:
        kind = "a MIG instance cannot be remapped" if str(uuid).startswith("MIG-") else \
            "expected GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx as NVML prints it"
        raise DeviceMapError([f"{uuid!r} is not a GPU UUID: {kind}"])
    return bytes.fromhex("".join(m.groups()))


def short(uuid: str) -> str:
    """``GPU-1a2b3c4d`` for messages."""
    return uuid[:12] if uuid.startswith("GPU-") else uuid


def describe(device_map: dict[str, str]) -> str:
    """``GPU-aaaaaaaa->GPU-bbbbbbbb, ...`` (moved GPUs only; "identity" when none moves)."""
    moved = [f"{short(o)}->{short(n)}" for o, n in device_map.items() if o != n]
    return ", ".join(moved) if moved else "identity"


def is_identity(device_map: dict[str, str] | None) -> bool:
    """True when no GPU moves (an empty or absent map included)."""
    return not device_map or all(o == n for o, n in device_map.items())


def plan(seen: list[dict[str, Any]], devices: list[dict[str, Any]],
         requested: dict[str, str] | None = None) -> dict[str, str]:
    """The full device map the driver needs: every GPU in ``seen`` mapped onto its own GPU of
    ``devices``, the ``requested`` moves honoured.

    Args:
        seen: the GPUs the process saw when it was checkpointed (``uuid``, ``name``), in order.
        devices: this host's GPUs now (``uuid``, ``name``; ``gpu_devices()``), in NVML order.
        requested: old UUID -> new UUID for the GPUs that must move (the rest is completed).

    Returns:
        old UUID -> new UUID for every GPU in ``seen`` (injective; identity where possible).

    Raises:
        DeviceMapError: a requested GPU the process did not see, a target that is not here,
            two GPUs onto one, a different model, or no GPU of a model left for a seen GPU.
    """
    requested = dict(requested or {})
    by_uuid = {d["uuid"]: d for d in devices}
    seen_by_uuid = {g["uuid"]: g for g in seen}
    problems: list[str] = []
    for old, new in requested.items():
        if old not in seen_by_uuid:
            problems.append(f"{old} is not a GPU the process used or saw ({', '.join(seen_by_uuid) or 'none'})")
        if new not in by_uuid:
            problems.append(f"{new} is not a GPU of this host ({', '.join(by_uuid) or 'none'})")
        elif old in seen_by_uuid and by_uuid[new]["name"] != seen_by_uuid[old]["name"]:
            problems.append(f"{new} is a {by_uuid[new]['name']}, {old} was a {seen_by_uuid[old]['name']}: "
                            f"the driver restores only onto the same chip")
    targets = list(requested.values())
    for t in sorted({t for t in targets if targets.count(t) > 1}):
        problems.append(f"two GPUs would be restored onto {t}")
    if problems:
        raise DeviceMapError(problems)
    full: dict[str, str] = {}
    taken = set(targets)
    pending = []
    for g in seen:
        old = g["uuid"]
        if old in requested:
            full[old] = requested[old]
        elif old in by_uuid and old not in taken and by_uuid[old]["name"] == g["name"]:
            full[old] = old
            taken.add(old)
        else:
            pending.append(g)
    for g in pending:  # moved out of the way (a swap), or a snapshot from another host
        spare = next((d for d in devices if d["uuid"] not in taken and d["name"] == g["name"]), None)
        if spare is None:
            problems.append(f"no {g['name']} is left for {g['uuid']}: the driver needs every GPU the process "
                            f"saw in the map (NVIDIA/cuda-checkpoint#35); this host has "
                            f"{sum(1 for d in devices if d['name'] == g['name'])} of that model and the process "
                            f"saw {sum(1 for s in seen if s['name'] == g['name'])}")
            continue
        full[g["uuid"]] = spare["uuid"]
        taken.add(spare["uuid"])
    if problems:
        raise DeviceMapError(problems)
    return {g["uuid"]: full[g["uuid"]] for g in seen}


def _parse_visible(value: str, devices: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The devices ``CUDA_VISIBLE_DEVICES=value`` selects, in its order (None: cannot tell)."""
    out: list[dict[str, Any]] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            break
        if item.isdigit():
            i = int(item)
            if i >= len(devices):
                break  # CUDA stops at the first invalid entry
            out.append(devices[i])
        elif item.startswith("GPU-"):
            hits = [d for d in devices if d["uuid"].startswith(item)]
            if len(hits) != 1:
                break
            out.append(hits[0])
        else:  # MIG-..., a negative index: stop as CUDA does, or give up on the unknown
            if item.startswith("MIG-"):
                return None
            break
    return out


def visible_gpus(pid: int, devices: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """The GPUs process ``pid`` sees (``CUDA_VISIBLE_DEVICES`` from its environment applied to
    ``devices``), and that variable's value (None when unset or unreadable).

    All of ``devices`` when the variable is unset or cannot be read or parsed.
    """
    value = None
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"CUDA_VISIBLE_DEVICES="):
                    value = item.split(b"=", 1)[1].decode(errors="replace")
    except OSError:
        return list(devices), None
    if value is None:
        return list(devices), None
    sel = _parse_visible(value, devices)
    return (list(devices) if sel is None else sel), value
