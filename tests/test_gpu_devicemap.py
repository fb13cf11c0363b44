"""Restoring a checkpointed process onto another GPU (issue 16): the device map, the arguments the
driver gets, and every refusal, on a host without a GPU.

The map planning (snapshot.devicemap) is pure and tested on its own, with hypothesis for its
invariants. ``resume(..., device_map=...)`` runs against real processes (they are stopped and
continued for real) with a FAKE driver and a FAKE NVML (tests/fake_driver.py says what they do);
the argument structures are cuda-bindings' own, read back from their raw memory as libcuda
reads them. The same calls on two real GPUs are in tests/test_gpu_multi.py (skipped here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshot import compat, devicemap, gpu
from snapshot.devicemap import DeviceMapError

pytest.importorskip("cuda.bindings.driver")
from tests.fake_driver import FakeDriver, FakeGpuDevice, fake_uuid, install, read_restore_args  # noqa: E402

H200 = "NVIDIA H200"
G = [fake_uuid(i) for i in range(4)]


def dev(i: int, name: str = H200, free: int = 100 << 30) -> dict:
    return {"index": i, "name": name, "uuid": G[i], "memory_free": free, "memory_total": 141 << 30}


# -- planning the map (pure) -------------------------------------------------------------------


def test_moving_one_gpu_of_two_becomes_the_swap_the_driver_needs():
    seen = [dev(0), dev(1)]
    assert devicemap.plan(seen, [dev(0), dev(1)], {G[0]: G[1]}) == {G[0]: G[1], G[1]: G[0]}


def test_the_gpus_that_do_not_move_keep_their_gpu_in_a_four_gpu_map():
    seen = [dev(i) for i in range(4)]
    full = devicemap.plan(seen, seen, {G[2]: G[0]})
    assert full == {G[0]: G[2], G[1]: G[1], G[2]: G[0], G[3]: G[3]}
    assert devicemap.describe(full) == f"{G[0][:12]}->{G[2][:12]}, {G[2][:12]}->{G[0][:12]}"


def test_no_request_plans_the_identity():
    seen = [dev(0), dev(1)]
    full = devicemap.plan(seen, seen, None)
    assert devicemap.is_identity(full) and devicemap.describe(full) == "identity"


def test_a_snapshot_from_another_host_maps_onto_this_hosts_gpus_of_the_same_model():
    theirs = [{"index": 0, "name": H200, "uuid": "GPU-11111111-0000-0000-0000-000000000000"},
              {"index": 1, "name": "NVIDIA L4", "uuid": "GPU-22222222-0000-0000-0000-000000000000"}]
    ours = [dev(0, "NVIDIA L4"), dev(1, H200)]
    assert devicemap.plan(theirs, ours, {}) == {theirs[0]["uuid"]: G[1], theirs[1]["uuid"]: G[0]}


@pytest.mark.parametrize("request_, ours, words", [
    ({"GPU-99999999-0000-0000-0000-000000000000": G[1]}, [dev(0), dev(1)], "not a GPU the process used or saw"),
    ({G[0]: "GPU-99999999-0000-0000-0000-000000000000"}, [dev(0), dev(1)], "not a GPU of this host"),
    ({G[0]: G[1]}, [dev(0), dev(1, "NVIDIA L4")], "only onto the same chip"),
    ({G[0]: G[1], G[1]: G[1]}, [dev(0), dev(1)], "two GPUs would be restored onto"),
    ({}, [dev(0)], "no NVIDIA H200 is left"),
])
def test_an_impossible_map_is_refused_with_every_reason(request_, ours, words):
    with pytest.raises(DeviceMapError, match=words) as e:
        devicemap.plan([dev(0), dev(1)], ours, request_)
    assert e.value.problems and all(p for p in e.value.problems)


@st.composite
def hosts(draw):
    models = ["A", "B"]
    seen_n = draw(st.integers(1, 4))
    here_n = draw(st.integers(1, 5))
    seen = [{"index": i, "name": draw(st.sampled_from(models)), "uuid": fake_uuid(i)} for i in range(seen_n)]
    shared = draw(st.booleans())  # the same host (some UUIDs shared) or another one
    here = [{"index": i, "name": draw(st.sampled_from(models)),
             "uuid": fake_uuid(i if shared else 100 + i)} for i in range(here_n)]
    req = {}
    for g in seen:
        if draw(st.booleans()):
            req[g["uuid"]] = draw(st.sampled_from(here))["uuid"]
    return seen, here, req


@settings(max_examples=300, deadline=None)
@given(hosts())
def test_a_planned_map_is_always_a_same_model_injection_that_honours_the_request(case):
    seen, here, req = case
    try:
        full = devicemap.plan(seen, here, req)
    except DeviceMapError as e:
        assert e.problems
        return
    names = {d["uuid"]: d["name"] for d in here}
    assert list(full) == [g["uuid"] for g in seen]  # every GPU the process saw, in its order
    assert len(set(full.values())) == len(full)  # never two onto one
    assert all(names[full[g["uuid"]]] == g["name"] for g in seen)  # same chip
    assert all(full[o] == n for o, n in req.items())  # what was asked for
    for g in seen:  # a GPU that could stay, stays
        if names.get(g["uuid"]) == g["name"] and g["uuid"] not in req.values() and g["uuid"] not in req:
            assert full[g["uuid"]] == g["uuid"]


def test_uuids_become_the_16_bytes_the_driver_compares():
    u = "GPU-eea0d83f-ebcd-ac27-6b3e-bec2a19724e6"
    assert devicemap.uuid_bytes(u).hex() == "eea0d83febcdac276b3ebec2a19724e6"
    for bad, words in (("MIG-eea0d83f-ebcd-ac27-6b3e-bec2a19724e6", "MIG instance"), ("0", "not a GPU UUID"),
                       ("GPU-eea0d83f", "not a GPU UUID")):
        with pytest.raises(DeviceMapError, match=words):
            devicemap.uuid_bytes(bad)


def _started(env: dict) -> subprocess.Popen:
    """A real process that has exec'd (its /proc/PID/environ is its own) and sleeps."""
    p = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"], env=env,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "up\n"
    return p


