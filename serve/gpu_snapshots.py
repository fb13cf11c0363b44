"""GPU snapshots of a replica: CRIU for the process, the NVIDIA driver's checkpoint for its GPU
state, the weights and KV cache left out of both (issue 18).

**create** (``casfs serve IMG --snapshot TAG --create`` on a GPU host, transformers engine):

1. the worker is started in this PID namespace (``snapshot.spawn(pid_namespace=False)``: CUDA
   does not initialise in a PID namespace whose /proc is the host's), boots cold (weights
   from casfs, torch.compile, CUDA graphs), warms up, then frees its weights and KV cache while
   keeping their addresses (CUDA virtual memory, ``TransformersEngine.release_device``) and
   calls ``snapshot.ready()``;
2. the supervisor moves the remaining GPU state (context, compiled kernels, graphs, their memory
   pool) into the worker's host memory with ``snapshot.suspend`` (the worker then holds no
   /dev/nvidia* descriptors), and dumps it with ``snapshot.checkpoint(gpu=...)``: one casfs image
   whose key adds the GPU models, driver and CUDA versions to the CPU key;
3. it is restored at once, as below, to serve (every snapshot is proven restorable when made).

**restore**: ``snapshot.restore`` (CRIU; same PID, the original is gone) -> a check that the GPU
has the free memory the state needs plus headroom (a driver restore that runs out of memory
leaves the process stuck for good: NVIDIA/cuda-checkpoint#44) -> ``snapshot.resume`` (restore
+ unlock, transactional: on failure the process is killed, never left CHECKPOINTED) -> the
worker's instructions, which now also say where to stream the weights from; the worker maps
memory back at the same addresses, streams the weights from casfs, zeroes the KV cache, reseeds
and listens. Its CUDA graphs replay unchanged. While CRIU runs, a thread here reads the
weights' chunks through the store, so a cold ssd or blob tier is read once, overlapped with the
restore, and the worker finds them in the page cache.

Every failure raises ``BootError`` with the reason (the restored process is killed first);
serve.boot then boots the replica cold and records why in the boot report.

The GPU calls go through a :class:`GpuLayer`; :class:`DriverGpu` is the real one (the driver's
checkpoint API via ``snapshot``). The CPU tests use a fake GPU layer named as such.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Protocol

import casfs

from .errors import BootError
from .instructions import write_instructions
from .snapshots import CriuBackend, Restored, SnapshotUnavailable

__all__ = ["DriverGpu", "GpuCriuBackend", "GpuLayer", "WeightsPrefetch"]

log = logging.getLogger("serve.gpu_snapshots")


class GpuLayer(Protocol):
    """What a GPU snapshot needs from the GPU (see :class:`DriverGpu`)."""

    def suspend(self, pid: int) -> Any:
        """Move ``pid``'s GPU state into its host memory; returns a state with ``to_dict()``."""

    def resume(self, state: Any, device_map: dict[str, str] | None = None) -> Any:
        """Put it back (pre-checks first; onto the GPUs ``device_map`` names, issue 16); raise on
        failure, with the process killed."""

    def state_from(self, stored: dict, pid: int) -> Any:
        """The state ``to_dict`` stored, for the restored process ``pid``."""

    def memory(self) -> dict[str, int]:
        """Device memory now: ``{"used": bytes, "free": bytes}`` over the host's GPUs."""


class DriverGpu:
    """The real GPU layer: ``snapshot.suspend`` / ``snapshot.resume`` (the driver's checkpoint API)."""

    def __init__(self) -> None:
        import snapshot

        self.snapshot = snapshot

    def suspend(self, pid: int) -> Any:
        return self.snapshot.suspend(pid)

    def resume(self, state: Any, device_map: dict[str, str] | None = None) -> Any:
        return self.snapshot.resume(state, device_map=device_map)

    def state_from(self, stored: dict, pid: int) -> Any:
        return self.snapshot.Suspended.from_dict(stored, pid, self.snapshot.gpu_devices())

    def memory(self) -> dict[str, int]:
        devs = self.snapshot.gpu_devices()
        return {"used": sum(d["memory_total"] - d["memory_free"] for d in devs),
                "free": sum(d["memory_free"] for d in devs)}

    def host_register_read_only(self) -> bool:
        """Whether GPU 0 can page-lock read-only host memory (``cudaHostRegisterReadOnly``: the
        device attribute READ_ONLY_HOST_REGISTER_SUPPORTED); False when it cannot tell."""
        try:
            from cuda.bindings import driver as d

            d.cuInit(0)
            err, dev = d.cuDeviceGet(0)
            if err != d.CUresult.CUDA_SUCCESS:
                return False
            attr = getattr(d.CUdevice_attribute, "CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED", None)
            err, v = d.cuDeviceGetAttribute(attr if attr is not None else d.CUdevice_attribute(113), dev)
            return err == d.CUresult.CUDA_SUCCESS and bool(v)
        except Exception:  # noqa: BLE001 - no bindings or driver: unknown, so no
            return False

    def process_memory(self, pid: int) -> int | None:
        """GPU memory NVML lists for ``pid`` (bytes; 0 when it holds none; None when NVML cannot
        tell, e.g. it does not see this PID namespace)."""
        try:
            import pynvml

            pynvml.nvmlInit()
            total, seen = 0, False
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                    seen = True
                    if int(proc.pid) == pid:
                        total += int(proc.usedGpuMemory or 0)
            return total if (seen or total) else 0
        except Exception:  # noqa: BLE001 - NVML missing or not supported: unknown
            return None


