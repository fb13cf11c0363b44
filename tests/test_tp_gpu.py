"""A tensor-parallel replica on two real GPUs (issue 16): NCCL between the ranks, parked and
unparked with the NVIDIA driver's checkpoint API through snapshot.gpugroup, the output identical
after every unpark.

Skipped cleanly without two GPUs of one model, transformers and cuda-bindings (CI, the one-GPU
H200 machine): NOT YET RUN ANYWHERE (no two-GPU machine was lent; docs/multigpu.md has the
command). The same protocol with gloo and a fake driver runs everywhere in tests/test_tp.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.test_gpu_multi import MODEL, WHY

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is needed", allow_module_level=True)

from serve.tp import TpReplica  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MODEL is None, reason=WHY)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [1, 5, 9, 33, 100, 7]


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp-gpu")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_model.py"), str(d / "model"),
                          "--preset", "tiny"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    t = TpReplica(str(d / "model"), world=2, device="cuda", log_dir=str(d / "logs"), timeout_s=600)
    t.start()
    yield t
    t.stop()


def test_a_two_gpu_replica_parks_off_both_gpus_and_unparks_with_identical_output(tp):
    from snapshot import compat, gpu

    cold = tp.generate(PROMPT, 16)
    devs = compat.gpu_devices()
    where = [gpu.where_listed(pid, devs) for pid in tp.pids]
    assert all(len(w) == 1 for w in where) and where[0] != where[1]  # rank R on its own GPU
    for _ in range(2):
        rep = tp.park()
        assert rep["device_state_bytes"] > 0
        assert [gpu.where_listed(pid, devs) for pid in tp.pids] == [[], []]  # off both GPUs
        back = tp.unpark()
        assert back["process_group_s"] >= 0
        assert [gpu.where_listed(pid, devs) for pid in tp.pids] == where
        out = tp.generate(PROMPT, 16)
        assert (out["tokens"], out["logprobs"]) == (cold["tokens"], cold["logprobs"]), json.dumps([out, cold])
