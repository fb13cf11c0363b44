"""A FAKE NVIDIA driver and a FAKE NVML, for snapshot.gpu's and snapshot.gpugroup's logic on hosts
without a GPU (CI; issue 16).

What is real: the processes (real pids the tests start), the argument structures handed to the
driver (``cuda.bindings.driver``'s own ``CUcheckpointRestoreArgs`` / ``CUcheckpointGpuPair``,
read back from their raw memory exactly as libcuda would read them; without cuda-bindings only
restores onto the same GPUs work), and the caller's code paths. What is fake: the checkpoint state machine (``FakeDriver``), which moves no memory
anywhere, and the GPUs (``FakeNvml``), which are dicts.

The fake driver follows the documented contract of ``cuCheckpointProcess*`` (CUDA 13 driver
API): lock RUNNING -> LOCKED, checkpoint LOCKED -> CHECKPOINTED, restore CHECKPOINTED -> LOCKED,
unlock LOCKED -> RUNNING, anything else CUDA_ERROR_ILLEGAL_STATE; a restore with GPU pairs must
pair every GPU the process saw with a distinct GPU of the same chip (else
CUDA_ERROR_INVALID_VALUE, the behaviour reported in NVIDIA/cuda-checkpoint#35) and needs the
memory on the target GPU (else CUDA_ERROR_OUT_OF_MEMORY, after which the process can never be
restored again: NVIDIA/cuda-checkpoint#44). A checkpointed process is SIGSTOPped and an
unlocked one SIGCONTinued, so a real process really stops making progress while "on the host".
Failures can be injected per call: ``fail[(op, pid)] = "CUDA_ERROR_..."`` (once) or
``hang[(op, pid)] = seconds``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

try:
    from cuda.bindings import driver as _real

    CUresult = _real.CUresult
except ImportError:  # no cuda-bindings (e.g. .venv-vllm): the states work, GPU pairs cannot be built
    import enum

    _real = None
    CUresult = enum.IntEnum("CUresult", {"CUDA_SUCCESS": 0, "CUDA_ERROR_INVALID_VALUE": 1, "CUDA_ERROR_OUT_OF_MEMORY": 2,
                                         "CUDA_ERROR_INVALID_DEVICE": 101, "CUDA_ERROR_OPERATING_SYSTEM": 304,
                                         "CUDA_ERROR_ILLEGAL_STATE": 401, "CUDA_ERROR_TIMEOUT": 909,
                                         "CUDA_ERROR_UNKNOWN": 999})


def uuid_str(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def fake_uuid(i: int) -> str:
    return uuid_str(bytes([0xfa, 0xce, i, 0]) + bytes(12))


def read_restore_args(args: Any) -> list[tuple[str, str]] | None:
    """The GPU pairs in a ``CUcheckpointRestoreArgs`` as libcuda sees them: its raw struct memory
    (pointer at offset 0, count at offset 8), then ``count`` pairs of 16 + 16 bytes."""
    if args is None:
        return None
    raw = ctypes.string_at(args.getPtr(), 64)
    ptr = int.from_bytes(raw[:8], "little")
    count = int.from_bytes(raw[8:12], "little")
    if ptr == 0 or count == 0:
        return []
    pairs = ctypes.string_at(ptr, 32 * count)
    return [(uuid_str(pairs[i * 32:i * 32 + 16]), uuid_str(pairs[i * 32 + 16:i * 32 + 32])) for i in range(count)]


@dataclass
class FakeProc:
    pid: int
    gpus: list[str]  # where its memory lives now (uuids)
    seen: list[str]  # every GPU it saw at start
    bytes_per_gpu: int
    state: int = 0  # 0 RUNNING, 1 LOCKED, 2 CHECKPOINTED
    poisoned: bool = False  # a restore ran out of memory: never restorable again (#44)


@dataclass
class FakeGpuDevice:
    uuid: str
    name: str
    total: int
    other_used: int = 0  # memory used by things that are not FakeProcs


class FakeNvml:
    """A FAKE NVML over a ``FakeDriver``'s GPUs (the functions snapshot.compat and snapshot.gpu call)."""

    def __init__(self, drv: "FakeDriver") -> None:
        self.drv = drv

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.drv.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.drv.devices[h].name

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.drv.devices[h].uuid

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        d = self.drv.devices[h]
        used = d.other_used + self.drv.used_on(d.uuid)
        return type("Mem", (), {"total": d.total, "free": d.total - used, "used": used})()

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        u = self.drv.devices[h].uuid
        return [type("P", (), {"pid": p.pid, "usedGpuMemory": p.bytes_per_gpu})()
                for p in self.drv.procs.values() if p.state != 2 and u in p.gpus]

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.drv.driver_version

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return 13000


