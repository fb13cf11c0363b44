"""Where a GPU snapshot resumes: a restore-time choice of GPU (issue 16).

A replica snapshotted on GPU 0 need not resume there: ``casfs serve IMG --snapshot TAG
--restore-gpu cuda:1`` (``BootConfig.restore_gpu``) resumes it on GPU 1, and ``--restore-gpu
auto`` resumes it where it was made when that GPU has the memory, else on the GPU of the same
model with the most free memory that has enough. The choice is a device map
(old UUID -> new UUID) handed to ``snapshot.resume``, which completes it into the permutation
the driver needs, checks the new GPU (same model, free memory) and keeps the transactional
fallback: a refused or failed resume kills the restored process, and serve.boot then boots the
replica cold with the reason in its report.

``PlacedGpu`` wraps any GPU layer (``serve.gpu_snapshots.GpuLayer``: the driver's, or the CPU
tests' fake one) and changes only ``resume``; the layer it wraps must accept
``resume(state, device_map=...)``. Indices are NVML's (``nvidia-smi``'s), which may differ from
CUDA's own order (``CUDA_DEVICE_ORDER``); a UUID (``GPU-...``) is never ambiguous.

Not the default (``restore_gpu`` None: the GPU it was made on, as before): restoring onto
another GPU has not run on two GPUs yet (none was lent); docs/multigpu.md says what to run.
Known limit after a move: the process's libcuda keeps the old GPU's PCI bus id
(NVIDIA/cuda-checkpoint#48), so NVML lookups by bus id inside the replica find the old GPU; the
transformers engine makes none.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["PlacedGpu", "choose_device_map", "resolve_gpu"]

DEFAULT_HEADROOM = 256 << 20


def resolve_gpu(target: str, devices: list[dict[str, Any]]) -> dict[str, Any]:
    """The device ``target`` names: ``cuda:N`` or ``N`` (NVML index), or a UUID (``GPU-...``,
    a unique prefix is enough).

    Raises:
        ValueError: no such GPU here (one line, listing the GPUs there are).
    """
    t = target.strip()
    here = ", ".join(f"{d['index']}={d['uuid']} ({d['name']})" for d in devices) or "none"
    if t.startswith("cuda:"):
        t = t[5:]
    if t.isdigit():
        hit = [d for d in devices if d["index"] == int(t)]
    elif t.startswith("GPU-"):
        hit = [d for d in devices if d["uuid"].startswith(t)]
    else:
        raise ValueError(f"--restore-gpu {target!r}: expected auto, same, cuda:N, N or a GPU UUID (GPUs here: {here})")
    if len(hit) != 1:
        raise ValueError(f"--restore-gpu {target!r} names {'no' if not hit else 'more than one'} GPU of this host "
                         f"(GPUs here: {here})")
    return hit[0]


def choose_device_map(state: Any, devices: list[dict[str, Any]], target: str = "auto",
                      headroom_bytes: int = DEFAULT_HEADROOM) -> dict[str, str] | None:
    """The device map for resuming ``state`` (``snapshot.Suspended``: ``gpus``, ``device_bytes``)
    on ``devices`` (``snapshot.gpu_devices()``), or None to resume on the GPUs it was made on.

    ``target``: "same" (None), "auto" (its own GPUs when each has the memory; a GPU that has not
    is replaced by the GPU of its model with the most free memory that has; None when none
    has, so the resume's own check refuses with the numbers), or one GPU (``resolve_gpu``) for
    a replica that used one.

    Raises:
        ValueError: an unknown target, or one GPU named for a replica that used several.
    """
    used = list(getattr(state, "gpus", None) or [])
    need = dict(getattr(state, "device_bytes", None) or {})
    if target == "same" or not used:
        return None
    by_uuid = {d["uuid"]: d for d in devices}
    if target != "auto":
        dev = resolve_gpu(target, devices)
        if len(used) != 1:
            raise ValueError(f"--restore-gpu {target!r} names one GPU; the snapshot's process used {len(used)}: "
                             f"use auto, or same")
        return None if dev["uuid"] == used[0]["uuid"] else {used[0]["uuid"]: dev["uuid"]}

    def fits(d: dict[str, Any] | None, g: dict[str, Any]) -> bool:
        return d is not None and d["name"] == g["name"] and d["memory_free"] >= need.get(g["uuid"], 0) + headroom_bytes

    if all(fits(by_uuid.get(g["uuid"]), g) for g in used):
        return None
    m: dict[str, str] = {}
    taken = {g["uuid"] for g in used if fits(by_uuid.get(g["uuid"]), g)}
    for g in used:
        if g["uuid"] in taken:
            continue
        spare = sorted((d for d in devices if d["uuid"] not in taken and fits(d, g)), key=lambda d: -d["memory_free"])
        if not spare:
            return None
        m[g["uuid"]] = spare[0]["uuid"]
        taken.add(spare[0]["uuid"])
    return m


class PlacedGpu:
    """A GPU layer that resumes where ``target`` says (see the module docstring); everything but
    ``resume`` is the wrapped layer's. ``last``: the latest choice (target, device map)."""

    def __init__(self, inner: Any, target: str = "auto",
                 devices: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.inner = inner
        self.target = target
        self._devices = devices or getattr(inner, "devices", None) or _gpu_devices
        self.last: dict[str, Any] = {}

    def check(self) -> None:
        """Fail now (before any work) when the target names no GPU of this host. Raises ValueError."""
        if self.target not in ("auto", "same"):
            resolve_gpu(self.target, self._devices())

    def suspend(self, pid: int) -> Any:
        return self.inner.suspend(pid)

    def state_from(self, stored: dict, pid: int) -> Any:
        return self.inner.state_from(stored, pid)

    def memory(self) -> dict[str, int]:
        return self.inner.memory()

    def process_memory(self, pid: int) -> int | None:
        f = getattr(self.inner, "process_memory", None)
        return f(pid) if f is not None else None

    def resume(self, state: Any, device_map: dict[str, str] | None = None) -> Any:
        """Resume ``state`` where the target says (an explicit ``device_map`` wins)."""
        m = device_map if device_map is not None else choose_device_map(state, self._devices(), self.target)
        self.last = {"target": self.target, "device_map": dict(m or {})}
        return self.inner.resume(state, device_map=m) if m else self.inner.resume(state)


def _gpu_devices() -> list[dict[str, Any]]:
    import snapshot

    return snapshot.gpu_devices()
