"""The group protocol of snapshot.gpugroup (issue 16): every rank suspended before any is
checkpointed, every rank restored before any is unlocked, and a failure at each step rolled back
or the group killed, never a partial group.

Real processes (stopped and continued for real) with a FAKE driver and NVML (tests/fake_driver.py
says what they do); the tensor-parallel replica that uses this protocol with real gloo
collectives is in tests/test_tp.py, and on two GPUs in tests/test_tp_gpu.py (skipped here).
"""

from __future__ import annotations

import signal

import pytest

pytest.importorskip("cuda.bindings.driver")

from snapshot import gpu, gpugroup  # noqa: E402
from tests.fake_driver import FakeDriver, FakeGpuDevice, fake_uuid, install  # noqa: E402
from tests.test_gpu_devicemap import _end, _sleeper, _state_of  # noqa: E402

H200 = "NVIDIA H200"
G = [fake_uuid(i) for i in range(2)]


@pytest.fixture
def ranks(monkeypatch):
    """Two real processes as the ranks of a group, rank R on fake GPU R (4 GiB each)."""
    drv = FakeDriver([FakeGpuDevice(G[0], H200, 141 << 30), FakeGpuDevice(G[1], H200, 141 << 30)])
    install(monkeypatch, drv)
    ps = [_sleeper(), _sleeper()]
    for r, p in enumerate(ps):
        drv.add(p.pid, [G[r]], 4 << 30)
    yield drv, ps
    for p in ps:
        _end(p)


def ops(drv: FakeDriver) -> list[tuple[str, int]]:
    return [(c[0], c[1]) for c in drv.calls]


def states(drv: FakeDriver, ps: list) -> list[str]:
    return [gpu.get_state(p.pid).name for p in ps]


def test_every_rank_is_locked_before_any_is_checkpointed_and_restored_before_any_is_unlocked(ranks):
    drv, (a, b) = ranks
    g = gpugroup.suspend_group([a.pid, b.pid])
    assert ops(drv) == [("lock", a.pid), ("lock", b.pid), ("checkpoint", a.pid), ("checkpoint", b.pid)]
    assert [m.gpus[0]["uuid"] for m in g.members] == G and [m.device_bytes for m in g.members] == [
        {G[0]: 4 << 30}, {G[1]: 4 << 30}]
    assert [_state_of(p.pid, "T") for p in (a, b)] == ["T", "T"]
    drv.calls.clear()
    r = gpugroup.resume_group(g)
    assert ops(drv) == [("restore", a.pid), ("restore", b.pid), ("unlock", a.pid), ("unlock", b.pid)]
    assert states(drv, [a, b]) == ["RUNNING", "RUNNING"] and len(r.members) == 2
    assert [_state_of(p.pid, "SR") for p in (a, b)] != ["T", "T"]


def test_a_stored_group_reads_back_for_its_restored_pids(ranks):
    drv, (a, b) = ranks
    g = gpugroup.suspend_group([a.pid, b.pid])
    back = gpugroup.SuspendedGroup.from_dict(g.to_dict(), [a.pid, b.pid])
    assert [m.to_dict() for m in back.members] == [m.to_dict() for m in g.members]
    with pytest.raises(ValueError, match="2 ranks, 1 pids"):
        gpugroup.SuspendedGroup.from_dict(g.to_dict(), [a.pid])
    gpugroup.resume_group(back)


def test_a_rank_that_cannot_be_locked_leaves_the_group_running(ranks):
    drv, (a, b) = ranks
    drv.fail[("lock", b.pid)] = "CUDA_ERROR_TIMEOUT"
    with pytest.raises(gpugroup.GroupFailed, match="locking rank 1.*group runs on") as e:
        gpugroup.suspend_group([a.pid, b.pid])
    assert e.value.state == "running" and e.value.rank == 1
    assert ops(drv) == [("lock", a.pid), ("lock", b.pid), ("unlock", a.pid)]
    assert states(drv, [a, b]) == ["RUNNING", "RUNNING"]


def test_a_rank_that_cannot_be_checkpointed_rolls_the_others_back(ranks):
    drv, (a, b) = ranks
    drv.fail[("checkpoint", b.pid)] = "CUDA_ERROR_ILLEGAL_STATE"
    with pytest.raises(gpugroup.GroupFailed, match="checkpointing rank 1.*restored and all unlocked") as e:
        gpugroup.suspend_group([a.pid, b.pid])
    assert e.value.state == "running"
    assert ops(drv)[4:] == [("restore", a.pid), ("unlock", a.pid), ("unlock", b.pid)]
    assert states(drv, [a, b]) == ["RUNNING", "RUNNING"]
    assert [_state_of(p.pid, "SR") for p in (a, b)] != ["T", "T"]  # rank 0 runs again


