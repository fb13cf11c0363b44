"""One rank of a tensor-parallel transformers replica (issue 16); ``serve.tp`` starts and drives it.

    python -m serve.tp_worker --model-dir DIR --rank R --world N --init tcp://127.0.0.1:PORT
        [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16]

The model is loaded with transformers (Llama/Qwen-style decoder layers) and split Megatron-style:
the q/k/v and gate/up projections by output rows (whole attention heads, whole KV heads), the o
and down projections by input columns followed by an all-reduce (``RowParallel``); embeddings,
norms and the LM head are replicated, so every rank computes the same logits and runs the same
greedy loop. Rank R uses GPU R (``cuda:R``: the ranks see every GPU, no CUDA_VISIBLE_DEVICES, so a
driver device map could name them all) with NCCL, or the CPU with gloo. The step runs eagerly:
a CUDA graph holding NCCL kernels would point at a communicator that ``quiesce`` destroys.

It reads one JSON command a line on stdin and answers one JSON line on stdout (logs go to
stderr). Commands, sent to every rank at once (each answers for itself):

* ``{"op": "generate", "ids": [...], "max_new_tokens": N}`` -> ``{"tokens": [...], "logprobs": [...]}``
  (greedy; log-probabilities as ``repr`` strings so a comparison is exact);
* ``{"op": "quiesce"}``: barrier, then the process group is destroyed, the device synchronised
  and its cached blocks freed: no rank is in a collective or holds another rank's memory, so
  the driver can checkpoint each rank (``snapshot.suspend_group``);
* ``{"op": "rebuild", "init": "tcp://..."}``: a new process group (after ``resume_group``), checked
  with an all-reduce of the ranks' numbers;
* ``{"op": "info"}``, ``{"op": "exit"}``.

The first line it writes is ``{"ready": true, ...}`` with its boot phases (imports, load, shard,
process group, warm-up) once a warm-up generation has run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

T0 = time.monotonic()


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Comm:
    """The current process group (rebuilt after a restore), and the all-reduce the layers call."""

    def __init__(self, backend: str, rank: int, world: int, device: Any) -> None:
        self.backend, self.rank, self.world, self.device = backend, rank, world, device
        self.up = False

    def init(self, init_method: str, timeout_s: float = 300.0) -> float:
        import datetime

        import torch.distributed as dist

        t = time.monotonic()
        kw: dict[str, Any] = {}
        if self.backend == "nccl":
            kw["device_id"] = self.device
        dist.init_process_group(self.backend, init_method=init_method, rank=self.rank, world_size=self.world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
        self.up = True
        return time.monotonic() - t

    def all_reduce(self, t: Any) -> None:
        import torch.distributed as dist

        if not self.up:
            raise RuntimeError("the process group is down (quiesced): rebuild it first")
        dist.all_reduce(t)

    def destroy(self) -> None:
        import torch.distributed as dist

        if self.up:
            dist.barrier()
            dist.destroy_process_group()
            self.up = False


def _row_parallel_class() -> Any:
    import torch
    import torch.nn.functional as F

    class RowParallel(torch.nn.Module):
        """A linear layer whose input features are split over the ranks: each multiplies its slice,
        the partial sums are all-reduced, the bias is added once."""

        def __init__(self, lin: Any, rank: int, world: int, comm: Comm) -> None:
            super().__init__()
            k = lin.in_features // world
            self.weight = torch.nn.Parameter(lin.weight.data[:, rank * k:(rank + 1) * k].clone(), requires_grad=False)
            self.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            self.comm = comm

        def forward(self, x: Any) -> Any:
            y = F.linear(x, self.weight)
            self.comm.all_reduce(y)
            return y if self.bias is None else y + self.bias

    return RowParallel


def _split_rows(lin: Any, rank: int, world: int) -> None:
    import torch

    n = lin.out_features // world
    lin.weight = torch.nn.Parameter(lin.weight.data[rank * n:(rank + 1) * n].clone(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = torch.nn.Parameter(lin.bias.data[rank * n:(rank + 1) * n].clone(), requires_grad=False)
    lin.out_features = n


def shard(model: Any, rank: int, world: int, comm: Comm) -> dict:
    """Split ``model``'s decoder layers over ``world`` ranks in place (see the module docstring).

    Raises:
        ValueError: not a Llama/Qwen-style model, or heads / KV heads / MLP width not divisible.
    """
    cfg = model.config
    heads, kv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if heads % world or kv % world or inter % world:
        raise ValueError(f"tensor parallel {world} needs heads ({heads}), KV heads ({kv}) and the MLP width "
                         f"({inter}) divisible by {world}")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: tensor parallel supports Llama/Qwen-style models")
    RowParallel = _row_parallel_class()
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            _split_rows(lin, rank, world)
        a.o_proj = RowParallel(a.o_proj, rank, world, comm)
        m.down_proj = RowParallel(m.down_proj, rank, world, comm)
    return {"layers": len(layers), "heads_per_rank": heads // world, "kv_heads_per_rank": kv // world}


def generate(model: Any, ids: list[int], n: int, device: Any) -> dict:
    """Greedy ``n`` tokens after ``ids``: tokens and their log-probabilities (exact reprs)."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        toks = out.sequences[0][len(ids):].tolist()
        lps = [repr(float(torch.log_softmax(s[0].float(), -1)[t])) for s, t in zip(out.scores, toks)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"tokens": toks, "logprobs": lps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.tp_worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--init", required=True, help="the first rendezvous, tcp://HOST:PORT")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    phases: dict[str, float] = {}
    t = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM

    phases["imports"] = time.monotonic() - t
    if args.device == "cuda":
        torch.cuda.set_device(args.rank)
        device, backend = torch.device("cuda", args.rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    comm = Comm(backend, args.rank, args.world, device)
    t = time.monotonic()
    kw = {} if args.dtype == "auto" else {"dtype": getattr(torch, args.dtype)}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kw).eval()
    phases["load"] = time.monotonic() - t
    t = time.monotonic()
    layout = shard(model, args.rank, args.world, comm)
    model.to(device)
    phases["shard"] = time.monotonic() - t
    phases["process_group"] = comm.init(args.init)
    t = time.monotonic()
    generate(model, [1, 2, 3], 2, device)
    phases["warmup"] = time.monotonic() - t
    _say({"ready": True, "pid": os.getpid(), "rank": args.rank, "device": str(device), "phases": phases,
          "layout": layout, "since_exec_s": time.monotonic() - T0})
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            t = time.monotonic()
            if op == "generate":
                out = generate(model, [int(i) for i in cmd["ids"]], int(cmd["max_new_tokens"]), device)
            elif op == "quiesce":
                comm.destroy()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()  # cached blocks would travel in the driver's checkpoint
                out = {"ok": True}
            elif op == "rebuild":
                out = {"ok": True, "process_group": comm.init(cmd["init"])}
                x = torch.tensor([float(args.rank + 1)], device=device)
                comm.all_reduce(x)
                out["check"] = float(x.item())
                if out["check"] != args.world * (args.world + 1) / 2:
                    raise RuntimeError(f"the rebuilt group's all-reduce gave {out['check']}")
            elif op == "info":
                out = {"pid": os.getpid(), "rank": args.rank, "device": str(device), "group_up": comm.up}
            elif op == "exit":
                _say({"ok": True})
                return 0
            else:
                raise ValueError(f"unknown op {op!r}")
            out["seconds"] = time.monotonic() - t
            _say(out)
        except Exception as e:  # noqa: BLE001 - answered, the supervisor decides
            _say({"error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
