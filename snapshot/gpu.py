"""Suspend and resume a process's GPU state with the NVIDIA driver's checkpoint API.

``suspend(pid)`` locks the process's CUDA API (waiting at most a timeout for its in-flight
calls), then moves all of its device memory and state into its own host memory and releases
the GPU. ``resume(...)`` puts everything back at the same device addresses (so captured CUDA
graphs, raw pointers and allocator state stay valid) and unlocks it. A supervisor can do this
to any process it may signal; the process itself needs no cooperation.

The raw API can leave a process stuck in CHECKPOINTED when a restore fails (out of memory, the
GPU gone or replaced). ``resume`` is transactional: it checks first that every GPU the process
used is present, of the same model and driver, and has enough free memory; if a check or the
restore itself fails, it kills the process (by default) and raises ``RestoreFailed`` so the
caller falls back to a cold start. The process is never left half-restored.

Needs the NVIDIA driver (580+), ``cuda-bindings`` (``cuda.bindings.driver``) and
``nvidia-ml-py``; without them every call raises ``GpuUnavailable``.
"""

from __future__ import annotations

import enum
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .compat import GpuUnavailable, _nvml, gpu_devices, gpu_key

__all__ = [
    "CheckpointError",
    "GpuUnavailable",
    "ProcessState",
    "RestoreFailed",
    "Resumed",
    "Suspended",
    "checkpoint",
    "get_state",
    "lock",
    "restore",
    "resume",
    "suspend",
    "unlock",
]

DEFAULT_LOCK_TIMEOUT_S = 10.0
DEFAULT_HEADROOM_BYTES = 256 << 20


class ProcessState(enum.Enum):
    """A process's checkpoint state as the driver reports it."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3
    CHECKPOINTING = 4
    RESTORING = 5


class CheckpointError(RuntimeError):
    """A checkpoint API call failed. ``result`` is the CUDA error name, ``pid`` the process."""

    def __init__(self, message: str, pid: int, result: str = "") -> None:
        super().__init__(message)
        self.pid = pid
        self.result = result


class RestoreFailed(CheckpointError):
    """A resume could not complete. ``killed`` says whether the process was killed;
    ``problems`` lists failed pre-checks. Fall back to a cold start."""

    def __init__(self, message: str, pid: int, result: str = "", *, killed: bool = False,
                 problems: list[str] | None = None) -> None:
        super().__init__(message, pid, result)
        self.killed = killed
        self.problems = problems or []


_init_lock = threading.Lock()
_drv: Any = None


def _driver() -> Any:
    """``cuda.bindings.driver`` with ``cuInit`` done. Raises GpuUnavailable."""
    global _drv
    with _init_lock:
        if _drv is not None:
            return _drv
        try:
            from cuda.bindings import driver
        except ImportError as e:
            raise GpuUnavailable(f"cuda-bindings is not installed: pip install 'casfs[gpu]' ({e})") from None
        if not hasattr(driver, "cuCheckpointProcessLock"):
            raise GpuUnavailable("this cuda-bindings has no cuCheckpointProcess* API (needs 12.8+)")
        try:
            (err,) = driver.cuInit(0)
        except Exception as e:  # noqa: BLE001 - the driver library cannot be found or loaded
            raise GpuUnavailable(f"the NVIDIA driver library could not be loaded: {e}") from None
        if err != driver.CUresult.CUDA_SUCCESS:
            raise GpuUnavailable(f"cuInit failed: {_name(driver, err)} (no GPU, or the driver is not loaded)")
        _drv = driver
        return driver


def _name(driver: Any, err: Any) -> str:
    try:
        e2, s = driver.cuGetErrorName(err)
        return s.decode() if isinstance(s, bytes) else str(s)
    except Exception:  # noqa: BLE001
        return str(err)


def _call(what: str, pid: int, fn: Any, *args: Any) -> Any:
    driver = _driver()
    res = fn(*args)
    err = res[0]
    if err != driver.CUresult.CUDA_SUCCESS:
        name = _name(driver, err)
        raise CheckpointError(f"{what} of pid {pid} failed: {name}", pid, name)
    return res[1] if len(res) > 1 else None


def get_state(pid: int) -> ProcessState:
    """The checkpoint state of ``pid``.

    Raises:
        CheckpointError: e.g. CUDA_ERROR_INVALID_VALUE when ``pid`` is not a CUDA process.
        GpuUnavailable: without driver or bindings.
    """
    d = _driver()
    st = _call("cuCheckpointProcessGetState", pid, d.cuCheckpointProcessGetState, pid)
    return ProcessState(int(st))


def lock(pid: int, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
    """Block ``pid``'s CUDA API calls (RUNNING -> LOCKED), waiting at most ``timeout_s``.

    On a timeout the process stays RUNNING. Raises CheckpointError.
    """
    d = _driver()
    args = d.CUcheckpointLockArgs()
    args.timeoutMs = max(0, int(timeout_s * 1000))
    _call("cuCheckpointProcessLock", pid, d.cuCheckpointProcessLock, pid, args)


def checkpoint(pid: int) -> None:
    """Move a LOCKED process's device state to host memory (-> CHECKPOINTED). Raises CheckpointError."""
    d = _driver()
    _call("cuCheckpointProcessCheckpoint", pid, d.cuCheckpointProcessCheckpoint, pid, None)


