#!/usr/bin/env python3
"""Build a tiny random-weight Llama model directory that vLLM can serve, with no hub access.

The output is a Hugging Face style model directory (``config.json``, ``generation_config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``)
written with ``save_pretrained``. The tokenizer is a byte-level BPE trained here, with the
``tokenizers`` library, on a small built-in corpus; it carries a simple chat template so
``/v1/chat/completions`` works. Weights are random but seeded: the same arguments always give
the same files (so greedy completions are reproducible across builds).

Needs torch, transformers and tokenizers: run it with the vLLM venv's python
(``.venv-vllm/bin/python scripts/make_tiny_model.py OUT``).

Usage: make_tiny_model.py OUT_DIR [--hidden 128] [--layers 2] [--vocab 512] [--max-len 512]
Exit status 0 on success; OUT_DIR must not exist unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

# Never reach for the hub, even by accident.
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


def corpus(lines: int = 4000) -> list[str]:
    """A deterministic pseudo-English corpus: enough variety for a few hundred BPE merges."""
    words = ("the a an of to in on for with from by at about into over after model token "
             "chunk image store cache layer tier mount boot snapshot restore server replica "
             "request stream prompt answer fast slow cold warm lazy byte file index digest "
             "hello world quick brown fox jumps lazy dog one two three four five six seven "
             "eight nine ten red green blue what why how when where who is are was were be "
             "can will would should could may might must do does did have has had go goes "
             "went run runs ran read reads write writes serve serves load loads").split()
    out = []
    x = 12345
    for _ in range(lines):
        n = 5 + x % 11
        sent = []
        for _ in range(n):
            x = (1103515245 * x + 12345) % (1 << 31)
            sent.append(words[x % len(words)])
        out.append(" ".join(sent).capitalize() + ".")
    return out


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer wrapped as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.add_bos_token = True
    return fast


def build(out: str, *, hidden: int, layers: int, vocab: int, max_len: int, seed: int) -> dict:
    """Write the model directory ``out``; returns a summary dict (also printed as JSON)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(vocab)
    heads = max(1, hidden // 32)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_len, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Bigger random logits than the default init so greedy decoding is far from ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(tmp)
    os.rename(tmp, out)
    params = sum(p.numel() for p in model.parameters())
    return {"path": os.path.abspath(out), "parameters": params, "vocab": len(tokenizer),
            "hidden": hidden, "layers": layers, "max_position_embeddings": max_len,
            "files": sorted(os.listdir(out))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", metavar="OUT_DIR")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        if not args.force:
            print(f"make_tiny_model: {args.out} exists (use --force to replace it)", file=sys.stderr)
            return 1
        shutil.rmtree(args.out)
    summary = build(args.out, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                    max_len=args.max_len, seed=args.seed)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
