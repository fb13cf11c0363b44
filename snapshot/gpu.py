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

**Another GPU** (issue 16): ``resume(state, device_map={old_uuid: new_uuid})`` restores the
process onto other GPUs of the same model (driver 580+, cuda-bindings 13+). The map names only
the GPUs that move; ``snapshot.devicemap.plan`` completes it into the permutation the driver
wants (every GPU the process saw), and the same checks run against the new GPUs (present, same
model, enough free memory) before the driver is called. ``Suspended.from_dict`` given this
host's devices maps a snapshot made on another host onto this one's GPUs by index (same model),
and ``resume`` passes that map to the driver. Not yet run on two GPUs (no such machine was lent);
the traps it is built around are in ``snapshot.devicemap``'s docstring.

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

from . import devicemap
from .compat import GpuUnavailable, _nvml, gpu_devices, gpu_key
from .devicemap import DeviceMapError

__all__ = [
    "CheckpointError",
    "DeviceMapError",
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


def restore_args(driver: Any, device_map: dict[str, str] | None) -> Any:
    """The ``CUcheckpointRestoreArgs`` for ``device_map`` (old UUID -> new UUID, every GPU the
    process saw), or None for an identity map (the driver then restores onto the same GPUs).

    Raises:
        GpuUnavailable: ``device_map`` moves a GPU and these cuda-bindings cannot say so (13.0+).
        DeviceMapError: a UUID that is not a GPU UUID.
    """
    if devicemap.is_identity(device_map):
        return None
    assert device_map is not None
    if not hasattr(driver, "CUcheckpointGpuPair"):
        raise GpuUnavailable("restoring onto another GPU needs cuda-bindings 13.0+ (CUcheckpointGpuPair); "
                             "this one has none: pip install 'cuda-bindings>=13'")
    import ctypes

    pairs = []
    for old, new in device_map.items():
        pair = driver.CUcheckpointGpuPair()
        ctypes.memmove(pair.oldUuid.getPtr(), devicemap.uuid_bytes(old), 16)
        ctypes.memmove(pair.newUuid.getPtr(), devicemap.uuid_bytes(new), 16)
        pairs.append(pair)
    args = driver.CUcheckpointRestoreArgs()
    args.gpuPairs = pairs  # copied into memory the args object owns
    args.gpuPairsCount = len(pairs)
    return args


def restore(pid: int, device_map: dict[str, str] | None = None) -> None:
    """Put a CHECKPOINTED process's device state back (-> LOCKED), onto the GPUs ``device_map``
    names (old UUID -> new UUID, every GPU the process saw; None: the same GPUs).

    Raises:
        CheckpointError: the driver refused (the process may still be CHECKPOINTED).
        GpuUnavailable: without driver or bindings, or bindings that cannot remap GPUs.
        DeviceMapError: a UUID that is not a GPU UUID.
    """
    d = _driver()
    _call("cuCheckpointProcessRestore", pid, d.cuCheckpointProcessRestore, pid, restore_args(d, device_map))


def unlock(pid: int) -> None:
    """Let a LOCKED process make CUDA calls again (-> RUNNING). Raises CheckpointError."""
    d = _driver()
    _call("cuCheckpointProcessUnlock", pid, d.cuCheckpointProcessUnlock, pid, None)


@dataclass
class Suspended:
    """A process whose GPU state is in its host memory, and what resuming it needs.

    ``gpus``: the devices it used (index, name, uuid); ``device_bytes``: device memory the
    checkpoint freed, per GPU uuid (the free memory a resume needs); ``key``: the GPU key
    (models, driver, CUDA version) at suspend time; ``seen``: every GPU the process could see
    (index, name, uuid; a device map must name them all); ``visible_env``: its
    ``CUDA_VISIBLE_DEVICES`` (None: unset); ``default_map``: old UUID -> this host's UUID, set
    by ``from_dict`` for a snapshot made on another host (``resume`` uses it unless given one).
    """

    pid: int
    gpus: list[dict[str, Any]]
    device_bytes: dict[str, int]
    key: dict[str, Any]
    lock_s: float = 0.0
    checkpoint_s: float = 0.0
    seen: list[dict[str, Any]] = field(default_factory=list)
    visible_env: str | None = None
    default_map: dict[str, str] | None = None

    def seen_gpus(self) -> list[dict[str, Any]]:
        """The GPUs the process saw (recorded, or for older states the key's GPUs)."""
        if self.seen:
            return self.seen
        return [{"index": i, "name": g["name"], "uuid": g["uuid"]} for i, g in enumerate(self.key.get("gpus") or [])] \
            or list(self.gpus)

    @property
    def total_device_bytes(self) -> int:
        return sum(self.device_bytes.values())

    def to_dict(self) -> dict[str, Any]:
        """What a snapshot stores to resume this state in a restored process (JSON-able)."""
        return {"gpus": self.gpus, "device_bytes": self.device_bytes, "key": self.key,
                "lock_s": self.lock_s, "checkpoint_s": self.checkpoint_s, "seen": self.seen,
                "visible_env": self.visible_env}

    @classmethod
    def from_dict(cls, d: dict[str, Any], pid: int,
                  devices: list[dict[str, Any]] | None = None) -> "Suspended":
        """The state ``to_dict`` stored, for process ``pid`` (e.g. restored by CRIU).

        With ``devices`` (``gpu_devices()`` of this host) and a snapshot whose GPUs are not all
        here (made on another host), ``default_map`` maps each GPU it saw onto this host's GPU
        of the same index and model, so ``resume`` checks those GPUs and hands the driver the
        map; GPUs without such a match stay unmapped and fail the pre-checks.
        """
        gpus = [dict(g) for g in d.get("gpus") or []]
        device_bytes = {str(k): int(v) for k, v in (d.get("device_bytes") or {}).items()}
        s = cls(pid, gpus, device_bytes, dict(d.get("key") or {}), float(d.get("lock_s", 0.0)),
                float(d.get("checkpoint_s", 0.0)), [dict(g) for g in d.get("seen") or []], d.get("visible_env"))
        if devices:
            here = {dev["uuid"] for dev in devices}
            seen = s.seen_gpus()
            if any(g["uuid"] not in here for g in seen):
                by_index = {dev["index"]: dev for dev in devices}
                m = {}
                for g in seen:
                    cur = by_index.get(g.get("index"))
                    if cur is not None and cur["name"] == g.get("name"):
                        m[g["uuid"]] = cur["uuid"]
                s.default_map = m
        return s


@dataclass
class Resumed:
    """Timings of a successful resume (seconds)."""

    pid: int
    check_s: float = 0.0
    restore_s: float = 0.0
    unlock_s: float = 0.0
    free_before: dict[str, int] = field(default_factory=dict)
    device_map: dict[str, str] = field(default_factory=dict)  # the full map given to the driver ({}: same GPUs)
    gpus_after: list[str] = field(default_factory=list)  # where NVML lists the process after a move


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


@dataclass
class Probe:
    """What ``suspend`` reads before it locks a process (``snapshot.gpugroup`` reads it for
    every rank first): the GPU key, this host's GPUs, those the process uses and sees."""

    pid: int
    key: dict[str, Any]
    devices: list[dict[str, Any]]
    used: list[dict[str, Any]]
    seen: list[dict[str, Any]]
    visible_env: str | None


def probe(pid: int) -> Probe:
    """Read what a suspend records about ``pid`` (it must be RUNNING).

    Raises:
        CheckpointError: the process is not RUNNING (or not a CUDA process).
        GpuUnavailable: without driver, bindings or NVML.
    """
    state = get_state(pid)
    if state is not ProcessState.RUNNING:
        raise CheckpointError(f"pid {pid} is {state.name}, not RUNNING: cannot suspend it", pid)
    key = gpu_key()
    devs = gpu_devices()
    seen, env = devicemap.visible_gpus(pid, devs)
    return Probe(pid, key, devs, _process_gpus(pid, devs), _brief(seen), env)


def _brief(devs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"index": d["index"], "name": d["name"], "uuid": d["uuid"]} for d in devs]


