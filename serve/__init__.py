"""serve: an OpenAI-compatible replica over vLLM whose boot is a timed pipeline on casfs.

    from serve import BootConfig, boot_replica
    replica = boot_replica(BootConfig(image="tiny", listen="127.0.0.1:8000", eager=True))
    replica.report.phases      # {"gpu_health": ..., "mount": ..., "init": ..., "first_token": ...}
    replica.stop()

Or from the shell: ``casfs serve MODEL_IMAGE [--snapshot TAG [--create]] --listen HOST:PORT``.

Modules: ``app`` (the OpenAI HTTP API over an Engine), ``http`` (its asyncio HTTP/1.1 server),
``engine`` (the Engine protocol and the vLLM adapter), ``hf_engine`` (the transformers engine, with
``hf_model``, ``kvcache``, ``decoding``, ``batching``, ``sampling``, ``textstream``),
``echo`` (a deterministic stand-in engine), ``gpu_snapshots`` (GPU snapshots of a replica),
``gpu_placement`` (which GPU a snapshot resumes on), ``tp`` and ``tp_worker`` (a
tensor-parallel replica: its ranks, parked and unparked together),
``pool`` and ``front`` (parked replicas: a warm pool and its front door),
``boot`` (the pipeline), ``report`` (its report and phase timer), ``modeldir`` (the model image
mounted or exported), ``client`` (HTTP to a replica), ``process`` (starting/stopping the worker),
``errors``, ``worker`` (the replica process), ``instructions`` (what a restored worker is told),
``snapshots`` (CPU snapshots through ``snapshot``), ``health`` (NVML GPU check), ``metrics``
(serve's Prometheus metrics).
Names are imported on first use, so ``import serve`` needs neither vLLM nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ServeApp": "app", "ApiError": "app",
    "HttpServer": "http",
    "Engine": "engine", "VllmEngine": "engine", "VllmOptions": "engine", "SamplingSettings": "engine",
    "Delta": "engine", "InvalidRequest": "engine", "EngineError": "engine",
    "EchoEngine": "echo",
    "WarmPool": "pool", "FrontDoor": "front",
    "PlacedGpu": "gpu_placement", "TpReplica": "tp",
    "TransformersEngine": "hf_engine", "TransformersOptions": "hf_engine", "WeightsSource": "hf_model",
    "BootConfig": "boot", "BootReport": "report", "BootError": "errors", "Replica": "boot",
    "boot_replica": "boot",
    "SnapshotUnavailable": "snapshots",
    "check_gpus": "health", "require_healthy": "health", "GpuUnhealthy": "health", "HealthReport": "health",
    "ServeMetrics": "metrics",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"serve.{mod}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