def test_a_rollback_that_fails_kills_the_whole_group(ranks):
    drv, (a, b) = ranks
    drv.fail[("checkpoint", b.pid)] = "CUDA_ERROR_ILLEGAL_STATE"
    drv.fail[("restore", a.pid)] = "CUDA_ERROR_OUT_OF_MEMORY"
    with pytest.raises(gpugroup.GroupFailed, match="rolling the group back failed.*killed") as e:
        gpugroup.suspend_group([a.pid, b.pid])
    assert e.value.killed
    assert a.wait(timeout=10) == b.wait(timeout=10) == -signal.SIGKILL


def test_a_rank_that_fails_to_restore_takes_the_group_down_by_default(ranks):
    drv, (a, b) = ranks
    g = gpugroup.suspend_group([a.pid, b.pid])
    drv.fail[("restore", b.pid)] = "CUDA_ERROR_OUT_OF_MEMORY"
    with pytest.raises(gpugroup.GroupFailed, match="restoring rank 1.*every rank was killed") as e:
        gpugroup.resume_group(g)
    assert e.value.killed and e.value.result == "CUDA_ERROR_OUT_OF_MEMORY"
    assert ("unlock", a.pid) not in ops(drv)  # rank 0 never ran without its peer
    assert a.wait(timeout=10) == b.wait(timeout=10) == -signal.SIGKILL


def test_without_kill_a_failed_restore_leaves_the_whole_group_checkpointed_for_a_retry(ranks):
    drv, (a, b) = ranks
    g = gpugroup.suspend_group([a.pid, b.pid])
    drv.fail[("restore", b.pid)] = "CUDA_ERROR_UNKNOWN"
    with pytest.raises(gpugroup.GroupFailed, match="CHECKPOINTED for a retry") as e:
        gpugroup.resume_group(g, kill_on_failure=False)
    assert e.value.state == "checkpointed"
    assert states(drv, [a, b]) == ["CHECKPOINTED", "CHECKPOINTED"]  # rank 0 checkpointed again
    gpugroup.resume_group(g)
    assert states(drv, [a, b]) == ["RUNNING", "RUNNING"]


def test_a_rank_that_fails_to_unlock_takes_the_group_down_and_running_ranks_are_suspended_first(ranks):
    drv, (a, b) = ranks
    g = gpugroup.suspend_group([a.pid, b.pid])
    drv.calls.clear()
    drv.fail[("unlock", b.pid)] = "CUDA_ERROR_UNKNOWN"
    with pytest.raises(gpugroup.GroupFailed, match="unlocking rank 1.*killed"):
        gpugroup.resume_group(g)
    # rank 0 ran already: it is locked and checkpointed before the kill (NVIDIA/cuda-checkpoint#53)
    assert ops(drv)[3:] == [("unlock", b.pid), ("lock", a.pid), ("checkpoint", a.pid), ("checkpoint", b.pid)]
    assert a.wait(timeout=10) == b.wait(timeout=10) == -signal.SIGKILL


def test_a_gpu_short_of_memory_for_the_group_is_refused_before_any_restore(ranks):
    drv, (a, b) = ranks
    g = gpugroup.suspend_group([a.pid, b.pid])
    drv.devices[1].other_used = 138 << 30
    with pytest.raises(gpugroup.GroupFailed, match="rank.*need .*MiB") as e:
        gpugroup.resume_group(g, kill_on_failure=False)
    assert e.value.state == "checkpointed" and e.value.problems
    assert not [c for c in drv.calls if c[0] == "restore"]
    drv.devices[1].other_used = 0
    gpugroup.resume_group(g)


def test_a_group_is_not_moved_to_other_gpus_unless_asked_to_try(ranks):
    drv, (a, b) = ranks
    g = gpugroup.suspend_group([a.pid, b.pid])
    with pytest.raises(gpugroup.GroupFailed, match="cuda-checkpoint#48") as e:
        gpugroup.resume_group(g, device_map={G[0]: G[1]}, kill_on_failure=False)
    assert e.value.state == "checkpointed"
    r = gpugroup.resume_group(g, device_map={G[0]: G[1]}, allow_move=True)
    assert [m.device_map for m in r.members] == [{G[0]: G[1], G[1]: G[0]}] * 2
    assert [drv.procs[p.pid].gpus for p in (a, b)] == [[G[1]], [G[0]]]  # the ranks swapped GPUs


def test_a_group_with_a_rank_not_running_is_refused_untouched(ranks):
    drv, (a, b) = ranks
    s = gpu.suspend(b.pid)
    drv.calls.clear()
    with pytest.raises(gpu.CheckpointError, match="CHECKPOINTED, not RUNNING"):
        gpugroup.suspend_group([a.pid, b.pid])
    assert ops(drv) == []
    gpu.resume(s)
    with pytest.raises(ValueError, match="distinct pids"):
        gpugroup.suspend_group([a.pid, a.pid])
