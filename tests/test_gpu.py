"""snapshot.gpu and snapshot.compat: driver checkpoints and compatibility keys.

The checkpoint tests run a real child process that holds device memory and a captured CUDA
graph, and suspend/resume it through the driver; they are skipped where there is no GPU (CI).
The compatibility rules are tested on keys read from this host and edited copies of them.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from snapshot import compat, gpu


def _gpu_reason() -> str | None:
    try:
        compat.gpu_devices()
        gpu._driver()
    except compat.GpuUnavailable as e:
        return str(e)
    return None


NO_GPU = _gpu_reason()
needs_gpu = pytest.mark.skipif(NO_GPU is not None, reason=f"needs an NVIDIA GPU: {NO_GPU}")


# -- compatibility keys (any host) ------------------------------------------------------------


def test_the_host_key_names_architecture_cpu_flags_and_kernel():
    k = compat.host_key()
    assert k["arch"] == os.uname().machine and k["kernel"] == os.uname().release
    assert k["cpu_flags"] == sorted(set(k["cpu_flags"]))
    if os.path.exists("/proc/cpuinfo") and k["arch"] == "x86_64":
        assert "sse2" in k["cpu_flags"]


def test_a_snapshot_restores_on_the_host_that_made_it():
    key = compat.snapshot_key(gpu=NO_GPU is None)
    assert compat.compatibility_problems(key, key) == []
    compat.check_compatible(key)


GPU_KEY = {"gpus": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-1", "memory_total": 80 << 30}],
           "driver": "580.159.04", "cuda": "13.0"}


def test_missing_cpu_flags_architecture_gpu_model_and_driver_each_make_a_problem():
    rec = {"version": 1, "host": compat.host_key(), "gpu": GPU_KEY}
    cur = copy.deepcopy(rec)
    cur["host"]["cpu_flags"] = [f for f in cur["host"]["cpu_flags"] if f not in ("avx2", "sse2")]
    cur["host"]["arch"] = "aarch64"
    cur["host"]["kernel"] = "1.0"  # recorded, never a problem
    cur["gpu"]["gpus"][0]["name"] = "NVIDIA H200"
    cur["gpu"]["gpus"][0]["uuid"] = "GPU-2"  # another card of the model would be fine
    cur["gpu"]["driver"] = "575.1"
    problems = compat.compatibility_problems(rec, cur)
    text = "\n".join(problems)
    assert "architecture" in text and "GPU models" in text and "driver" in text
    if "sse2" in rec["host"]["cpu_flags"]:
        assert "lacks flags" in text and "sse2" in text
    assert "kernel" not in text
    with pytest.raises(compat.IncompatibleHost) as e:
        compat.check_compatible(rec, cur)
    assert e.value.problems == problems


def test_a_gpu_snapshot_cannot_restore_on_a_host_without_a_gpu():
    rec = {"version": 1, "host": compat.host_key(), "gpu": GPU_KEY}
    cur = {"version": 1, "host": compat.host_key(), "gpu": None}
    assert compat.compatibility_problems(rec, cur) == ["the snapshot holds GPU state but this host has no GPU"]


def test_restore_prechecks_name_a_gone_gpu_a_new_model_short_memory_and_a_new_driver():
    s = gpu.Suspended(pid=1, gpus=[{"index": 0, "name": "A", "uuid": "GPU-a"},
                                   {"index": 1, "name": "B", "uuid": "GPU-b"}],
                      device_bytes={"GPU-a": 10 << 30, "GPU-b": 1 << 30},
                      key={"driver": "580", "cuda": "13.0"})
    devs = [{"index": 0, "name": "A", "uuid": "GPU-a", "memory_free": 4 << 30},
            {"index": 1, "name": "C", "uuid": "GPU-c", "memory_free": 80 << 30}]
    problems = gpu.restore_problems(s, devs, {"driver": "581", "cuda": "13.0"})
    assert len(problems) == 3
    assert "MiB free" in problems[0] and "GPU-b" in problems[1] and "driver" in problems[2]
    ok = [{"index": 0, "name": "A", "uuid": "GPU-a", "memory_free": 11 << 30},
          {"index": 1, "name": "B", "uuid": "GPU-b", "memory_free": 2 << 30}]
    assert gpu.restore_problems(s, ok, {"driver": "580", "cuda": "13.0"}) == []


@pytest.mark.skipif(NO_GPU is None, reason="this host has a GPU")
def test_without_a_gpu_every_checkpoint_call_raises_gpu_unavailable():
    for call in (lambda: gpu.get_state(os.getpid()), lambda: gpu.suspend(os.getpid()),
                 lambda: gpu.resume(os.getpid()), compat.gpu_key):
        with pytest.raises(compat.GpuUnavailable):
            call()


# -- driver checkpoints (GPU only) ------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, torch
    torch.manual_seed(0)
    x = torch.randn(2048, 2048, device="cuda")
    w = torch.randn(2048, 2048, device="cuda")
    hold = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")  # device state to move
    y = torch.empty_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            torch.mm(x, w, out=y)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        torch.mm(x, w, out=y)
    def run():
        y.zero_()
        g.replay()
        torch.cuda.synchronize()
        return y.double().sum().item()
    print("READY", repr(run()), flush=True)
    for line in sys.stdin:
        print("OUT", repr(run()), flush=True)
""")


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    line = p.stdout.readline().split()
    assert line and line[0] == "READY", line
    p.ref = float(line[1])
    yield p
    if p.poll() is None:
        p.kill()
    p.wait(timeout=30)


