"""vLLM's ``casfs`` load format (serve/vllm_loader.py) in a real vLLM engine (the CPU build in
.venv-vllm) on the tiny random Llama of scripts/make_tiny_model.py.

A "fine-tune" of the tiny model (one tensor retrained, same names and shapes, so the same
header and chunk alignment) is stored next to the base model in one store, in 64 KiB chunks
so the sharing is visible at this size. The ssd tier is filled with the base model's chunks
(as a host that served the base model has it). Then two engines load the fine-tune: vLLM's
own loader from the model directory, and the casfs load format from the store (its model
directory holds config and tokenizer only). They must hold bit-identical weights, generate the
same greedy tokens, and the casfs load must fetch from the blob tier exactly the chunks that
differ from the base model.

These tests need .venv-vllm (scripts/setup_vllm.sh). Without it they fail, unless SKIP_VLLM=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

import casfs
from snapshot import load_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PY = os.path.join(ROOT, os.environ.get("VLLM_VENV", ".venv-vllm"), "bin", "python")
CHUNK = 64 << 10
CHANGED = "model.layers.1.mlp.down_proj.weight"
META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja")

pytestmark = pytest.mark.slow


def _vllm(*args: str, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([VLLM_PY, "-m", "tests.support.vllm_load_check", *args, "--out", out], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    if os.environ.get("SKIP_VLLM") == "1":
        pytest.skip("SKIP_VLLM=1: vLLM is deliberately not installed")
    if not os.path.exists(VLLM_PY):
        pytest.fail(f"{VLLM_PY} is missing: run scripts/setup_vllm.sh (or set SKIP_VLLM=1)")
    d = tmp_path_factory.mktemp("vllm-loader")
    base, tuned, meta = d / "base", d / "tuned", d / "meta"
    subprocess.run([VLLM_PY, os.path.join(ROOT, "scripts", "make_tiny_model.py"), str(base)],
                   check=True, capture_output=True, timeout=300)
    shutil.copytree(base, tuned)
    w = load_file(str(base / "model.safetensors"))
    w[CHANGED] = torch.randn(w[CHANGED].shape, generator=torch.Generator().manual_seed(7)) * 0.05
    save_file(w, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    meta.mkdir()
    for f in META_FILES:
        if (base / f).exists():
            shutil.copy(base / f, meta / f)
    a, b = (base / "model.safetensors").read_bytes(), (tuned / "model.safetensors").read_bytes()
    assert len(a) == len(b)
    changed = sum(a[j:j + CHUNK] != b[j:j + CHUNK] for j in range(0, len(a), CHUNK))
    store, cache = str(d / "store"), str(d / "cache")
    with casfs.open_store(store) as s:
        casfs.build(s, str(base), tag="base", chunk_size=CHUNK, progress=False)
        casfs.build(s, str(tuned), tag="tuned", chunk_size=CHUNK, progress=False)
    with casfs.open_store(store, cache_dir=cache, memory_bytes=0) as s:  # a host that served the base
        load_safetensors(s.open_image("base"), "model.safetensors")
    own = _vllm("--model-dir", str(tuned), out=str(d / "own.json"))
    ours = _vllm("--model-dir", str(meta), "--load-format", "casfs", "--store", store, "--image", "tuned",
                 "--cache-dir", cache, out=str(d / "casfs.json"))
    yield own, ours, changed, len(a)
    shutil.rmtree(d, ignore_errors=True)


def test_the_casfs_load_format_gives_vllm_bit_identical_weights(loaded):
    own, ours, _, _ = loaded
    assert set(ours["weights"]) == set(own["weights"]) and len(own["weights"]) > 10
    assert ours["weights"] == own["weights"]


def test_greedy_output_is_the_same_as_with_vllms_own_loader(loaded):
    own, ours, _, _ = loaded
    assert ours["tokens"] == own["tokens"] and all(len(t) == 12 for t in own["tokens"])


def test_a_fine_tune_of_a_cached_model_fetches_only_the_chunks_that_changed(loaded):
    _, ours, changed, size = loaded
    tiers = ours["stats"]["tiers"]
    assert 0 < changed < size // CHUNK
    assert tiers["blob"]["hits"] == changed
    assert tiers["ssd"]["hits"] == ours["stats"]["chunks"] - changed


def test_bad_extra_config_is_refused_with_the_key_named():
    from serve.vllm_loader import LoaderConfigError, parse_extra_config

    with pytest.raises(LoaderConfigError, match="'store'"):
        parse_extra_config({"image": "x"})
    with pytest.raises(LoaderConfigError, match="unknown keys"):
        parse_extra_config({"store": "s", "image": "x", "chunk": 1})
    with pytest.raises(LoaderConfigError, match="concurrency"):
        parse_extra_config({"store": "s", "image": "x", "concurrency": 0})
    assert parse_extra_config({"store": "s", "image": "x"})["device"] == "auto"
