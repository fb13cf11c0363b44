#!/usr/bin/env python3
"""Build a Qwen3-shaped model directory with random weights, no hub access, and pack it into casfs.

Presets (shapes of the real models; weights random, seeded, so the same arguments give the same
bytes and the same greedy completions):

    tiny   vocab 1024, hidden 64, 2 layers, 4 heads (2 KV), float32     ~0.6 MB  (tests, CPU)
    0.6b   Qwen3-0.6B: vocab 151936, hidden 1024, 28 layers, 16/8 heads, bf16, tied   1.19 GB
    8b     Qwen3-8B:   vocab 151936, hidden 4096, 36 layers, 32/8 heads, bf16      16.4 GB

The directory holds ``config.json``, ``generation_config.json``, the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, with a chat template) and ``model.safetensors``
(or shards of at most ``--shard-gib`` with ``model.safetensors.index.json``), laid out as
``save_pretrained`` lays them out. The tokenizer is a byte-level BPE whose merges are generated
here (deterministically) until it has exactly the config's vocabulary size, so every token id a
random model can emit decodes to text.

Weights are drawn on the GPU when there is one (an 8b model in seconds; on the CPU it takes
minutes) and written tensor by tensor. With ``--store`` the directory is built into a casfs
image (``--tag``) with 16 MiB chunks (the streaming loader's best size) and, unless
``--keep``, removed afterwards.

Needs torch, transformers, tokenizers and safetensors (the vLLM venv has them on CPU hosts):
    .venv-vllm/bin/python scripts/make_model.py OUT --preset tiny [--store DIR --tag NAME]
Prints one JSON line: the path, parameters, bytes, and the casfs image id when packed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

PRESETS: dict[str, dict] = {
    # the tiny model's weights are large (init_std) so attention and position matter and
    # greedy outputs vary from token to token: a test that compares outputs can then fail
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                 rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="float32",
                 init_std=0.25),
    # CPU measurements that need weights large enough to see in host memory (~230 MB, float32)
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
                  rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="float32"),
    "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, dtype="bfloat16"),
    "8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
               rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="bfloat16"),
}


def make_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE of exactly ``vocab_size`` tokens (specials included), merges generated here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = ("the a of to in and is for on with as at by from model token cache boot snapshot "
             "restore replica serve fast cold warm hello world quick brown fox jumps over lazy dog").split()
    vocab = {t: i for i, t in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    want = vocab_size - len(SPECIAL_TOKENS)

    def add(a: str, b: str) -> None:
        if a + b not in vocab and len(vocab) < want:
            vocab[a + b] = len(vocab)
            merges.append((a, b))

    for w in words:  # common words become single tokens (with and without the leading space)
        for form in (w, "Ġ" + w):
            cur = form[0]
            for ch in form[1:]:
                add(cur, ch)
                cur += ch
    short = [t for t in vocab if len(t) <= 6]  # pieces of new tokens: a token is at most 12 characters
    x = seed * 7919 + 12345
    while len(vocab) < want:
        x = (6364136223846793005 * x + 1442695040888963407) % (1 << 64)
        a, b = short[(x >> 20) % len(short)], short[(x >> 40) % len(short)]
        if a + b not in vocab:
            add(a, b)
            if len(a) + len(b) <= 6:
                short.append(a + b)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def _tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor save_pretrained writes, from a meta-device model."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()
            if not (config.tie_word_embeddings and name == "lm_head.weight")]


def write_weights(out: str, config, seed: int, shard_bytes: int, std: float) -> tuple[int, int]:
    """Random weights as safetensors shards (with an index when more than one). Returns
    (parameters, bytes)."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, config.dtype if isinstance(config.dtype, str) else str(config.dtype).split(".")[-1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    specs = _tensor_specs(config)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    params = total = 0
    for name, shape in specs:
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * std).to(dtype).cpu()
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
        params += t.numel()
        total += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, sh in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, os.path.join(out, fname), metadata=meta)
            weight_map.update({k: fname for k in sh})
            sh.clear()
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return params, total


def build(out: str, preset: str, *, seed: int = 0, shard_gib: float = 5.0, max_len: int | None = None) -> dict:
    """Write the model directory ``out`` (must not exist). Returns a summary dict."""
    from transformers import GenerationConfig, Qwen3Config

    p = dict(PRESETS[preset])
    dtype = p.pop("dtype")
    std = p.pop("init_std", 0.02)
    if max_len:
        p["max_position_embeddings"] = max_len
    tokenizer = make_tokenizer(p["vocab_size"], seed)
    config = Qwen3Config(**p, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    config.dtype = dtype
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.perf_counter()
    params, nbytes = write_weights(tmp, config, seed, int(shard_gib * (1 << 30)), std)
    config.architectures = ["Qwen3ForCausalLM"]
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(tmp)
    os.rename(tmp, out)
    return {"path": os.path.abspath(out), "preset": preset, "parameters": params, "weight_bytes": nbytes,
            "dtype": dtype, "seconds": time.perf_counter() - t0, "files": sorted(os.listdir(out))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", metavar="OUT_DIR")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gib", type=float, default=5.0, help="largest safetensors shard (GiB)")
    ap.add_argument("--max-len", type=int, default=None, help="max_position_embeddings (default: the preset's)")
    ap.add_argument("--store", default=None, help="also build the directory into this casfs store")
    ap.add_argument("--tag", default=None, help="tag of the casfs image (default: qwen3-PRESET)")
    ap.add_argument("--keep", action="store_true", help="keep OUT_DIR after packing it")
    ap.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    a = ap.parse_args(argv)
    if os.path.exists(a.out):
        if not a.force:
            print(f"make_model: {a.out} exists (use --force to replace it)", file=sys.stderr)
            return 1
        shutil.rmtree(a.out)
    summary = build(a.out, a.preset, seed=a.seed, shard_gib=a.shard_gib, max_len=a.max_len)
    if a.store:
        import casfs

        t = time.perf_counter()
        with casfs.open_store(a.store) as store:
            r = casfs.build(store, a.out, tag=a.tag or f"qwen3-{a.preset}", chunk_size=16 << 20, progress=False)
        summary.update(image_id=r.image_id, tag=a.tag or f"qwen3-{a.preset}", pack_seconds=time.perf_counter() - t)
        if not a.keep:
            shutil.rmtree(a.out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
