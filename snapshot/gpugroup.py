"""Suspend and resume the GPU state of a group of processes together: the ranks of a
tensor-parallel replica (issue 16).

A tensor-parallel model runs as one process per GPU, and the ranks wait on each other inside
every collective. Checkpointing them one at a time hangs (NVIDIA/cuda-checkpoint#45: a rank of
a running NCCL job cannot be locked while its peers keep launching collectives) or breaks the
restore (#27). The protocol here:

1. **Quiesce** (the application's part, before this module is called): every rank finishes its
   step, meets the others at a barrier and destroys its communicators (``serve.tp``), so no
   rank is inside a collective and no rank holds another GPU's memory (cuda-checkpoint refuses
   processes with cross-GPU state: peer mappings, NVLink SHARP / multicast objects; NVLink
   multicast is off in every rank anyway: ``NCCL_NVLS_ENABLE=0``,
   ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``).
2. **Suspend every rank before checkpointing any**: lock all (a lock that times out unlocks the
   ones already locked: the group runs on untouched), then checkpoint all. A checkpoint that
   fails rolls the group back: the ranks already checkpointed are restored, then every rank is
   unlocked, so the group is either fully suspended or fully running.
3. **Restore every rank before unlocking any**: all pre-checks first (every GPU present, same
   model, the free memory all ranks need on it), then restore all, then unlock all. A failure
   part-way never leaves a partial group: the ranks are killed (by default) or, with
   ``kill_on_failure=False``, the ranks already restored are checkpointed again so the whole
   group is CHECKPOINTED for a retry. Ranks that are already running when the group has to be
   killed are checkpointed again first: killing a live restored process can hang the host on
   some drivers (NVIDIA/cuda-checkpoint#53).
4. **Rebuild** (the application's part): new communicators over a fresh rendezvous.

A group resumes on the GPUs it was made on. A device map that moves a rank is refused unless
``allow_move=True``: after a move each rank's libcuda still reports the old PCI bus ids
(NVIDIA/cuda-checkpoint#48) and NCCL finds GPUs by bus id when it builds the new communicators.

Built and tested on CPU hosts against a fake driver (real processes, real gloo collectives);
not yet run on two GPUs (none was lent): docs/multigpu.md has the command.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from . import devicemap
from .compat import GpuUnavailable, gpu_devices, gpu_key
from .gpu import (DEFAULT_HEADROOM_BYTES, DEFAULT_LOCK_TIMEOUT_S, CheckpointError, DeviceMapError, ProcessState,
                  Resumed, Suspended, checkpoint, get_state, lock, probe, restore, suspended, unlock, where_listed)

__all__ = ["GroupFailed", "GroupResumed", "SuspendedGroup", "resume_group", "suspend_group"]


class GroupFailed(CheckpointError):
    """A group suspend or resume did not complete. ``state`` is where the group was left:
    "running" (rolled back, untouched), "checkpointed" (whole group, retry possible) or
    "killed"; ``problems`` lists failed pre-checks; ``rank`` the rank that failed (or None)."""

    def __init__(self, message: str, pid: int, result: str = "", *, state: str, rank: int | None = None,
                 problems: list[str] | None = None) -> None:
        super().__init__(message, pid, result)
        self.state = state
        self.rank = rank
        self.problems = problems or []

    @property
    def killed(self) -> bool:
        return self.state == "killed"


@dataclass
class SuspendedGroup:
    """Every rank's ``Suspended`` state, in rank order, and the group's timings (seconds)."""

    members: list[Suspended]
    lock_s: float = 0.0
    checkpoint_s: float = 0.0

    @property
    def pids(self) -> list[int]:
        return [m.pid for m in self.members]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, for a snapshot's metadata."""
        return {"members": [m.to_dict() for m in self.members], "lock_s": self.lock_s,
                "checkpoint_s": self.checkpoint_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any], pids: list[int],
                  devices: list[dict[str, Any]] | None = None) -> "SuspendedGroup":
        """The group ``to_dict`` stored, for processes ``pids`` (rank order)."""
        ms = d.get("members") or []
        if len(ms) != len(pids):
            raise ValueError(f"the stored group has {len(ms)} ranks, {len(pids)} pids were given")
        return cls([Suspended.from_dict(m, p, devices) for m, p in zip(ms, pids)], float(d.get("lock_s", 0.0)),
                   float(d.get("checkpoint_s", 0.0)))


