"""Compatibility keys: what a snapshot records about its host and GPUs, and the restore check.

A process snapshot only restores where the code it ran still runs: the same CPU architecture,
every CPU feature flag it may have used (a library that picked AVX-512 at start crashes on a CPU
without it), and for GPU state the same GPU models and the same driver (the driver's
checkpoint format is its own; GPUs of the same model may be other cards, in another order: the
driver restores onto them through a device map, issue 16). The kernel release is recorded but
not required to match: CRIU restores across kernel versions, and a mismatch is reported as a
note only.

Keys are plain JSON-able dicts so they can be stored next to snapshot images.
"""

from __future__ import annotations

import os
import platform
from collections import Counter
from typing import Any

__all__ = [
    "GpuUnavailable",
    "IncompatibleHost",
    "check_compatible",
    "compatibility_problems",
    "gpu_key",
    "host_key",
    "snapshot_key",
]

KEY_VERSION = 1


class GpuUnavailable(RuntimeError):
    """No usable NVIDIA GPU: the driver, NVML or cuda-bindings is missing, or no device is there."""


class IncompatibleHost(RuntimeError):
    """This host cannot restore the snapshot; ``problems`` says why. Fall back to a cold start."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("snapshot is incompatible with this host: " + "; ".join(problems))
        self.problems = problems


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, list[str]]:
    """(model name, sorted flags) of the first processor listed."""
    model, flags = "", []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "model name" and not model:
                    model = v.strip()
                elif k in ("flags", "Features") and not flags:
                    flags = sorted(set(v.split()))
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def host_key() -> dict[str, Any]:
    """The CPU side of a key: architecture, CPU model and flags, kernel release."""
    model, flags = _cpuinfo()
    return {
        "arch": platform.machine(),
        "cpu_model": model,
        "cpu_flags": flags,
        "kernel": os.uname().release,
    }


def _nvml() -> Any:
    try:
        import pynvml
    except ImportError as e:
        raise GpuUnavailable(f"nvidia-ml-py is not installed: pip install 'casfs[gpu]' ({e})") from None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        raise GpuUnavailable(f"NVML could not start (no NVIDIA driver or GPU here?): {e}") from None
    return pynvml


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def gpu_devices() -> list[dict[str, Any]]:
    """Every GPU NVML sees: index, name, uuid, total and free memory (bytes).

    Raises:
        GpuUnavailable: without NVML, a driver, or a GPU.
    """
    nv = _nvml()
    out = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        out.append({"index": i, "name": _text(nv.nvmlDeviceGetName(h)),
                    "uuid": _text(nv.nvmlDeviceGetUUID(h)), "memory_total": int(mem.total),
                    "memory_free": int(mem.free)})
    if not out:
        raise GpuUnavailable("NVML sees no GPU on this host")
    return out


def gpu_key() -> dict[str, Any]:
    """The GPU side of a key: GPU models and UUIDs, driver version, CUDA driver version.

    Raises:
        GpuUnavailable: without NVML, a driver, or a GPU.
    """
    nv = _nvml()
    devs = gpu_devices()
    cuda = int(nv.nvmlSystemGetCudaDriverVersion_v2())
    return {
        "gpus": [{"name": d["name"], "uuid": d["uuid"], "memory_total": d["memory_total"]} for d in devs],
        "driver": _text(nv.nvmlSystemGetDriverVersion()),
        "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}",
    }


def snapshot_key(gpu: bool = True) -> dict[str, Any]:
    """A full key: ``{"version", "host", "gpu"}`` (``gpu`` None when not asked for).

    Raises:
        GpuUnavailable: when ``gpu`` is True and no GPU can be read.
    """
    return {"version": KEY_VERSION, "host": host_key(), "gpu": gpu_key() if gpu else None}


def compatibility_problems(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Why a snapshot with key ``recorded`` cannot restore on a host with key ``current``.

    An empty list means compatible. Rules: same architecture; every recorded CPU flag present;
    when the snapshot has GPU state, at least as many GPUs of each recorded model (in any order,
    UUIDs may differ: ``snapshot.gpu.resume`` restores onto them through a device map), the
    same driver and CUDA driver versions. The kernel release is not compared.
    """
    problems: list[str] = []
    if recorded.get("version") != KEY_VERSION:
        return [f"key version {recorded.get('version')!r} is not {KEY_VERSION}: re-snapshot"]
    rh, ch = recorded.get("host") or {}, current.get("host") or {}
    if rh.get("arch") != ch.get("arch"):
        problems.append(f"CPU architecture {rh.get('arch')} != {ch.get('arch')}")
    lacking = sorted(set(rh.get("cpu_flags") or []) - set(ch.get("cpu_flags") or []))
    if lacking:
        problems.append(f"this CPU lacks flags the snapshot's CPU had: {' '.join(lacking[:12])}"
                        f"{' ...' if len(lacking) > 12 else ''}")
    rg = recorded.get("gpu")
    if rg:
        cg = current.get("gpu")
        if not cg:
            problems.append("the snapshot holds GPU state but this host has no GPU")
        else:
            rn = [g["name"] for g in rg.get("gpus", [])]
            cn = [g["name"] for g in cg.get("gpus", [])]
            lacking_gpus = Counter(rn) - Counter(cn)
            if lacking_gpus:  # any GPUs of the same models do: a device map moves the state
                problems.append(f"GPU models {rn} != {cn[:len(rn)]}: this host lacks "
                                + ", ".join(f"{n} x{k}" for n, k in sorted(lacking_gpus.items())))
            for field_ in ("driver", "cuda"):
                if rg.get(field_) != cg.get(field_):
                    problems.append(f"GPU {field_} version {rg.get(field_)} != {cg.get(field_)}")
    return problems


def check_compatible(recorded: dict[str, Any], current: dict[str, Any] | None = None) -> None:
    """Raise ``IncompatibleHost`` unless ``recorded`` restores here (``current`` read if None).

    Raises:
        IncompatibleHost: listing every problem.
        GpuUnavailable: never; a host without a GPU yields a problem instead.
    """
    if current is None:
        try:
            current = snapshot_key(gpu=bool(recorded.get("gpu")))
        except GpuUnavailable:
            current = snapshot_key(gpu=False)
    problems = compatibility_problems(recorded, current)
    if problems:
        raise IncompatibleHost(problems)