@dataclass
class FakeDriver:
    """A FAKE ``cuda.bindings.driver`` (see the module docstring)."""

    devices: list[FakeGpuDevice]
    driver_version: str = "580.95.05"
    procs: dict[int, FakeProc] = field(default_factory=dict)
    calls: list[tuple] = field(default_factory=list)  # (op, pid, extra)
    fail: dict[tuple[str, int], str] = field(default_factory=dict)
    hang: dict[tuple[str, int], float] = field(default_factory=dict)
    stop_processes: bool = True  # SIGSTOP checkpointed processes, SIGCONT unlocked ones
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # the real argument types: what the code under test builds is what libcuda would get
    CUresult = CUresult
    if _real is not None:
        CUcheckpointLockArgs = _real.CUcheckpointLockArgs
        CUcheckpointRestoreArgs = _real.CUcheckpointRestoreArgs
        CUcheckpointGpuPair = _real.CUcheckpointGpuPair
        CUuuid = _real.CUuuid
    else:
        class CUcheckpointLockArgs:  # noqa: D106 - stands in where cuda-bindings is absent
            timeoutMs = 0

    def add(self, pid: int, gpus: list[str], nbytes: int = 1 << 30, seen: list[str] | None = None) -> FakeProc:
        p = FakeProc(pid, list(gpus), list(seen if seen is not None else [d.uuid for d in self.devices]), nbytes)
        self.procs[pid] = p
        return p

    def used_on(self, uuid: str) -> int:
        return sum(p.bytes_per_gpu for p in self.procs.values() if p.state != 2 and uuid in p.gpus)

    def free_on(self, uuid: str) -> int:
        d = next(d for d in self.devices if d.uuid == uuid)
        return d.total - d.other_used - self.used_on(uuid)

    # -- the driver API -------------------------------------------------------------------------

    def cuInit(self, flags: int) -> tuple:
        return (CUresult.CUDA_SUCCESS,)

    def cuGetErrorName(self, err: Any) -> tuple:
        return (CUresult.CUDA_SUCCESS, err.name.encode())

    def _enter(self, op: str, pid: int, extra: Any = None) -> Any:
        self.calls.append((op, pid, extra))
        secs = self.hang.pop((op, pid), 0.0)
        if secs:
            time.sleep(secs)
        err = self.fail.pop((op, pid), None)
        if err:
            return getattr(CUresult, err)
        if pid not in self.procs:
            return CUresult.CUDA_ERROR_INVALID_VALUE
        return None

    def _signal(self, pid: int, sig: int) -> None:
        if self.stop_processes:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def cuCheckpointProcessGetState(self, pid: int) -> tuple:
        p = self.procs.get(pid)
        if p is None:
            return (CUresult.CUDA_ERROR_INVALID_VALUE, None)
        return (CUresult.CUDA_SUCCESS, p.state)

    def cuCheckpointProcessLock(self, pid: int, args: Any) -> tuple:
        with self._lock:
            e = self._enter("lock", pid, getattr(args, "timeoutMs", None))
            if e is not None:
                return (e,)
            p = self.procs[pid]
            if p.state != 0:
                return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
            p.state = 1
            return (CUresult.CUDA_SUCCESS,)

    def cuCheckpointProcessCheckpoint(self, pid: int, args: Any) -> tuple:
        with self._lock:
            e = self._enter("checkpoint", pid)
            if e is not None:
                return (e,)
            p = self.procs[pid]
            if p.state != 1:
                return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
            p.state = 2
            self._signal(pid, signal.SIGSTOP)
            return (CUresult.CUDA_SUCCESS,)

    def cuCheckpointProcessRestore(self, pid: int, args: Any) -> tuple:
        with self._lock:
            pairs = read_restore_args(args)
            e = self._enter("restore", pid, pairs)
            if e is not None:
                return (e,)
            p = self.procs[pid]
            if p.state != 2:
                return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
            if p.poisoned:
                return (CUresult.CUDA_ERROR_OPERATING_SYSTEM,)
            names = {d.uuid: d.name for d in self.devices}
            target = list(p.gpus)
            if pairs:
                olds = [o for o, _ in pairs]
                news = [n for _, n in pairs]
                ok = (sorted(olds) == sorted(p.seen) and len(set(news)) == len(news)
                      and all(n in names and names.get(o, names[n]) == names[n] for o, n in pairs))
                if not ok:
                    return (CUresult.CUDA_ERROR_INVALID_VALUE,)
                m = dict(pairs)
                target = [m[g] for g in p.gpus]
            elif any(g not in names for g in p.gpus):
                return (CUresult.CUDA_ERROR_INVALID_DEVICE,)
            for g in target:
                if self.free_on(g) < p.bytes_per_gpu:
                    p.poisoned = True
                    return (CUresult.CUDA_ERROR_OUT_OF_MEMORY,)
            p.gpus = target
            p.state = 1
            return (CUresult.CUDA_SUCCESS,)

    def cuCheckpointProcessUnlock(self, pid: int, args: Any) -> tuple:
        with self._lock:
            e = self._enter("unlock", pid)
            if e is not None:
                return (e,)
            p = self.procs[pid]
            if p.state != 1:
                return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
            p.state = 0
            self._signal(pid, signal.SIGCONT)
            return (CUresult.CUDA_SUCCESS,)


def install(monkeypatch: Any, drv: FakeDriver) -> FakeNvml:
    """Make snapshot.gpu and snapshot.compat talk to ``drv`` and a FakeNvml over it."""
    from snapshot import compat, gpu

    nv = FakeNvml(drv)
    monkeypatch.setattr(gpu, "_drv", drv)
    monkeypatch.setattr(compat, "_nvml", lambda: nv)
    monkeypatch.setattr(gpu, "_nvml", lambda: nv)
    return nv