def restore(pid: int) -> None:
    """Put a CHECKPOINTED process's device state back (-> LOCKED). Raises CheckpointError."""
    d = _driver()
    _call("cuCheckpointProcessRestore", pid, d.cuCheckpointProcessRestore, pid, None)


def unlock(pid: int) -> None:
    """Let a LOCKED process make CUDA calls again (-> RUNNING). Raises CheckpointError."""
    d = _driver()
    _call("cuCheckpointProcessUnlock", pid, d.cuCheckpointProcessUnlock, pid, None)


@dataclass
class Suspended:
    """A process whose GPU state is in its host memory, and what resuming it needs.

    ``gpus``: the devices it used (index, name, uuid); ``device_bytes``: device memory the
    checkpoint freed, per GPU uuid (the free memory a resume needs); ``key``: the GPU key
    (models, driver, CUDA version) at suspend time.
    """

    pid: int
    gpus: list[dict[str, Any]]
    device_bytes: dict[str, int]
    key: dict[str, Any]
    lock_s: float = 0.0
    checkpoint_s: float = 0.0

    @property
    def total_device_bytes(self) -> int:
        return sum(self.device_bytes.values())

    def to_dict(self) -> dict[str, Any]:
        """What a snapshot stores to resume this state in a restored process (JSON-able)."""
        return {"gpus": self.gpus, "device_bytes": self.device_bytes, "key": self.key,
                "lock_s": self.lock_s, "checkpoint_s": self.checkpoint_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any], pid: int,
                  devices: list[dict[str, Any]] | None = None) -> "Suspended":
        """The state ``to_dict`` stored, for process ``pid`` (e.g. restored by CRIU).

        With ``devices`` (``gpu_devices()`` of this host), each recorded GPU is matched to this
        host's GPU of the same index and model, so the pre-checks of ``resume`` apply to it (a
        snapshot made on another host names other UUIDs); unmatched GPUs stay as recorded and
        fail the pre-checks.
        """
        gpus = [dict(g) for g in d.get("gpus") or []]
        device_bytes = {str(k): int(v) for k, v in (d.get("device_bytes") or {}).items()}
        if devices:
            by_index = {dev["index"]: dev for dev in devices}
            for g in gpus:
                cur = by_index.get(g.get("index"))
                if cur is not None and cur["name"] == g.get("name") and cur["uuid"] != g.get("uuid"):
                    device_bytes[cur["uuid"]] = device_bytes.pop(g["uuid"], 0)
                    g["uuid"] = cur["uuid"]
        return cls(pid, gpus, device_bytes, dict(d.get("key") or {}), float(d.get("lock_s", 0.0)),
                   float(d.get("checkpoint_s", 0.0)))


@dataclass
class Resumed:
    """Timings of a successful resume (seconds)."""

    pid: int
    check_s: float = 0.0
    restore_s: float = 0.0
    unlock_s: float = 0.0
    free_before: dict[str, int] = field(default_factory=dict)