def _sleeper(env: dict | None = None) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return _started({**base, **(env or {})})


@pytest.mark.parametrize("value, want", [(None, [0, 1, 2]), ("1", [1]), ("2,0", [2, 0]), ("0,-1,1", [0]),
                                         ("", []), (G[1][:12], [1])])
def test_the_gpus_a_process_sees_follow_its_cuda_visible_devices(value, want):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if value is not None:
        env["CUDA_VISIBLE_DEVICES"] = value
    p = _started(env)
    try:
        seen, got_env = devicemap.visible_gpus(p.pid, [dev(0), dev(1), dev(2)])
        assert [d["index"] for d in seen] == want and got_env == value
    finally:
        p.kill()
        p.wait()


# -- the arguments the driver gets (cuda-bindings' own structures) ------------------------------


def test_an_identity_map_passes_no_arguments_and_a_swap_passes_every_pair_in_raw_memory():
    from cuda.bindings import driver

    assert gpu.restore_args(driver, None) is None
    assert gpu.restore_args(driver, {G[0]: G[0], G[1]: G[1]}) is None
    args = gpu.restore_args(driver, {G[0]: G[1], G[1]: G[0]})
    assert read_restore_args(args) == [(G[0], G[1]), (G[1], G[0])]
    assert args.gpuPairsCount == 2


def test_bindings_without_gpu_pairs_refuse_a_move_before_the_driver_is_called():
    import types

    old = types.SimpleNamespace(CUcheckpointRestoreArgs=object)
    assert gpu.restore_args(old, {G[0]: G[0]}) is None  # nothing moves: nothing needed
    with pytest.raises(compat.GpuUnavailable, match="cuda-bindings 13.0"):
        gpu.restore_args(old, {G[0]: G[1], G[1]: G[0]})


# -- resume onto another GPU: real processes, a FAKE driver and NVML ---------------------------


@pytest.fixture
def host(monkeypatch):
    """Two fake H200s and a real process holding 8 GiB on GPU 0 (fake memory)."""
    drv = FakeDriver([FakeGpuDevice(G[0], H200, 141 << 30), FakeGpuDevice(G[1], H200, 141 << 30)])
    install(monkeypatch, drv)
    p = _sleeper()
    drv.add(p.pid, [G[0]], 8 << 30)
    yield drv, p
    _end(p)


