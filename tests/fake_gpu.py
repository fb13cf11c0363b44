"""A FAKE GPU layer for serve's GPU-snapshot pipeline on hosts without a GPU (CI).

It stands in for ``serve.gpu_snapshots.DriverGpu`` (the NVIDIA driver's checkpoint API), which
cannot run without a GPU. It moves nothing anywhere: ``suspend`` and ``resume`` only record that
they were called (with the pid and whether that process was alive), and can be told to fail the
way the real ones do (a failed resume kills the process, as ``snapshot.resume`` does). Everything
else in those tests is real: the worker process, CRIU, the casfs store, the HTTP API.
"""

from __future__ import annotations

import os
import signal


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class FakeGpuState:
    """What ``FakeGpu.suspend`` returns (the real one: ``snapshot.Suspended``). Its empty key
    makes the snapshot's compatibility key name no GPU, so it restores on a host without one.
    ``gpus``/``device_bytes``: the fake GPU it was on (with ``FakeGpu(devices=...)``)."""

    def __init__(self, pid: int, gpus: list | None = None, device_bytes: dict | None = None) -> None:
        self.pid = pid
        self.key: dict = {}
        self.gpus = list(gpus or [])
        self.device_bytes = dict(device_bytes or {})

    def to_dict(self) -> dict:
        return {"fake_gpu": True, "gpus": self.gpus, "device_bytes": self.device_bytes, "key": {}}


class FakeGpu:
    """A fake GPU layer (see the module docstring). ``calls``: ("suspend"|"resume", pid, alive)."""

    def __init__(self, *, fail_suspend: bool = False, fail_resume: int = 0, free_bytes: int = 1 << 40,
                 gpus: list[dict] | None = None) -> None:
        self.fail_suspend = fail_suspend
        self.fail_resume = int(fail_resume)  # how many resumes fail (True: one)
        self.free_bytes = free_bytes  # what memory() reports free
        self.calls: list[tuple[str, int, bool]] = []
        # issue 16: fake GPUs (index, name, uuid, memory_free); a suspended process was on the first
        self.gpus = list(gpus or [])
        self.device_maps: list[dict | None] = []  # what each resume was asked to move

    def devices(self) -> list[dict]:
        return [dict(d) for d in self.gpus]

    def suspend(self, pid: int) -> FakeGpuState:
        self.calls.append(("suspend", pid, _alive(pid)))
        if self.fail_suspend:
            raise RuntimeError(f"fake GPU: cuCheckpointProcessLock of pid {pid} timed out")
        on = [{k: self.gpus[0][k] for k in ("index", "name", "uuid")}] if self.gpus else []
        return FakeGpuState(pid, on, {g["uuid"]: 1 << 30 for g in on})

    def resume(self, state: FakeGpuState, device_map: dict | None = None) -> object:
        self.calls.append(("resume", state.pid, _alive(state.pid)))
        self.device_maps.append(device_map)
        if self.fail_resume:
            self.fail_resume -= 1
            os.kill(state.pid, signal.SIGKILL)  # what snapshot.resume does when a restore fails
            raise RuntimeError(f"fake GPU: not enough free memory to resume pid {state.pid}; it was killed")
        return object()

    def state_from(self, stored: dict, pid: int) -> FakeGpuState:
        assert stored.get("fake_gpu"), stored
        return FakeGpuState(pid, stored.get("gpus"), stored.get("device_bytes"))

    def memory(self) -> dict[str, int]:
        return {"used": 0, "free": self.free_bytes}
