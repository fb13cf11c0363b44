"""GPU replicas on a real GPU: CUDA regions, the transformers engine with CUDA graphs, and a GPU
snapshot made and restored through serve's pipeline with the NVIDIA driver and CRIU.

Skipped cleanly without a GPU (CI). On the H200 machine they ran in the probe call recorded in
docs/benchmarks.md (CRIU carried: CASFS_CRIU). The model is the tiny Qwen3 of
scripts/make_model.py (float32), built in the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import urllib.request

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here", allow_module_level=True)
if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("cuda") is None:
    pytest.skip("transformers and cuda-bindings are needed", allow_module_level=True)

import casfs  # noqa: E402
import snapshot  # noqa: E402

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Hello, my name is", "The quick brown fox jumps over the lazy dog and", "a"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_model

    d = tmp_path_factory.mktemp("gpu-replica")
    make_model.build(str(d / "model"), "tiny")
    with casfs.open_store(str(d / "store")) as store:
        casfs.build(store, str(d / "model"), tag="qwen3-tiny", chunk_size=16 << 20, progress=False)
    return d


def _free() -> int:
    return torch.cuda.mem_get_info()[0]


def test_a_cuda_region_frees_its_memory_and_maps_back_at_the_same_address():
    r = snapshot.allocate_region(1 << 30, "cuda")
    t = r.tensor(0, (1 << 28,), torch.float32)
    t.fill_(3.0)
    addr = t.data_ptr()
    before = _free()
    assert r.release() == r.nbytes
    assert _free() - before >= (1 << 30) - (64 << 20)
    r.remap()
    assert t.data_ptr() == addr == r.address
    t.fill_(2.0)
    assert float(t[12345]) == 2.0
    r.close()


def _greedy_reference(model_dir: str, n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    m = AutoModelForCausalLM.from_pretrained(model_dir).cuda().eval()
    out = []
    for p in PROMPTS:
        ids = tok.encode(p)
        g = m.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
        out.append(g[0][len(ids):].tolist())
    del m
    torch.cuda.empty_cache()
    return out


def test_the_engine_replays_cuda_graphs_matches_generate_and_survives_a_device_release(tiny):
    import asyncio

    from serve.engine import SamplingSettings
    from serve.hf_engine import TransformersEngine, TransformersOptions
    from serve.hf_model import WeightsSource

    ref = _greedy_reference(str(tiny / "model"), 10)
    eng = TransformersEngine.start(str(tiny / "model"), "tiny", TransformersOptions(compile=False, max_model_len=128),
                                   WeightsSource(str(tiny / "store"), "qwen3-tiny", "model.safetensors"))
    assert eng.config_summary["graph_batch_sizes"] == [2, 4, 8] and len(eng._decoder.graphs) == 3

    async def run(p):
        out = []
        async for d in eng.generate(p, eng.encode(p), SamplingSettings(max_tokens=10, temperature=0.0)):
            out += d.token_ids
        return out

    async def all_at_once():
        return await asyncio.gather(*[run(p) for p in PROMPTS])

    assert asyncio.run(all_at_once()) == ref
    before = _free()
    freed = eng.release_device()
    assert freed["weights_bytes"] > 0 and _free() - before >= freed["weights_bytes"] + freed["kv_cache_bytes"] - (64 << 20)
    back = eng.restore_device()
    assert back["weights_bytes"] > 0
    assert [asyncio.run(run(p)) for p in PROMPTS] == ref  # the same graphs, at the same addresses
    asyncio.run(eng.close())


def _listen() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _complete(listen: str) -> dict:
    body = json.dumps({"model": "qwen3-tiny", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0,
                       "logprobs": 3}).encode()
    req = urllib.request.Request(f"http://{listen}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        c = json.load(r)["choices"][0]
    return {"text": c["text"], "logprobs": c["logprobs"]}


def test_a_gpu_snapshot_made_and_restored_with_the_driver_serves_identical_tokens_and_logprobs(tiny, monkeypatch):
    from serve.boot import BootConfig, boot_replica
    from serve.snapshots import SnapshotUnavailable, open_backend

    try:
        open_backend()
    except SnapshotUnavailable as e:
        pytest.skip(f"no CRIU here: {e}")
    monkeypatch.setenv("CASFS_SNAPSHOT_CACHE", str(tiny / "snapcache"))
    common = dict(image="qwen3-tiny", store=str(tiny / "store"), engine="transformers", eager=True,
                  workdir=str(tiny / "work"), max_model_len=128, snapshot="tiny-gpu")
    cold = boot_replica(BootConfig(listen=_listen(), **{**common, "snapshot": None}))
    try:
        want = _complete(cold.listen)
    finally:
        cold.stop()
    rep = boot_replica(BootConfig(listen=_listen(), create_snapshot=True, **common))
    try:
        r = rep.report
        assert r.details["gpu_snapshot"] is True and "snapshot_failed" not in r.details, r.details.get("snapshot_failed")
        assert r.snapshot_create["gpu_state"]["device_bytes"]
        made = _complete(rep.listen)
        assert made == want  # the first restore serves what the cold replica served
    finally:
        rep.stop()
    rep = boot_replica(BootConfig(listen=_listen(), **common))
    try:
        r = rep.report
        assert r.mode == "restore", r.details
        assert r.details["restore"]["timings"]["gpu_resume"] > 0
        assert r.details["worker"]["after_restore"]["weights_bytes"] > 0
        assert _complete(rep.listen) == made
    finally:
        rep.stop()


def test_a_parked_replica_holds_no_gpu_memory_and_unparks_with_identical_output(tiny):
    from serve.boot import BootConfig, boot_replica
    from serve.gpu_snapshots import DriverGpu
    from serve.pool import ParkedReplica, Reservations, _weights_of, park, shared_weights, unpark

    gpu = DriverGpu()
    rep = boot_replica(BootConfig(image="qwen3-tiny", listen=_listen(), store=str(tiny / "store"), engine="transformers",
                                  eager=True, workdir=str(tiny / "work"), max_model_len=128))
    hw = shared_weights(_weights_of(rep), gpu)
    try:
        want = _complete(rep.listen)
        p = ParkedReplica(rep, weights=_weights_of(rep))
        for shared, pin in ((None, None), (hw, "unpark"), (hw, "unpark"), (hw, "always"), (hw, "always")):
            p.shared = {**shared.spec(), "pin": pin} if shared is not None else None
            pr = park(p, gpu)
            assert pr["process_gpu_bytes_while_parked"] in (0, None), pr
            assert pr["gpu_memory_after"]["free"] > pr["gpu_memory_before"]["free"]
            ur = unpark(p, gpu, Reservations(gpu), model="qwen3-tiny")
            assert ur["phases"]["first_token"] > 0
            if shared is not None:  # every weight byte came from the shared pinned copy
                sw = ur["shared_weights"]
                assert "error" not in sw and sw["pinned_bytes"] >= ur["weights_bytes_copied"] > 0, sw
            assert _complete(rep.listen) == want
    finally:
        rep.stop()
        hw.close()


def test_shared_chunks_registered_read_only_feed_a_gpu_load_bit_exact(tmp_path):
    from safetensors.torch import save_file

    from serve.gpu_snapshots import DriverGpu

    src = tmp_path / "m"
    src.mkdir()
    g = torch.Generator().manual_seed(3)
    want = {"a": torch.randn(4096, 4096, generator=g).to(torch.bfloat16), "b": torch.randn(1000, generator=g)}
    save_file(want, str(src / "model.safetensors"))
    with casfs.open_store(str(tmp_path / "store")) as store:
        casfs.build(store, str(src), tag="m", progress=False)
        image = store.open_image("m")
        sealed = DriverGpu().host_register_read_only()
        with casfs.SharedChunks.create(image, ["model.safetensors"], seal_writes=sealed) as owner, \
                casfs.SharedChunks.attach(owner.spec()) as mine:
            assert mine.register() >= 0 and mine.registered
            tier = casfs.PinnedTier(64 << 10, allocator=casfs.plain_memory)
            mine.lend_to(tier)
            stats = snapshot.LoadStats()
            got = snapshot.load_safetensors(image, "model.safetensors", device="cuda", pinned=tier, stats=stats)
            assert all(torch.equal(got[k].cpu(), want[k]) for k in want)
            assert stats.pinned_bytes == stats.chunk_bytes > 0
            del got
            tier.free()
            mine.unregister()