def _end(p: subprocess.Popen) -> None:
    """Continue (a fake checkpoint stopped it) and kill a test's process."""
    try:
        os.kill(p.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    p.kill()
    p.wait()


def _state_of(pid: int, want: str = "", wait: float = 5.0) -> str:
    """The process's scheduler state letter (waits up to ``wait`` s for one in ``want``: signals land late)."""
    deadline = time.monotonic() + wait
    while True:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()[0]
        if not want or st in want or time.monotonic() > deadline:
            return st
        time.sleep(0.01)


def test_a_process_suspended_on_gpu_0_resumes_on_gpu_1_with_the_full_map(host):
    drv, p = host
    s = gpu.suspend(p.pid)
    assert s.gpus == [{"index": 0, "name": H200, "uuid": G[0]}] and s.device_bytes == {G[0]: 8 << 30}
    assert [g["uuid"] for g in s.seen] == [G[0], G[1]]
    assert _state_of(p.pid, "T") == "T"  # really stopped while "on the host"
    r = gpu.resume(s, device_map={G[0]: G[1]})
    restores = [c for c in drv.calls if c[0] == "restore"]
    assert restores == [("restore", p.pid, [(G[0], G[1]), (G[1], G[0])])]
    assert r.device_map == {G[0]: G[1], G[1]: G[0]} and r.gpus_after == [G[1]]
    assert gpu.get_state(p.pid) is gpu.ProcessState.RUNNING and _state_of(p.pid, "SR") in "SR"
    assert drv.procs[p.pid].gpus == [G[1]]


def test_resuming_on_the_same_gpu_passes_no_map(host):
    drv, p = host
    r = gpu.resume(gpu.suspend(p.pid), device_map={G[0]: G[0]})
    assert [c for c in drv.calls if c[0] == "restore"] == [("restore", p.pid, None)]
    assert r.device_map == {} and r.gpus_after == []


def test_a_state_stored_and_read_back_keeps_what_a_move_needs(host):
    drv, p = host
    s = gpu.suspend(p.pid)
    back = gpu.Suspended.from_dict(s.to_dict(), p.pid, compat.gpu_devices())
    assert back.seen == s.seen and back.default_map is None  # same host: no map by default
    gpu.resume(back, device_map={G[0]: G[1]})
    assert drv.procs[p.pid].gpus == [G[1]]


def test_a_snapshot_made_on_another_host_resumes_through_a_map_by_index(host):
    drv, p = host
    s = gpu.suspend(p.pid)
    d = s.to_dict()
    theirs = {G[0]: "GPU-11111111-0000-0000-0000-000000000000", G[1]: "GPU-22222222-0000-0000-0000-000000000000"}
    d["gpus"] = [dict(g, uuid=theirs[g["uuid"]]) for g in d["gpus"]]
    d["seen"] = [dict(g, uuid=theirs[g["uuid"]]) for g in d["seen"]]
    d["device_bytes"] = {theirs[k]: v for k, v in d["device_bytes"].items()}
    drv.procs[p.pid].seen = list(theirs.values())  # what this (fake) driver recorded at checkpoint
    drv.procs[p.pid].gpus = [theirs[G[0]]]
    back = gpu.Suspended.from_dict(d, p.pid, compat.gpu_devices())
    assert back.default_map == {theirs[G[0]]: G[0], theirs[G[1]]: G[1]}
    r = gpu.resume(back)
    assert r.device_map == back.default_map and drv.procs[p.pid].gpus == [G[0]]


@pytest.mark.parametrize("setup, words", [
    (lambda drv: setattr(drv.devices[1], "other_used", 135 << 30), "MiB free, the process needs"),
    (lambda drv: setattr(drv.devices[1], "name", "NVIDIA L4"), "only onto the same chip"),
    (lambda drv: setattr(drv, "driver_version", "575.51.03"), "needs NVIDIA driver 580"),
])
def test_a_move_the_target_cannot_take_is_refused_before_the_driver_restores(host, setup, words):
    drv, p = host
    s = gpu.suspend(p.pid)
    version = s.key["driver"]
    setup(drv)
    if drv.driver_version != version:
        s.key["driver"] = drv.driver_version  # only the 580 rule, not "driver changed"
    with pytest.raises(gpu.RestoreFailed, match=words) as e:
        gpu.resume(s, device_map={G[0]: G[1]}, kill_on_failure=False)
    assert not e.value.killed and e.value.problems
    assert not [c for c in drv.calls if c[0] == "restore"]
    assert gpu.get_state(p.pid) is gpu.ProcessState.CHECKPOINTED  # untouched: retry elsewhere
    drv.devices[1].other_used, drv.devices[1].name = 0, H200
    s.key["driver"] = drv.driver_version = version
    gpu.resume(s)  # on its own GPU
    assert drv.procs[p.pid].gpus == [G[0]]


def test_an_unusable_map_kills_the_process_by_default_and_says_why(host):
    drv, p = host
    s = gpu.suspend(p.pid)
    with pytest.raises(gpu.RestoreFailed, match="not a GPU of this host.*killed") as e:
        gpu.resume(s, device_map={G[0]: "GPU-99999999-0000-0000-0000-000000000000"})
    assert e.value.killed
    assert p.wait(timeout=10) == -signal.SIGKILL


def test_a_device_map_for_a_bare_pid_is_refused_without_touching_it(host):
    drv, p = host
    s = gpu.suspend(p.pid)
    with pytest.raises(ValueError, match="needs the Suspended state"):
        gpu.resume(p.pid, device_map={G[0]: G[1]})
    assert gpu.get_state(p.pid) is gpu.ProcessState.CHECKPOINTED
    gpu.resume(s)


def test_the_drivers_invalid_argument_on_a_move_names_the_known_causes(host, monkeypatch):
    drv, p = host
    p2 = _sleeper({"CUDA_VISIBLE_DEVICES": "0"})
    try:
        drv.add(p2.pid, [G[0]], 1 << 30, seen=[G[0]])
        s = gpu.suspend(p2.pid)
        assert s.visible_env == "0" and [g["uuid"] for g in s.seen] == [G[0]]
        drv.fail[("restore", p2.pid)] = "CUDA_ERROR_INVALID_VALUE"
        with pytest.raises(gpu.RestoreFailed, match=r"cuda-checkpoint#35.*CUDA_VISIBLE_DEVICES='0'") as e:
            gpu.resume(s, device_map={G[0]: G[1]})
        assert e.value.killed and e.value.result == "CUDA_ERROR_INVALID_VALUE"
        assert p2.wait(timeout=10) == -signal.SIGKILL
    finally:
        p2.kill()
        p2.wait()


def test_a_restore_that_runs_out_of_memory_on_the_new_gpu_kills_the_process(host):
    drv, p = host
    s = gpu.suspend(p.pid)
    s.device_bytes = {G[0]: 0}  # the pre-check is fooled (e.g. memory taken after it ran) ...
    drv.devices[1].other_used = 135 << 30
    with pytest.raises(gpu.RestoreFailed, match="OUT_OF_MEMORY.*killed") as e:
        gpu.resume(s, device_map={G[0]: G[1]})  # ... the driver's refusal is final (#44): killed
    assert e.value.killed and p.wait(timeout=10) == -signal.SIGKILL


# -- the compatibility key accepts other cards of the same models ------------------------------


def test_a_gpu_key_is_compatible_with_other_cards_of_the_same_models_in_any_order():
    host = compat.host_key()
    rec = {"version": 1, "host": host, "gpu": {"gpus": [{"name": "NVIDIA A100", "uuid": "GPU-a"},
                                                        {"name": H200, "uuid": "GPU-b"}],
                                               "driver": "580.1", "cuda": "13.0"}}
    swapped = {"version": 1, "host": host, "gpu": {"gpus": [{"name": H200, "uuid": "GPU-c"},
                                                            {"name": "NVIDIA A100", "uuid": "GPU-d"},
                                                            {"name": H200, "uuid": "GPU-e"}],
                                                   "driver": "580.1", "cuda": "13.0"}}
    assert compat.compatibility_problems(rec, swapped) == []
    fewer = {"version": 1, "host": host, "gpu": {"gpus": [{"name": H200, "uuid": "GPU-c"}],
                                                 "driver": "580.1", "cuda": "13.0"}}
    (problem,) = compat.compatibility_problems(rec, fewer)
    assert "lacks NVIDIA A100 x1" in problem

