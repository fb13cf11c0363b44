"""A tensor-parallel replica (serve.tp, issue 16) on a CPU host: two real rank processes of the tiny
Qwen3 (transformers, .venv-vllm's python) split over gloo collectives, parked and unparked with
the group protocol of snapshot.gpugroup.

Real: the ranks, their model shards, the all-reduces, the quiesce (communicators destroyed) and
the rebuild over a fresh rendezvous. FAKE: the driver and NVML (tests/fake_driver.py: a
checkpointed rank is SIGSTOPped, moves no memory). On two GPUs with NCCL and the real driver:
tests/test_tp_gpu.py (skipped without them). Needs .venv-vllm (SKIP_VLLM=1 skips).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytest.importorskip("cuda.bindings.driver")

from serve.tp import NVLS_OFF, TpError, TpReplica  # noqa: E402
from tests.fake_driver import FakeDriver, FakeGpuDevice, fake_uuid, install  # noqa: E402
from tests.test_gpu_devicemap import _state_of  # noqa: E402
from tests.test_serve_transformers import PY, ROOT, _require  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = [1, 5, 9, 33, 100, 7]
G = [fake_uuid(i) for i in range(2)]


BUILD_AND_REFERENCE = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import make_model
make_model.build(sys.argv[1], "tiny")
from serve.tp_worker import generate
from transformers import AutoModelForCausalLM
import torch
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
print(json.dumps(generate(m, json.loads(sys.argv[3]), 12, torch.device("cpu"))))
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model dir, the greedy output of the whole model in one process): built in one process
    (transformers' imports are most of the time here)."""
    _require()
    d = tmp_path_factory.mktemp("tp") / "model"
    out = subprocess.run([PY, "-c", BUILD_AND_REFERENCE, str(d), os.path.join(ROOT, "scripts"), json.dumps(PROMPT)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    return str(d), json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model(built):
    return built[0]


@pytest.fixture(scope="module")
def single(built):
    """The same model unsplit: the tokens a split model must reproduce."""
    return built[1]


@pytest.fixture(scope="module")
def tp(model, tmp_path_factory):
    t = TpReplica(model, world=2, python=PY, log_dir=str(tmp_path_factory.mktemp("tp2")), timeout_s=300)
    t.start()
    yield t
    t.stop()


@pytest.fixture
def driver(monkeypatch, tp):
    """A FAKE driver that knows the replica's ranks (rank R on fake GPU R)."""
    drv = FakeDriver([FakeGpuDevice(G[0], "NVIDIA H200", 141 << 30), FakeGpuDevice(G[1], "NVIDIA H200", 141 << 30)])
    install(monkeypatch, drv)
    for r, pid in enumerate(tp.pids):
        drv.add(pid, [G[r]], 2 << 30)
    return drv


def test_two_ranks_generate_what_one_does_and_run_with_nvlink_multicast_off(tp, single):
    out = tp.generate(PROMPT, 12)
    assert out["tokens"] == single["tokens"]  # the split is right: the same greedy tokens
    # the partial sums are all-reduced, so log-probabilities agree to float32 rounding only
    assert all(abs(float(a) - float(b)) < 1e-4 for a, b in zip(out["logprobs"], single["logprobs"]))
    assert [r["layout"]["heads_per_rank"] for r in tp.ready] == [2, 2]
    for pid in tp.pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(i.split(b"=", 1) for i in f.read().split(b"\0") if b"=" in i)
        assert all(env[k.encode()] == v.encode() for k, v in NVLS_OFF.items())
        assert b"CUDA_VISIBLE_DEVICES" not in env


def test_a_parked_replica_unparks_with_the_same_output_every_time(tp, driver):
    cold = tp.generate(PROMPT, 12)
    for _ in range(2):
        rep = tp.park()
        assert rep["device_state_bytes"] == 2 * (2 << 30)
        assert [_state_of(pid, "T") for pid in tp.pids] == ["T", "T"]  # both ranks stopped
        with pytest.raises(TpError, match="parked"):
            tp.generate(PROMPT, 1)
        back = tp.unpark()
        assert set(back["phases"]) == {"resume", "rebuild"}
        out = tp.generate(PROMPT, 12)
        assert (out["tokens"], out["logprobs"]) == (cold["tokens"], cold["logprobs"])  # exactly
    calls = [(c[0], tp.pids.index(c[1])) for c in driver.calls]
    assert calls[:8] == [("lock", 0), ("lock", 1), ("checkpoint", 0), ("checkpoint", 1),
                         ("restore", 0), ("restore", 1), ("unlock", 0), ("unlock", 1)]


def test_a_park_that_fails_part_way_leaves_the_replica_serving(tp, driver):
    cold = tp.generate(PROMPT, 12)
    driver.fail[("checkpoint", tp.pids[1])] = "CUDA_ERROR_ILLEGAL_STATE"
    with pytest.raises(TpError, match="checkpointing rank 1.*runs on"):
        tp.park()
    assert not tp.parked
    out = tp.generate(PROMPT, 12)  # communicators rebuilt, both ranks running
    assert (out["tokens"], out["logprobs"]) == (cold["tokens"], cold["logprobs"])


def test_an_unpark_that_fails_kills_every_rank_and_says_to_boot_cold(tp, driver):
    tp.park()
    driver.fail[("restore", tp.pids[1])] = "CUDA_ERROR_OUT_OF_MEMORY"
    procs = list(tp.procs)
    with pytest.raises(TpError, match="every rank was killed: boot the group cold"):
        tp.unpark()
    assert [p.wait(timeout=10) for p in procs] == [-9, -9]