def ask(p) -> float:
    p.stdin.write("go\n")
    p.stdin.flush()
    line = p.stdout.readline().split()
    assert line and line[0] == "OUT", line
    return float(line[1])


@needs_gpu
def test_suspend_frees_the_gpu_and_resume_replays_the_graph_identically(child):
    assert gpu.get_state(child.pid) is gpu.ProcessState.RUNNING
    s = gpu.suspend(child.pid)
    assert gpu.get_state(child.pid) is gpu.ProcessState.CHECKPOINTED
    assert s.total_device_bytes >= 512 << 20  # at least the buffer it held came off the GPU
    assert s.key["driver"] and s.gpus
    r = gpu.resume(s)
    assert gpu.get_state(child.pid) is gpu.ProcessState.RUNNING
    assert r.restore_s > 0
    assert ask(child) == child.ref


@needs_gpu
def test_a_resume_whose_gpu_is_gone_kills_the_process_and_says_so(child):
    s = gpu.suspend(child.pid)
    s.gpus = [dict(g, uuid="GPU-00000000-0000-0000-0000-000000000000") for g in s.gpus]
    with pytest.raises(gpu.RestoreFailed, match="is gone.*killed") as e:
        gpu.resume(s)
    assert e.value.killed
    assert child.wait(timeout=30) == -signal.SIGKILL


@needs_gpu
def test_a_refused_resume_can_leave_the_process_checkpointed_for_a_retry(child):
    s = gpu.suspend(child.pid)
    need = s.device_bytes
    s.device_bytes = {u: 1 << 50 for u in need}  # more than any GPU has free
    with pytest.raises(gpu.RestoreFailed, match="MiB free") as e:
        gpu.resume(s, kill_on_failure=False)
    assert not e.value.killed
    assert gpu.get_state(child.pid) is gpu.ProcessState.CHECKPOINTED
    s.device_bytes = need
    gpu.resume(s)
    assert ask(child) == child.ref


@needs_gpu
def test_suspending_a_process_twice_is_refused_without_harm(child):
    s = gpu.suspend(child.pid)
    with pytest.raises(gpu.CheckpointError, match="CHECKPOINTED, not RUNNING"):
        gpu.suspend(child.pid)
    gpu.resume(s)
    with pytest.raises(gpu.CheckpointError, match="not CHECKPOINTED"):
        gpu.resume(child.pid)
    assert ask(child) == child.ref
