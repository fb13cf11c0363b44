"""Where a GPU snapshot resumes (serve.gpu_placement, issue 16): the choice, and serve's pipeline
carrying it to the GPU layer.

The choice is pure and tested on device lists. The pipeline test restores a real echo replica
with CRIU from a casfs store (as tests/test_serve_gpu_pipeline.py does) through a FAKE GPU layer
(tests/fake_gpu.py, given two fake GPUs), and checks the device map the layer was asked for and
the boot report; on two real GPUs the driver then moves the state (tests/test_gpu_multi.py,
skipped without them).
"""

from __future__ import annotations

import types

import pytest

from serve.gpu_placement import PlacedGpu, choose_device_map, resolve_gpu
from tests.fake_gpu import FakeGpu
from tests.test_serve_gpu_pipeline import _answer, _boot, echo_image  # noqa: F401 (echo_image: a fixture)

U0 = "GPU-00000000-1111-2222-3333-444444444444"
U1 = "GPU-11111111-1111-2222-3333-444444444444"
U2 = "GPU-22222222-1111-2222-3333-444444444444"


def devs(free0: int = 80 << 30, free1: int = 80 << 30, free2: int = 80 << 30, name2: str = "H200") -> list[dict]:
    return [{"index": 0, "name": "H200", "uuid": U0, "memory_free": free0},
            {"index": 1, "name": "H200", "uuid": U1, "memory_free": free1},
            {"index": 2, "name": name2, "uuid": U2, "memory_free": free2}]


STATE = types.SimpleNamespace(gpus=[{"index": 0, "name": "H200", "uuid": U0}], device_bytes={U0: 10 << 30})


def test_a_named_gpu_becomes_a_one_entry_map_and_its_own_gpu_none():
    assert choose_device_map(STATE, devs(), "cuda:1") == {U0: U1}
    assert choose_device_map(STATE, devs(), "2") == {U0: U2}
    assert choose_device_map(STATE, devs(), U1[:12]) == {U0: U1}
    assert choose_device_map(STATE, devs(), "cuda:0") is None
    assert choose_device_map(STATE, devs(), "same") is None


def test_auto_stays_where_there_is_room_and_else_takes_the_freest_gpu_of_the_model():
    assert choose_device_map(STATE, devs(), "auto") is None
    assert choose_device_map(STATE, devs(free0=1 << 30, free1=20 << 30, free2=60 << 30), "auto") == {U0: U2}
    assert choose_device_map(STATE, devs(free0=1 << 30, free1=20 << 30, free2=60 << 30, name2="L4"), "auto") == {U0: U1}
    # nothing fits: no map, so the resume's own free-memory check refuses with the numbers
    assert choose_device_map(STATE, devs(free0=1 << 30, free1=1 << 30, free2=1 << 30), "auto") is None


def test_a_gpu_that_is_not_here_or_an_odd_target_is_refused_in_one_line():
    for bad, words in (("cuda:7", "names no GPU"), ("GPU-9", "names no GPU"), ("GPU-", "more than one"),
                       ("fastest", "expected auto, same")):
        with pytest.raises(ValueError, match=words) as e:
            resolve_gpu(bad, devs())
        assert "\n" not in str(e.value) and U0 in str(e.value)


def test_one_named_gpu_for_a_replica_on_two_is_refused():
    two = types.SimpleNamespace(gpus=STATE.gpus + [{"index": 1, "name": "H200", "uuid": U1}], device_bytes={})
    with pytest.raises(ValueError, match="used 2"):
        choose_device_map(two, devs(), "cuda:2")


def test_a_placed_layer_hands_its_choice_to_the_layer_it_wraps():
    inner = FakeGpu(gpus=devs())
    placed = PlacedGpu(inner, "cuda:1")
    placed.check()
    state = placed.suspend(12345678)  # no such process: the fake records it as dead, which is fine here
    placed.resume(state)
    assert inner.device_maps == [{U0: U1}] and placed.last == {"target": "cuda:1", "device_map": {U0: U1}}
    with pytest.raises(ValueError):
        PlacedGpu(inner, "cuda:9").check()


# -- serve's pipeline (real CRIU, a fake GPU layer) --------------------------------------------


@pytest.mark.slow
def test_a_replica_snapshotted_on_gpu_0_is_resumed_on_gpu_1_when_asked(echo_image):
    rep = _boot(echo_image, FakeGpu(gpus=devs()), create_snapshot=True)
    stored = rep.report.snapshot_create["gpu_state"]
    rep.stop()
    assert [g["uuid"] for g in stored["gpus"]] == [U0]  # the snapshot says where it was made
    gpu = FakeGpu(gpus=devs())
    rep = _boot(echo_image, gpu, restore_gpu="cuda:1")
    try:
        assert rep.report.mode == "restore"
        assert gpu.device_maps == [{U0: U1}]
        assert rep.report.details["gpu_placement"] == {"target": "cuda:1", "device_map": {U0: U1}}
        assert _answer(rep) == "cba"
    finally:
        rep.stop()
    gpu = FakeGpu(gpus=devs(free0=1 << 30))  # its own GPU is full now: auto moves it
    rep = _boot(echo_image, gpu, restore_gpu="auto")
    try:
        assert rep.report.mode == "restore" and gpu.device_maps == [{U0: U1}]
        assert _answer(rep) == "cba"
    finally:
        rep.stop()


@pytest.mark.slow
def test_a_restore_gpu_that_is_not_here_fails_before_anything_starts(echo_image):
    gpu = FakeGpu(gpus=devs())
    with pytest.raises(ValueError, match="cuda:7.*names no GPU"):
        _boot(echo_image, gpu, restore_gpu="cuda:7")
    assert gpu.calls == []