def suspended(p: Probe, freed: dict[str, int], lock_s: float, checkpoint_s: float) -> Suspended:
    """The ``Suspended`` record of a probed process whose checkpoint freed ``freed`` bytes per GPU."""
    return Suspended(p.pid, _brief(p.used), {d["uuid"]: int(freed.get(d["uuid"], 0)) for d in p.used}, p.key,
                     lock_s=lock_s, checkpoint_s=checkpoint_s, seen=p.seen, visible_env=p.visible_env)


def suspend(pid: int, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Suspended:
    """Lock ``pid`` and move its GPU state into its host memory, freeing the GPU.

    On failure the process is unlocked again (left RUNNING) where the driver allows.

    Raises:
        CheckpointError: the process is not RUNNING, the lock timed out, or the checkpoint failed.
        GpuUnavailable: without driver, bindings or NVML.
    """
    p = probe(pid)
    free_before = {d["uuid"]: d["memory_free"] for d in p.used}
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
    return suspended(p, freed, t1 - t0, t2 - t1)


def restore_problems(s: Suspended, devs: list[dict[str, Any]], key: dict[str, Any],
                     headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
                     device_map: dict[str, str] | None = None) -> list[str]:
    """Why ``s`` cannot be restored on GPUs ``devs`` under driver ``key`` (empty: it can).

    Every GPU the process used must be present (same UUID, or the GPU ``device_map`` sends it
    to), of the same model, under the same driver and CUDA versions, and have
    ``device_bytes + headroom_bytes`` free (GPUs that receive several used GPUs: their sum).
    A map that moves a GPU also needs driver 580+.
    """
    problems = []
    by_uuid = {d["uuid"]: d for d in devs}
    dmap = device_map or {}
    need_on: dict[str, int] = {}
    for g in s.gpus:
        t = dmap.get(g["uuid"], g["uuid"])
        need_on[t] = need_on.get(t, 0) + s.device_bytes.get(g["uuid"], 0)
    for g in s.gpus:
        target = dmap.get(g["uuid"], g["uuid"])
        moved = f" (to be restored onto {target})" if target != g["uuid"] else ""
        cur = by_uuid.get(target)
        if cur is None:
            problems.append(f"GPU {target} ({g['name']}) the process used is gone" if not moved else
                            f"GPU {target}, where {g['uuid']} was to be restored, is not on this host")
            continue
        if cur["name"] != g["name"]:
            problems.append(f"GPU {target}{moved} is a {cur['name']}, the process used a {g['name']}")
        need = need_on.pop(target, None)
        if need is not None and cur["memory_free"] < need + headroom_bytes:
            problems.append(f"GPU {target} has {cur['memory_free'] >> 20} MiB free, the process needs "
                            f"{(need + headroom_bytes) >> 20} MiB")
    for f in ("driver", "cuda"):
        if s.key.get(f) != key.get(f):
            problems.append(f"{f} version changed: {s.key.get(f)} -> {key.get(f)}")
    if not devicemap.is_identity(device_map):
        try:
            major = int(str(key.get("driver") or "0").split(".")[0])
        except ValueError:
            major = 0
        if major < 580:
            problems.append(f"restoring onto another GPU needs NVIDIA driver 580+, this host has {key.get('driver')}")
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


def _full_map(s: Suspended, devs: list[dict[str, Any]], device_map: dict[str, str] | None) -> dict[str, str] | None:
    """The map handed to the driver: ``device_map`` (or ``s.default_map``) completed over every
    GPU the process saw; None when nothing moves. Raises DeviceMapError."""
    requested = device_map if device_map is not None else s.default_map
    here = {d["uuid"] for d in devs}
    if requested is None or (devicemap.is_identity(requested) and all(g["uuid"] in here for g in s.seen_gpus())):
        return None
    full = devicemap.plan(s.seen_gpus(), devs, requested)
    return None if devicemap.is_identity(full) else full


def _moved_hint(s: Suspended | None, result: str) -> str:
    if result != "CUDA_ERROR_INVALID_VALUE":
        return ""
    hint = (" (the driver refused the device map: it must pair every GPU the process saw with a GPU of "
            "the same chip, NVIDIA/cuda-checkpoint#35")
    if s is not None and s.visible_env is not None:
        hint += f"; this process was started with CUDA_VISIBLE_DEVICES={s.visible_env!r}, which was reported " \
                "to break remaps (NVIDIA/cuda-python#1983): start it without"
    return hint + ")"


def where_listed(pid: int, devs: list[dict[str, Any]]) -> list[str]:
    """UUIDs of the GPUs on which NVML lists ``pid`` (empty when it lists it nowhere)."""
    try:
        nv = _nvml()
    except GpuUnavailable:
        return []
    out = []
    for d in devs:
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(nv.nvmlDeviceGetHandleByIndex(d["index"]))
        except Exception:  # noqa: BLE001 - not supported on this device/driver
            continue
        if any(int(p.pid) == pid for p in procs):
            out.append(d["uuid"])
    return out


def resume(target: Suspended | int, *, kill_on_failure: bool = True,
           headroom_bytes: int = DEFAULT_HEADROOM_BYTES, device_map: dict[str, str] | None = None) -> Resumed:
    """Restore a suspended process's GPU state at the same addresses and let it run.

    Args:
        target: what ``suspend`` returned (enables the identity and free-memory checks), or a
            bare pid (only the driver's own checks apply).
        kill_on_failure: kill the process when a check or the restore fails, so nothing is
            left stuck in CHECKPOINTED (the default); False leaves it for the caller to retry.
        headroom_bytes: free device memory required beyond what the checkpoint freed.
        device_map: old GPU UUID -> new GPU UUID for the GPUs that move (another GPU of the
            same model; the rest of the map is completed, see ``snapshot.devicemap``). None:
            ``target.default_map`` if set (a snapshot from another host), else the same GPUs.
            Needs ``target`` to be a ``Suspended``.

    Raises:
        RestoreFailed: pre-checks failed (an unusable device map among them) or the driver
            refused; says whether the process was killed.
        CheckpointError: the process was not CHECKPOINTED (nothing was changed).
        GpuUnavailable: without driver, bindings or NVML (nothing was changed).
        ValueError: a device map for a bare pid (nothing was changed).
    """
    s = target if isinstance(target, Suspended) else None
    pid = s.pid if s is not None else int(target)  # type: ignore[arg-type]
    if s is None and device_map:
        raise ValueError(f"a device map needs the Suspended state of pid {pid} (which GPUs it saw), not a bare pid")
    t0 = time.perf_counter()
    state = get_state(pid)
    if state is not ProcessState.CHECKPOINTED:
        raise CheckpointError(f"pid {pid} is {state.name}, not CHECKPOINTED: nothing to resume", pid)
    free_before: dict[str, int] = {}
    full: dict[str, str] | None = None
    devs: list[dict[str, Any]] = []
    if s is not None:
        try:
            devs = gpu_devices()
            key = gpu_key()
        except GpuUnavailable as e:
            raise _fail(pid, f"cannot resume pid {pid}: {e}", kill_on_failure, problems=[str(e)]) from None
        free_before = {d["uuid"]: d["memory_free"] for d in devs}
        try:
            full = _full_map(s, devs, device_map)
        except DeviceMapError as e:
            raise _fail(pid, f"cannot resume pid {pid}: {e}", kill_on_failure, problems=e.problems) from None
        problems = restore_problems(s, devs, key, headroom_bytes, full)
        if problems:
            raise _fail(pid, f"cannot resume pid {pid}: " + "; ".join(problems), kill_on_failure,
                        problems=problems)
    t1 = time.perf_counter()
    try:
        restore(pid, full)
    except CheckpointError as e:
        hint = _moved_hint(s, e.result) if full else ""
        raise _fail(pid, str(e) + hint, kill_on_failure, e.result) from None
    except (GpuUnavailable, DeviceMapError) as e:
        raise _fail(pid, f"cannot resume pid {pid}: {e}", kill_on_failure, problems=[str(e)]) from None
    t2 = time.perf_counter()
    try:
        unlock(pid)
    except CheckpointError as e:
        raise _fail(pid, str(e), kill_on_failure, e.result) from None
    t3 = time.perf_counter()
    after = where_listed(pid, devs) if full else []
    return Resumed(pid, check_s=t1 - t0, restore_s=t2 - t1, unlock_s=t3 - t2, free_before=free_before,
                   device_map=dict(full or {}), gpus_after=after)
