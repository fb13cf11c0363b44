"""Batched prefill and decode steps over a static KV cache, compiled and captured as CUDA graphs.

A batch of ``n`` requests runs as ``B`` rows: on a GPU ``B`` is the smallest captured batch size
that holds ``n`` (default sizes 2, 4, 8; spare rows repeat row 0 and are ignored), on the CPU
``B = n``. Prompts are left-padded to a common length ``T``, so every row writes cache position
``t`` at the same step; each row keeps its own position ids (rotary angles as if unpadded), and
the 4D boolean attention mask the decoder builds itself hides the padding and the positions not
yet written. transformers' mask code is bypassed (a prepared 4D mask is passed as is), and the
model's attention layers write the cache through :class:`serve.kvcache.KvView`.

* ``prefill(rows)`` runs the prompts eagerly ([B, T] tokens) or, when short and graphs exist,
  through the decode graph one position at a time; either way it leaves the per-row decode
  state (next position ids, mask) in the static buffers of batch size ``B`` and returns the
  last logits.
* ``step(tokens)`` runs one decode step for the batch: on a GPU by replaying the CUDA graph of
  size ``B`` (one launch: the compiled forward plus the position increments), on the CPU
  eagerly through the same function. Returns the logits ``[B, vocab]`` (float32, a static
  buffer overwritten by the next step).

Compilation (``torch.compile``, default mode, fullgraph) is done once for every batch size:
the batch dimension of the step's inputs is marked dynamic, so sizes 2, 4 and 8 share one
compiled graph (a size-1 batch would be specialised and compiled again, hence the smallest
size is 2). ``capture()`` compiles and records one CUDA graph per size into one shared memory
pool; the graphs read the weights and the KV cache at fixed addresses, which is why both live
in releasable regions (serve.hf_model, serve.kvcache) that come back at the same addresses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .kvcache import KvCache, KvView

__all__ = ["Decoder"]

DEFAULT_GRAPH_SIZES = (2, 4, 8)
GRAPH_PREFILL_MAX = 32  # prompts up to this many tokens are prefilled through the decode graph


@dataclass
class _Buffers:
    tok: Any  # [B, 1] long: the tokens the next step reads
    pos_ids: Any  # [B, 1] long: each row's position id for the next step
    mask: Any  # [B, 1, 1, L] bool: which cache positions each row attends to
    out: Any  # [B, vocab] float32: the step's logits


class Decoder:
    """See the module docstring. ``graph_sizes`` None: eager, any batch size up to the cache's."""

    def __init__(self, model: Any, kv: KvCache, vocab_size: int, *, graph_sizes: tuple[int, ...] | None,
                 compile: bool) -> None:
        import torch

        self.model = model
        self.kv = kv
        self.vocab = int(vocab_size)
        self.device = kv.device
        self.sizes = tuple(sorted(graph_sizes)) if graph_sizes else None
        if self.sizes and (self.sizes[-1] > kv.max_batch or self.sizes[0] < 1):
            raise ValueError(f"graph batch sizes {self.sizes} must lie in 1..{kv.max_batch}")
        self.max_batch = self.sizes[-1] if self.sizes else kv.max_batch
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._bufs: dict[int, _Buffers] = {}
        self.compiled = bool(compile)
        self._fn = self._forward_step
        if compile:
            self._fn = torch.compile(self._forward_step, fullgraph=True)
        self.graphs: dict[int, Any] = {}
        self.timings: dict[str, float] = {}
        self.graph_prefill_max = GRAPH_PREFILL_MAX

    # -- the step function (compiled on a GPU) ------------------------------------------------

    def _forward_step(self, tok: Any, pos_ids: Any, cache_pos: Any, mask: Any, out: Any,
                      keys: list[Any], values: list[Any]) -> None:
        mask.index_fill_(3, cache_pos, True)
        logits = self.model(input_ids=tok, attention_mask=mask, position_ids=pos_ids,
                            past_key_values=KvView(keys, values, cache_pos), use_cache=False,
                            logits_to_keep=1).logits
        out.copy_(logits[:, -1].float())

    def _step_once(self, B: int) -> None:
        b = self.bufs(B)
        keys, values = self.kv.tensors(B)
        self._fn(b.tok, b.pos_ids, self.pos, b.mask, b.out, keys, values)
        b.pos_ids.add_(1)
        self.pos.add_(1)

    def bufs(self, B: int) -> _Buffers:
        """The static buffers of batch size ``B`` (made once; their addresses never change)."""
        import torch

        b = self._bufs.get(B)
        if b is None:
            dev = self.device
            b = self._bufs[B] = _Buffers(
                tok=torch.zeros(B, 1, dtype=torch.long, device=dev),
                pos_ids=torch.zeros(B, 1, dtype=torch.long, device=dev),
                mask=torch.zeros(B, 1, 1, self.kv.max_len, dtype=torch.bool, device=dev),
                out=torch.zeros(B, self.vocab, dtype=torch.float32, device=dev))
            if self.compiled:
                for t in (b.tok, b.pos_ids, b.mask, b.out, *self.kv.tensors(B)[0], *self.kv.tensors(B)[1]):
                    torch._dynamo.mark_dynamic(t, 0)
        return b

    def rows_for(self, n: int) -> int:
        """The batch size ``n`` requests run as."""
        if n < 1 or n > self.max_batch:
            raise ValueError(f"a batch holds 1..{self.max_batch} requests, not {n}")
        if self.sizes is None:
            return n
        return next(s for s in self.sizes if s >= n)

    def capture(self) -> dict[str, float]:
        """Compile the step (when compiling) and record one CUDA graph per batch size.

        Returns seconds: ``compile`` (the first call, which compiles) and ``capture`` (the
        rest). On the CPU (no graph sizes) it only runs the compiled step once per size, if any.
        """
        import torch

        if not self.sizes:
            return {}
        t0 = time.perf_counter()
        with torch.no_grad():
            self.bufs(self.sizes[0])
            self._step_once(self.sizes[0])  # compiles
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
            if self.device.type == "cuda":
                pool = torch.cuda.graph_pool_handle()
                for B in reversed(self.sizes):  # largest first: the pool grows once
                    self.bufs(B)
                    s = torch.cuda.Stream(self.device)
                    s.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(s):
                        for _ in range(2):
                            self._step_once(B)
                    torch.cuda.current_stream(self.device).wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        self._step_once(B)
                    self.graphs[B] = g
                torch.cuda.synchronize(self.device)
            else:
                for B in self.sizes:
                    self._step_once(B)
        self.timings = {"compile": t1 - t0, "capture": time.perf_counter() - t1}
        return self.timings

    # -- running a batch ------------------------------------------------------------------------

    def prefill(self, rows: list[list[int]]) -> tuple[Any, int]:
        """Run the prompts ``rows`` (token id lists, 1..max_batch of them, each non-empty).

        Returns (logits ``[B, vocab]`` float32 of each row's last position, ``B``). Rows past
        ``len(rows)`` repeat row 0. Raises ValueError when a prompt does not fit the cache.
        Prompts of at most ``graph_prefill_max`` tokens go through the decode step's graph one
        position at a time (see ``_prefill_by_steps``); longer ones run eagerly in one pass.
        """
        import torch

        n = len(rows)
        B = self.rows_for(n)
        rows = list(rows) + [rows[0]] * (B - n)
        T = max(len(r) for r in rows)
        L = self.kv.max_len
        if T >= L:
            raise ValueError(f"a prompt of {T} tokens leaves no room in a {L}-token cache")
        if self.sizes and T <= self.graph_prefill_max:
            return self._prefill_by_steps(rows, T), B
        dev = self.device
        pads = torch.tensor([T - len(r) for r in rows], dtype=torch.long)
        ids = torch.tensor([[r[0]] * (T - len(r)) + list(r) for r in rows], dtype=torch.long)
        ar = torch.arange(T)
        pos_ids = (ar.view(1, T) - pads.view(B, 1)).clamp(min=0)
        k = torch.arange(L).view(1, 1, L)
        j = ar.view(1, T, 1)
        # a real query sees the real keys up to itself; a padding query sees only itself (so its
        # keys and values stay finite: masked positions are multiplied by 0, and 0 x NaN is NaN)
        allowed = ((k <= j) & (k >= pads.view(B, 1, 1))) | (k == j)
        with torch.no_grad():
            keys, values = self.kv.tensors(B)
            logits = self.model(input_ids=ids.to(dev), attention_mask=allowed.view(B, 1, T, L).to(dev),
                                position_ids=pos_ids.to(dev),
                                past_key_values=KvView(keys, values, ar.to(dev)), use_cache=False,
                                logits_to_keep=1).logits[:, -1].float()
            b = self.bufs(B)
            row_mask = (torch.arange(L).view(1, L) >= pads.view(B, 1)) & (torch.arange(L).view(1, L) < T)
            b.mask.copy_(row_mask.view(B, 1, 1, L).to(dev))
            b.pos_ids.copy_((T - pads).view(B, 1).to(dev))
            self.pos.fill_(T)
        return logits, B

    def _prefill_by_steps(self, rows: list[list[int]], T: int) -> Any:
        """A short prompt fed through the decode step, position by position: ``T`` graph replays
        (a few ms each on a GPU) instead of one eager pass over the whole model (~150 ms for the
        0.6B shape on the H200, most of it Python and kernel launches). Nothing is synchronised
        until the caller reads the logits.

        At position ``t`` every row gets its token (a left-padded row gets its first token as
        padding) and its position id; the step marks column ``t`` visible for every row, so
        after it the column is hidden again for rows still in their padding. A padding query
        thus sees only itself and a real one sees its real tokens, as in the eager prefill.
        """
        import torch

        B = len(rows)
        b = self.bufs(B)
        dev = self.device
        pads = torch.tensor([T - len(r) for r in rows], dtype=torch.long)
        ids = torch.tensor([[r[0]] * (T - len(r)) + list(r) for r in rows], dtype=torch.long)
        ar = torch.arange(T).view(1, T)
        toks = ids.t().contiguous().view(T, B, 1).to(dev)
        pos_ids = (ar - pads.view(B, 1)).clamp(min=0).t().contiguous().view(T, B, 1).to(dev)
        visible = (ar >= pads.view(B, 1)).t().contiguous().to(dev)  # [T, B]
        with torch.no_grad():
            b.mask.zero_()
            self.pos.zero_()
            for t in range(T):
                b.tok.copy_(toks[t])
                b.pos_ids.copy_(pos_ids[t])
                self._replay(B)
                b.mask[:, 0, 0, t].copy_(visible[t])
        return b.out

    def _replay(self, B: int) -> None:
        g = self.graphs.get(B)
        if g is not None:
            g.replay()
        else:
            self._step_once(B)

    def step(self, tokens: Any) -> Any:
        """One decode step of the batch ``prefill`` started; ``tokens`` ``[B]`` (long, on the
        device) are each row's latest token. Returns the logits ``[B, vocab]`` (static buffer)."""
        import torch

        B = int(tokens.shape[0])
        b = self.bufs(B)
        with torch.no_grad():
            b.tok.copy_(tokens.view(B, 1))
            self._replay(B)
        return b.out
