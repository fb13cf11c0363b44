"""The replica's static KV cache: allocated once, reused by every batch, releasable.

One ``snapshot`` memory region holds, for each layer, a key and a value block of
``[max_batch, kv_heads, max_len, head_dim]``. A batch of ``B`` rows uses the first ``B`` rows of
every block: ``tensors(B)`` returns, per layer, a ``[B, kv_heads, max_len, head_dim]`` tensor
starting at the block's address (its own tensor, not a view of another, so torch.compile sees
plain inputs). The tensors for each ``B`` are made once and kept: their addresses never change,
which is what CUDA graphs captured over them need. transformers' own ``generate()`` builds a new
``StaticCache`` per call, which made torch re-record its CUDA graphs every time (issue 18).

``KvView`` is what the model's attention layers get as ``past_key_values``: ``update`` writes
the new keys/values at the cache positions of the step and returns the whole block (the 4D
attention mask, built by the decoder, hides the positions not yet written).

``release()`` frees the memory (addresses kept) before a snapshot or while parked; ``remap()``
backs it again and zeroes it: masked positions are multiplied by 0 in attention, and 0 x NaN
from stale memory would be NaN.
"""

from __future__ import annotations

from typing import Any

import snapshot

__all__ = ["KvCache", "KvView"]


class KvView:
    """``past_key_values`` for one forward pass: ``update(k, v, layer_idx)`` writes at ``pos``."""

    def __init__(self, keys: list[Any], values: list[Any], pos: Any) -> None:
        self.keys, self.values, self.pos = keys, values, pos

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.pos, key_states)
        v.index_copy_(2, self.pos, value_states)
        return k, v


class KvCache:
    """See the module docstring. ``nbytes``: memory the cache holds while mapped."""

    def __init__(self, config: Any, max_batch: int, max_len: int, device: Any, dtype: Any) -> None:
        import torch

        self.layers = int(config.num_hidden_layers)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.max_batch, self.max_len = int(max_batch), int(max_len)
        self.dtype = dtype
        self.device = torch.device(device)
        elsize = torch.empty((), dtype=dtype).element_size()
        self.block = self.max_batch * self.kv_heads * self.max_len * self.head_dim * elsize
        offsets, total = snapshot.region_layout([self.block] * (2 * self.layers))
        self._offsets = offsets
        self.region = snapshot.allocate_region(total, self.device)
        self.nbytes = total
        self._by_batch: dict[int, tuple[list[Any], list[Any]]] = {}
        self.zero()

    def tensors(self, batch: int) -> tuple[list[Any], list[Any]]:
        """(keys, values): per layer, the ``[batch, kv_heads, max_len, head_dim]`` blocks."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} is outside 1..{self.max_batch}")
        got = self._by_batch.get(batch)
        if got is None:
            shape = (batch, self.kv_heads, self.max_len, self.head_dim)
            keys = [self.region.tensor(self._offsets[2 * i], shape, self.dtype) for i in range(self.layers)]
            values = [self.region.tensor(self._offsets[2 * i + 1], shape, self.dtype) for i in range(self.layers)]
            got = self._by_batch[batch] = (keys, values)
        return got

    def view(self, batch: int, pos: Any) -> KvView:
        keys, values = self.tensors(batch)
        return KvView(keys, values, pos)

    def zero(self) -> None:
        """Set every byte of the cache to zero."""
        import torch

        self.region.tensor(0, (self.region.nbytes,), torch.uint8).zero_()

    def release(self) -> int:
        """Free the cache's memory, keeping its addresses; returns the bytes freed."""
        return self.region.release()

    def remap(self) -> None:
        """Memory back under the cache's addresses, zeroed."""
        self.region.remap()
        self.zero()