def _process_gpus(pid: int, devs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GPUs on which NVML lists ``pid`` as a compute process (all GPUs if it lists none:
    inside some containers NVML does not see host PIDs)."""
    nv = _nvml()
    used = []
    for d in devs:
        h = nv.nvmlDeviceGetHandleByIndex(d["index"])
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
        except Exception:  # noqa: BLE001 - not supported on this device/driver
            procs = []
        if any(int(p.pid) == pid for p in procs):
            used.append(d)
    return used or devs


def suspend(pid: int, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Suspended:
    """Lock ``pid`` and move its GPU state into its host memory, freeing the GPU.

    On failure the process is unlocked again (left RUNNING) where the driver allows.

    Raises:
        CheckpointError: the process is not RUNNING, the lock timed out, or the checkpoint failed.
        GpuUnavailable: without driver, bindings or NVML.
    """
    state = get_state(pid)
    if state is not ProcessState.RUNNING:
        raise CheckpointError(f"pid {pid} is {state.name}, not RUNNING: cannot suspend it", pid)
    key = gpu_key()
    devs = gpu_devices()
    used = _process_gpus(pid, devs)
    free_before = {d["uuid"]: d["memory_free"] for d in used}
    t0 = time.perf_counter()
    lock(pid, lock_timeout_s)
    t1 = time.perf_counter()
    try:
        checkpoint(pid)
    except CheckpointError:
        try:
            if get_state(pid) is ProcessState.LOCKED:
                unlock(pid)
        except CheckpointError:
            pass
        raise
    t2 = time.perf_counter()
    free_after = {d["uuid"]: d["memory_free"] for d in gpu_devices() if d["uuid"] in free_before}
    freed = {u: max(0, free_after.get(u, 0) - free_before[u]) for u in free_before}
    gpus = [{"index": d["index"], "name": d["name"], "uuid": d["uuid"]} for d in used]
    return Suspended(pid, gpus, freed, key, lock_s=t1 - t0, checkpoint_s=t2 - t1)


def restore_problems(s: Suspended, devs: list[dict[str, Any]], key: dict[str, Any],
                     headroom_bytes: int = DEFAULT_HEADROOM_BYTES) -> list[str]:
    """Why ``s`` cannot be restored on GPUs ``devs`` under driver ``key`` (empty: it can).

    Every GPU the process used must be present (same UUID: the driver restores onto the
    device it came from), of the same model, under the same driver and CUDA versions, and have
    ``device_bytes + headroom_bytes`` free.
    """
    problems = []
    by_uuid = {d["uuid"]: d for d in devs}
    for g in s.gpus:
        cur = by_uuid.get(g["uuid"])
        if cur is None:
            problems.append(f"GPU {g['uuid']} ({g['name']}) the process used is gone")
            continue
        if cur["name"] != g["name"]:
            problems.append(f"GPU {g['uuid']} is now a {cur['name']}, was a {g['name']}")
        need = s.device_bytes.get(g["uuid"], 0) + headroom_bytes
        if cur["memory_free"] < need:
            problems.append(f"GPU {g['uuid']} has {cur['memory_free'] >> 20} MiB free, the process "
                            f"needs {need >> 20} MiB")
    for f in ("driver", "cuda"):
        if s.key.get(f) != key.get(f):
            problems.append(f"{f} version changed: {s.key.get(f)} -> {key.get(f)}")
    return problems


def _fail(pid: int, message: str, kill: bool, result: str = "", problems: list[str] | None = None) -> RestoreFailed:
    killed = False
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
            killed = True
        except ProcessLookupError:
            killed = True
        except PermissionError:
            killed = False
    tail = (f"; process {pid} was killed: fall back to a cold start" if killed
            else f"; process {pid} was left as it is")
    return RestoreFailed(message + tail, pid, result, killed=killed, problems=problems)


def resume(target: Suspended | int, *, kill_on_failure: bool = True,
           headroom_bytes: int = DEFAULT_HEADROOM_BYTES) -> Resumed:
    """Restore a suspended process's GPU state at the same addresses and let it run.

    Args:
        target: what ``suspend`` returned (enables the identity and free-memory checks), or a
            bare pid (only the driver's own checks apply).
        kill_on_failure: kill the process when a check or the restore fails, so nothing is
            left stuck in CHECKPOINTED (the default); False leaves it for the caller to retry.
        headroom_bytes: free device memory required beyond what the checkpoint freed.

    Raises:
        RestoreFailed: pre-checks failed or the driver refused; says whether the process was killed.
        CheckpointError: the process was not CHECKPOINTED (nothing was changed).
        GpuUnavailable: without driver, bindings or NVML (nothing was changed).
    """
    s = target if isinstance(target, Suspended) else None
    pid = s.pid if s is not None else int(target)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    state = get_state(pid)
    if state is not ProcessState.CHECKPOINTED:
        raise CheckpointError(f"pid {pid} is {state.name}, not CHECKPOINTED: nothing to resume", pid)
    free_before: dict[str, int] = {}
    if s is not None:
        try:
            devs = gpu_devices()
            key = gpu_key()
        except GpuUnavailable as e:
            raise _fail(pid, f"cannot resume pid {pid}: {e}", kill_on_failure, problems=[str(e)]) from None
        free_before = {d["uuid"]: d["memory_free"] for d in devs}
        problems = restore_problems(s, devs, key, headroom_bytes)
        if problems:
            raise _fail(pid, f"cannot resume pid {pid}: " + "; ".join(problems), kill_on_failure,
                        problems=problems)
    t1 = time.perf_counter()
    try:
        restore(pid)
    except CheckpointError as e:
        raise _fail(pid, str(e), kill_on_failure, e.result) from None
    t2 = time.perf_counter()
    try:
        unlock(pid)
    except CheckpointError as e:
        raise _fail(pid, str(e), kill_on_failure, e.result) from None
    t3 = time.perf_counter()
    return Resumed(pid, check_s=t1 - t0, restore_s=t2 - t1, unlock_s=t3 - t2, free_before=free_before)