class WeightsPrefetch:
    """Reads every chunk of the weight files of a model image through the store in a thread
    (verified reads, results dropped), so tiers below the page cache are read while something
    else runs. ``join()`` returns the seconds it took and the bytes read (0 if it failed: the
    worker's own load then reads them, and reports any error)."""

    def __init__(self, store: Any, image_id: str, paths: list[str]) -> None:
        self.seconds = 0.0
        self.bytes = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(store, image_id, paths), daemon=True,
                                        name="weights-prefetch")
        self._thread.start()

    def _run(self, store: Any, image_id: str, paths: list[str]) -> None:
        t0 = time.perf_counter()
        try:
            image = store.open_image(image_id)
            buf = bytearray(image.chunk_size)  # the largest chunk size of any file
            for p in paths:
                entry = image.lookup(p)
                size = image.stat(p).size
                cs = image.file_chunk_size(entry)
                for off in range(0, size, cs):
                    n = image.read_into(entry, off, memoryview(buf)[:min(cs, size - off)])
                    self.bytes += n
        except (casfs.CasfsError, OSError, ValueError) as e:
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = time.perf_counter() - t0

    def join(self, timeout: float | None = None) -> tuple[float, int]:
        self._thread.join(timeout)
        return self.seconds, self.bytes


def weight_files(image: Any) -> list[str]:
    """The safetensors files of a model image (the shards an index names, or model.safetensors)."""
    try:
        image.stat("model.safetensors.index.json")
    except casfs.CasfsError:
        return ["model.safetensors"]
    import json

    idx = json.loads(image.read_entry(image.lookup("model.safetensors.index.json")))
    return sorted(set(idx.get("weight_map", {}).values()))