@dataclass
class GroupResumed:
    """Timings of a group resume (seconds) and each rank's ``Resumed``."""

    members: list[Resumed] = field(default_factory=list)
    check_s: float = 0.0
    restore_s: float = 0.0
    unlock_s: float = 0.0


def _state(pid: int) -> ProcessState | None:
    try:
        return get_state(pid)
    except CheckpointError:
        return None


def _park_then_kill(pids: list[int]) -> None:
    """Kill every pid; a rank that runs on the GPU is checkpointed first (#53)."""
    for pid in pids:
        st = _state(pid)
        try:
            if st is ProcessState.RUNNING:
                lock(pid, 5.0)
                st = ProcessState.LOCKED
            if st is ProcessState.LOCKED:
                checkpoint(pid)
        except CheckpointError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def suspend_group(pids: list[int], *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> SuspendedGroup:
    """Move the GPU state of every process in ``pids`` (a quiesced group: see the module
    docstring) into its host memory: lock all, then checkpoint all.

    Raises:
        CheckpointError: a process is not RUNNING (nothing was changed).
        GroupFailed: a lock or checkpoint failed; ``state`` says the group was rolled back
            ("running") or, when even the rollback failed, killed ("killed").
        GpuUnavailable: without driver, bindings or NVML (nothing was changed).
    """
    if len(set(pids)) != len(pids) or not pids:
        raise ValueError(f"a group needs distinct pids, got {pids}")
    probes = [probe(p) for p in pids]
    used = {d["uuid"] for p in probes for d in p.used}
    free_before = {d["uuid"]: d["memory_free"] for d in gpu_devices() if d["uuid"] in used}
    t0 = time.perf_counter()
    locked: list[int] = []
    for rank, pid in enumerate(pids):
        try:
            lock(pid, lock_timeout_s)
        except CheckpointError as e:
            back = _unlock_all(locked)
            back += [f"pid {p} is left {_state(p)}" for p in locked if not back and _state(p) is not ProcessState.RUNNING]
            if back:
                _park_then_kill(pids)
                raise GroupFailed(f"locking rank {rank} (pid {pid}) failed: {e.result or e}; unlocking the others "
                                  f"failed too ({'; '.join(back)}): the group was killed", pid, e.result,
                                  state="killed", rank=rank) from None
            raise GroupFailed(f"locking rank {rank} (pid {pid}) failed: {e.result or e}; the ranks locked before "
                              f"it were unlocked: the group runs on", pid, e.result, state="running", rank=rank) from None
        locked.append(pid)
    t1 = time.perf_counter()
    done: list[int] = []
    for rank, pid in enumerate(pids):
        try:
            checkpoint(pid)
        except CheckpointError as e:
            back = _restore_all(done) + _unlock_all(pids)
            back += [f"pid {p} is left {_state(p)}" for p in pids if not back and _state(p) is not ProcessState.RUNNING]
            if back:
                _park_then_kill(pids)
                raise GroupFailed(f"checkpointing rank {rank} (pid {pid}) failed: {e.result or e}; rolling the "
                                  f"group back failed ({'; '.join(back)}): the group was killed", pid, e.result,
                                  state="killed", rank=rank) from None
            raise GroupFailed(f"checkpointing rank {rank} (pid {pid}) failed: {e.result or e}; the ranks "
                              f"checkpointed before it were restored and all unlocked: the group runs on", pid,
                              e.result, state="running", rank=rank) from None
        done.append(pid)
    t2 = time.perf_counter()
    free_after = {d["uuid"]: d["memory_free"] for d in gpu_devices() if d["uuid"] in used}
    sharers = {u: sum(1 for p in probes if any(d["uuid"] == u for d in p.used)) for u in used}
    freed = {u: max(0, free_after.get(u, 0) - free_before.get(u, 0)) // max(1, sharers[u]) for u in used}
    return SuspendedGroup([suspended(p, freed, t1 - t0, t2 - t1) for p in probes], lock_s=t1 - t0,
                          checkpoint_s=t2 - t1)


def _unlock_all(pids: list[int]) -> list[str]:
    """Unlock every LOCKED pid; the failures, one line each."""
    bad = []
    for pid in pids:
        try:
            if _state(pid) is ProcessState.LOCKED:
                unlock(pid)
        except CheckpointError as e:
            bad.append(f"unlock of pid {pid}: {e.result or e}")
    return bad


def _restore_all(pids: list[int], maps: dict[int, dict[str, str] | None] | None = None) -> list[str]:
    bad = []
    for pid in pids:
        try:
            restore(pid, (maps or {}).get(pid))
        except (CheckpointError, GpuUnavailable, DeviceMapError) as e:
            bad.append(f"restore of pid {pid}: {getattr(e, 'result', '') or e}")
    return bad


def group_problems(group: SuspendedGroup, devs: list[dict[str, Any]], key: dict[str, Any],
                   maps: dict[int, dict[str, str] | None], headroom_bytes: int = DEFAULT_HEADROOM_BYTES) -> list[str]:
    """Why ``group`` cannot be restored on ``devs``: each rank's GPU gone or of another model,
    a GPU without the free memory all ranks restored onto it need (one headroom per GPU), a
    changed driver or CUDA version."""
    problems: list[str] = []
    by_uuid = {d["uuid"]: d for d in devs}
    need_on: dict[str, int] = {}
    for rank, m in enumerate(group.members):
        for g in m.gpus:
            target = (maps.get(m.pid) or {}).get(g["uuid"], g["uuid"])
            cur = by_uuid.get(target)
            if cur is None:
                problems.append(f"rank {rank}: GPU {target} ({g['name']}) is not on this host")
                continue
            if cur["name"] != g["name"]:
                problems.append(f"rank {rank}: GPU {target} is a {cur['name']}, the rank used a {g['name']}")
            need_on[target] = need_on.get(target, 0) + m.device_bytes.get(g["uuid"], 0)
    for target, need in need_on.items():
        free = by_uuid[target]["memory_free"]
        if free < need + headroom_bytes:
            problems.append(f"GPU {target} has {free >> 20} MiB free, the group's ranks on it need "
                            f"{(need + headroom_bytes) >> 20} MiB")
    ref = group.members[0].key if group.members else {}
    for f in ("driver", "cuda"):
        if ref.get(f) != key.get(f):
            problems.append(f"{f} version changed: {ref.get(f)} -> {key.get(f)}")
    return problems


def resume_group(group: SuspendedGroup, *, kill_on_failure: bool = True,
                 headroom_bytes: int = DEFAULT_HEADROOM_BYTES, device_map: dict[str, str] | None = None,
                 allow_move: bool = False) -> GroupResumed:
    """Restore every rank's GPU state, then unlock every rank (see the module docstring).

    Args:
        group: what ``suspend_group`` returned (or ``SuspendedGroup.from_dict``).
        kill_on_failure: kill every rank when a check or a restore fails (default); False
            leaves the whole group CHECKPOINTED (ranks already restored are checkpointed again).
        headroom_bytes: free device memory required on each GPU beyond what the ranks need.
        device_map: old UUID -> new UUID for GPUs that move; refused unless ``allow_move``
            (NVIDIA/cuda-checkpoint#48), completed per rank as ``snapshot.gpu.resume`` does.

    Raises:
        CheckpointError: a rank was not CHECKPOINTED (nothing was changed).
        GroupFailed: pre-checks failed or the driver refused; ``state`` says where the group is.
        GpuUnavailable: without driver, bindings or NVML (nothing was changed).
    """
    pids = group.pids
    t0 = time.perf_counter()
    for rank, pid in enumerate(pids):
        st = get_state(pid)
        if st is not ProcessState.CHECKPOINTED:
            raise CheckpointError(f"rank {rank} (pid {pid}) is {st.name}, not CHECKPOINTED: nothing to resume", pid)

    def fail(message: str, pid: int, result: str = "", rank: int | None = None,
             problems: list[str] | None = None, restored: list[int] | None = None) -> GroupFailed:
        if kill_on_failure:
            _park_then_kill(pids)
            return GroupFailed(message + "; every rank was killed: boot the group cold", pid, result,
                               state="killed", rank=rank, problems=problems)
        again = []
        for p in restored or []:
            try:
                checkpoint(p)
            except CheckpointError as e:
                again.append(f"pid {p}: {e.result or e}")
        if again:
            _park_then_kill(pids)
            return GroupFailed(message + f"; checkpointing the restored ranks again failed ({'; '.join(again)}): "
                               "every rank was killed", pid, result, state="killed", rank=rank, problems=problems)
        return GroupFailed(message + "; the whole group is CHECKPOINTED for a retry", pid, result,
                           state="checkpointed", rank=rank, problems=problems)

    try:
        devs = gpu_devices()
        key = gpu_key()
    except GpuUnavailable as e:
        raise fail(f"cannot resume the group: {e}", pids[0], problems=[str(e)]) from None
    maps: dict[int, dict[str, str] | None] = {}
    try:
        for m in group.members:
            requested = device_map if device_map is not None else m.default_map
            if requested is not None:
                want = {o: n for o, n in requested.items() if o in {g["uuid"] for g in m.seen_gpus()}}
                full = devicemap.plan(m.seen_gpus(), devs, want)
                maps[m.pid] = None if devicemap.is_identity(full) else full
    except DeviceMapError as e:
        raise fail(f"cannot resume the group: {e}", pids[0], problems=e.problems) from None
    moved = [f"rank {r}: {devicemap.describe(maps[p])}" for r, p in enumerate(pids) if maps.get(p)]
    problems = group_problems(group, devs, key, maps, headroom_bytes)
    if moved and not allow_move:
        problems.append("a tensor-parallel group resumes only on the GPUs it was made on (" + "; ".join(moved)
                        + "): after a move each rank's libcuda reports the old PCI bus ids and NCCL finds GPUs "
                        "by bus id (NVIDIA/cuda-checkpoint#48); allow_move=True to try anyway")
    if problems:
        raise fail("cannot resume the group: " + "; ".join(problems), pids[0], problems=problems)
    t1 = time.perf_counter()
    restored: list[int] = []
    per: dict[int, float] = {}
    for rank, pid in enumerate(pids):
        ts = time.perf_counter()
        try:
            restore(pid, maps.get(pid))
        except (CheckpointError, GpuUnavailable, DeviceMapError) as e:
            result = getattr(e, "result", "")
            raise fail(f"restoring rank {rank} (pid {pid}) failed: {result or e}", pid, result, rank,
                       restored=restored) from None
        per[pid] = time.perf_counter() - ts
        restored.append(pid)
    t2 = time.perf_counter()
    for rank, pid in enumerate(pids):
        try:
            unlock(pid)
        except CheckpointError as e:  # some ranks may already run: never leave a partial group
            _park_then_kill(pids)
            raise GroupFailed(f"unlocking rank {rank} (pid {pid}) failed: {e.result or e}; every rank was killed: "
                              f"boot the group cold", pid, e.result, state="killed", rank=rank) from None
    t3 = time.perf_counter()
    members = [Resumed(pid, restore_s=per[pid], device_map=dict(maps.get(pid) or {}),
                       gpus_after=where_listed(pid, devs) if maps.get(pid) else []) for pid in pids]
    return GroupResumed(members, check_s=t1 - t0, restore_s=t2 - t1, unlock_s=t3 - t2)
