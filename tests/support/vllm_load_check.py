"""Load a model into a real vLLM engine (CPU build) and report what it holds and generates.

Run with the vLLM venv's python (tests/test_vllm_loader.py does)::

    python -m tests.support.vllm_load_check --model-dir DIR --out OUT.json
        [--load-format auto|casfs --store URL --image ID [--cache-dir DIR] [--path FILE]]

Writes JSON: ``tokens`` (greedy token ids per prompt), ``weights`` (parameter name -> sha256 of
its bytes, as vLLM holds them after loading), and for the casfs load format ``stats`` (bytes,
chunk reads, per-tier hits of the load).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--store")
    ap.add_argument("--image")
    ap.add_argument("--cache-dir", default="")
    ap.add_argument("--path", default="")
    a = ap.parse_args()
    from serve.engine import VLLM_CPU_ENV, VLLM_FAST_BOOT_ENV

    for k, v in {**VLLM_CPU_ENV, **VLLM_FAST_BOOT_ENV}.items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams

    kw: dict = {}
    loader = None
    if a.load_format == "casfs":
        from serve.vllm_loader import register

        loader = register()
        kw["model_loader_extra_config"] = {"store": a.store, "image": a.image, "cache_dir": a.cache_dir,
                                           "path": a.path}
    llm = LLM(model=a.model_dir, load_format=a.load_format, enforce_eager=True, max_model_len=256, seed=0,
              disable_log_stats=True, **kw)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)

    def digests(model) -> dict:
        import torch

        return {n: hashlib.sha256(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                .hexdigest() for n, p in model.state_dict().items()}

    res = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
           "text": [o.outputs[0].text for o in outs],
           "weights": llm.apply_model(digests)[0]}
    if loader is not None and loader.last_stats is not None:
        st = loader.last_stats
        res["stats"] = {"bytes": st.bytes, "chunks": st.chunks, "tiers": st.tiers}
    with open(a.out, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