class GpuCriuBackend(CriuBackend):
    """GPU snapshots (see the module docstring). ``gpu``: the GPU layer (default: the driver)."""

    gpu_state = True

    def __init__(self, lazy: bool = False, source: str = "export", gpu: GpuLayer | None = None) -> None:
        super().__init__(lazy=lazy, source=source)
        self.gpu = gpu if gpu is not None else DriverGpu()

    def spawn(self, argv: list[str], env: dict[str, str], log_path: str) -> Any:
        return self.snapshot.spawn(argv, stdout=log_path, stderr=True, env=env, cwd="/", pid_namespace=False)

    def create(self, proc: Any, store: Any, tag: str) -> dict:
        """Suspend the ready worker's GPU state and snapshot it as ``tag`` (the dump ends it).

        Raises:
            BootError: the suspend or the dump failed (the worker is resumed and killed).
        """
        snap = self.snapshot
        t0 = time.perf_counter()
        before = self._memory()
        try:
            state = self.gpu.suspend(proc.pid)
        except Exception as e:  # noqa: BLE001 - CheckpointError, GpuUnavailable, ...
            proc.kill()
            raise BootError(f"suspending the replica's GPU state failed: {type(e).__name__}: {e}") from None
        t_suspend = time.perf_counter() - t0
        after = self._memory()
        try:
            problems = snap.tree_rule_problems(proc.pid, saved=snap.shm_segments(snap.process_tree(proc.pid)))
            if problems:
                raise BootError(f"the replica cannot be snapshotted: {'; '.join(problems)}")
            ref = snap.checkpoint(proc, store, tag, leave_running=False, strict=False, gpu=state)
        except (BootError, snap.CriuError) as e:
            with contextlib.suppress(Exception):
                self.gpu.resume(state)  # never leave a process CHECKPOINTED (it is killed below)
            proc.kill()
            raise BootError(f"snapshot {tag} could not be taken: {e}") from None
        meta = ref.meta
        return {"tag": tag, "image_id": ref.image_id, "timings": {"suspend": t_suspend, **ref.timings},
                "pages_bytes": meta.get("pages_bytes"), "gpu_state": state.to_dict(),
                "gpu_memory_before_suspend": before, "gpu_memory_after_suspend": after}

    def _memory(self) -> dict[str, int]:
        try:
            return self.gpu.memory()
        except Exception:  # noqa: BLE001 - a report field, never a reason to fail
            return {}

    def restore(self, store: Any, tag: str, *, listen: str, seed: int, token: str,
                weights: dict | None = None) -> Restored:
        """Restore ``tag`` (CRIU), resume its GPU state, and hand the worker its instructions
        (``weights``: where to stream the weights from on this host).

        With ``source="store"`` (lazily, pages fed from verified casfs reads, no export) a
        failure of CRIU or of the GPU resume is retried once from the host's export (eager),
        with the reason in the detail's ``store_failed``; only a second failure raises.
        (serve.boot uses the export unless told otherwise: measured on the H200, the driver's
        resume faults the lazy device state in page by page, 23-28 s instead of 0.45 s.)

        Raises:
            SnapshotUnavailable: missing or incompatible snapshot (nothing was started).
            BootError: CRIU or the GPU resume failed (the restored process was killed).
        """
        prefetch = None
        if weights and weights.get("image"):
            try:
                prefetch = WeightsPrefetch(store, weights["image"], weight_files(store.open_image(weights["image"])))
            except casfs.CasfsError:
                prefetch = None
        args = dict(listen=listen, seed=seed, token=token, weights=weights, prefetch=prefetch)
        if self.source != "store":
            return self._restore(store, tag, self.lazy, self.source, **args)
        t0 = time.perf_counter()
        try:
            return self._restore(store, tag, True, "store", **args)
        except BootError as e:  # the restored process (if any) was killed: try the export once
            log.warning("restoring GPU snapshot %s from the store failed (%s); restoring from its export", tag, e)
            reason, failed_s = str(e), time.perf_counter() - t0
        restored = self._restore(store, tag, False, "export", **args)
        restored.detail.update(store_failed=reason, store_failed_s=failed_s)
        return restored

    def _restore(self, store: Any, tag: str, lazy: bool, source: str, *, listen: str, seed: int, token: str,
                 weights: dict | None, prefetch: WeightsPrefetch | None) -> Restored:
        snap = self.snapshot
        t0 = time.perf_counter()
        try:
            live = snap.restore(tag, store, lazy=lazy, source=source)
        except snap.IncompatibleHost as e:
            raise SnapshotUnavailable(f"snapshot {tag} does not fit this host: {e}") from None
        except casfs.ImageNotFound:
            raise SnapshotUnavailable(f"no snapshot {tag} in the store: create one with "
                                      f"`casfs serve IMAGE --snapshot {tag} --create`") from None
        except ValueError as e:
            raise SnapshotUnavailable(str(e)) from None
        except snap.CriuError as e:
            raise BootError(f"restoring snapshot {tag} failed: {e}") from None
        t_criu = time.perf_counter() - t0
        try:
            meta = snap.read_meta(store.open_image(live.image_id))
            stored = meta.get("gpu")
            if not stored:
                raise BootError(f"snapshot {tag} holds no GPU state: restore it without a GPU backend")
            t1 = time.perf_counter()
            before = self._memory()
            try:
                resumed = self.gpu.resume(self.gpu.state_from(stored, live.pid))
            except Exception as e:  # noqa: BLE001 - RestoreFailed, CheckpointError, GpuUnavailable
                raise BootError(f"resuming the GPU state of snapshot {tag} failed: {type(e).__name__}: {e}") from None
            t_resume = time.perf_counter() - t1
            write_instructions(live.pid, {"listen": listen, "seed": seed, "control_token": token,
                                          "weights": weights or {}})
        except BaseException:
            live.kill()
            raise
        detail = {"timings": {**live.timings, "criu_restore": t_criu, "gpu_resume": t_resume},
                  "lazy": lazy, "source": source, "image_id": live.image_id,
                  "gpu_memory_before_resume": before,
                  "gpu_resume": {k: getattr(resumed, k) for k in ("check_s", "restore_s", "unlock_s", "device_map")
                                 if hasattr(resumed, k)}}
        if prefetch is not None:
            secs, nbytes = prefetch.join(0)
            detail["weights_prefetch"] = {"started_before_criu": True, "bytes_so_far": nbytes,
                                          "error": prefetch.error}
        shm = [i["path"] for i in meta.get("shm") or []]
        return Restored(live, live.pid, detail, shm)
