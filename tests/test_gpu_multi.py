"""Driver checkpoints across GPUs (issue 16), on a host with at least two GPUs of one model.

A real child process captures a CUDA graph on its GPU; it is suspended there and resumed onto
another GPU of the same model through a device map, and its graph must replay with the identical
result; then it moves back. Skipped cleanly on hosts with fewer than two such GPUs (CI, the
one-GPU H200 machine): NOT YET RUN ANYWHERE (no two-GPU machine was lent; docs/multigpu.md has
the command to run them when one is).

The same logic against a fake driver is tested on every host in tests/test_gpu_devicemap.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from snapshot import compat, gpu
from tests.test_gpu import CHILD, NO_GPU, ask


def _pair() -> tuple[str | None, str]:
    if NO_GPU is not None:
        return None, f"needs two NVIDIA GPUs of one model: {NO_GPU}"
    devs = compat.gpu_devices()
    model, n = Counter(d["name"] for d in devs).most_common(1)[0]
    if n < 2:
        return None, f"needs two NVIDIA GPUs of one model; this host has {[d['name'] for d in devs]}"
    return model, ""


MODEL, WHY = _pair()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MODEL is None, reason=WHY)]


@pytest.fixture
def child():
    """The graph-replaying child of tests/test_gpu.py, seeing every GPU (a device map must name
    every GPU the process saw; CUDA_VISIBLE_DEVICES subsets were reported to break remaps)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=env)
    line = p.stdout.readline().split()
    assert line and line[0] == "READY", line
    p.ref = float(line[1])
    yield p
    if p.poll() is None:
        p.kill()
    p.wait(timeout=30)


def _other(uuid: str) -> str:
    return next(d["uuid"] for d in compat.gpu_devices() if d["name"] == MODEL and d["uuid"] != uuid)


def test_a_process_checkpointed_on_one_gpu_replays_its_graph_identically_on_another_and_back(child):
    s = gpu.suspend(child.pid)
    (src,) = [g["uuid"] for g in s.gpus]
    dst = _other(src)
    free_before = {d["uuid"]: d["memory_free"] for d in compat.gpu_devices()}
    r = gpu.resume(s, device_map={src: dst})
    assert r.device_map[src] == dst and r.device_map[dst] == src  # the swap the driver needs
    assert r.gpus_after == [dst], r.gpus_after
    free_after = {d["uuid"]: d["memory_free"] for d in compat.gpu_devices()}
    assert free_before[dst] - free_after[dst] >= 512 << 20  # the child's buffer now lives there
    assert ask(child) == child.ref
    s2 = gpu.suspend(child.pid)
    assert [g["uuid"] for g in s2.gpus] == [dst]
    r2 = gpu.resume(s2, device_map={dst: src})
    assert r2.gpus_after == [src] and ask(child) == child.ref


def test_a_move_the_target_cannot_take_leaves_the_process_checkpointed_and_it_resumes_in_place(child):
    s = gpu.suspend(child.pid)
    (src,) = [g["uuid"] for g in s.gpus]
    dst = _other(src)
    real = s.device_bytes
    s.device_bytes = {src: 1 << 50}  # more than the target has free
    with pytest.raises(gpu.RestoreFailed, match="MiB free") as e:
        gpu.resume(s, device_map={src: dst}, kill_on_failure=False)
    assert not e.value.killed and gpu.get_state(child.pid) is gpu.ProcessState.CHECKPOINTED
    s.device_bytes = real
    gpu.resume(s)
    assert ask(child) == child.ref


def test_a_map_onto_a_missing_gpu_is_refused_before_the_driver_is_called(child):
    s = gpu.suspend(child.pid)
    (src,) = [g["uuid"] for g in s.gpus]
    with pytest.raises(gpu.RestoreFailed, match="not a GPU of this host"):
        gpu.resume(s, device_map={src: "GPU-00000000-0000-0000-0000-000000000000"}, kill_on_failure=False)
    assert gpu.get_state(child.pid) is gpu.ProcessState.CHECKPOINTED
    gpu.resume(s)
    assert ask(child) == child.ref
