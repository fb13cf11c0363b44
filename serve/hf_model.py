"""A Hugging Face causal LM built on the meta device, its weights placed in one releasable
memory region and streamed in from casfs.

``build_model`` constructs the model from ``config.json`` without allocating anything (the meta
device), then :class:`ModelWeights` gives every distinct parameter (tied ones once) a place in
one ``snapshot`` memory region (CUDA virtual memory on a GPU, an anonymous mapping on the CPU)
and fills it with ``snapshot.load_into_module``: chunks read from the casfs store's tiers straight
into the parameters (through pinned staging on a GPU), never through FUSE. Non-persistent buffers
the file does not hold (rotary ``inv_freq``) are computed on the device by rebuilding their module.

``release()`` frees the weights' physical memory and keeps their addresses; ``remap()`` +
``load()`` put them back at the same addresses, so CUDA graphs captured over them replay as before.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import snapshot

__all__ = ["ModelWeights", "WeightsSource", "build_model", "find_weights_file"]


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from: a casfs ``store`` URL (with its ssd ``cache_dir``), the model
    ``image`` (tag or id) and the safetensors ``path`` inside it (a file or a shard index json)."""

    store: str
    image: str
    path: str
    cache_dir: str | None = None


def find_weights_file(model_dir: str) -> str:
    """The weights file of a model directory, relative to it: the shard index json when there is
    one, else ``model.safetensors``. Raises FileNotFoundError naming what was looked for."""
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if os.path.exists(os.path.join(model_dir, name)):
            return name
    raise FileNotFoundError(f"{model_dir} holds neither model.safetensors nor model.safetensors.index.json "
                            "(the transformers engine reads safetensors weights only)")


def build_model(model_dir: str, dtype: Any = None) -> tuple[Any, Any]:
    """(model, config): the causal LM of ``model_dir/config.json`` on the meta device, SDPA
    attention, in eval mode. ``dtype`` default: the config's (float32 if it names none).

    Raises:
        ValueError: the config names no causal LM transformers knows.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{model_dir}: transformers cannot build a causal LM from this config: {e}") from None
    model.eval()
    model.requires_grad_(False)
    return model, config


def _set(module: Any, dotted: str, value: Any) -> None:
    owner = module
    *path, leaf = dotted.split(".")
    for p in path:
        owner = getattr(owner, p)
    setattr(owner, leaf, value)


class ModelWeights:
    """The parameters of ``model`` placed in one region on ``device`` (see the module docstring).

    Attributes: ``region`` (the snapshot memory region), ``nbytes`` (parameter bytes),
    ``tensors`` (distinct parameters), ``timings`` (seconds of the last load, by step).
    """

    def __init__(self, model: Any, config: Any, device: Any) -> None:
        import torch

        self.model = model
        self.device = torch.device(device)
        groups: dict[int, list[str]] = {}
        params: dict[int, Any] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
            params[id(p)] = p
        sizes = [params[k].numel() * params[k].element_size() for k in groups]
        offsets, total = snapshot.region_layout(sizes)
        self.region = snapshot.allocate_region(total, self.device)
        self.nbytes = sum(sizes)
        self.tensors = len(groups)
        for (key, names), off in zip(groups.items(), offsets):
            p = params[key]
            t = self.region.tensor(off, tuple(p.shape), p.dtype)
            new = torch.nn.Parameter(t, requires_grad=False)
            for n in names:
                _set(model, n, new)
        self._materialize_buffers(config)
        self.timings: dict[str, float] = {}
        self.stats: Any = None

    def _materialize_buffers(self, config: Any) -> None:
        """Compute buffers left on the meta device (rotary tables) by rebuilding their modules."""
        for mname, m in list(self.model.named_modules()):
            meta = [n for n, b in m.named_buffers(recurse=False) if b is not None and b.is_meta]
            if not meta:
                continue
            cls = type(m)
            if "Rotary" not in cls.__name__:
                raise ValueError(f"cannot materialise buffers {meta} of {mname} ({cls.__name__}): only rotary "
                                 "embeddings are rebuilt")
            import torch

            cfg = getattr(m, "config", config)
            with torch.device(self.device):  # the signature differs between transformers versions
                try:
                    new = cls(config=cfg)
                except TypeError:
                    new = cls(config=cfg, device=self.device)
            _set(self.model, mname, new.to(self.device))

    def load(self, source: WeightsSource, *, concurrency: int | None = None,
             pinned: Any = None, keep_open: bool = False) -> "snapshot.LoadStats":
        """Stream the weights from casfs into the parameters (in place). Returns the load stats.
        ``pinned``: a ``casfs.PinnedTier`` whose chunks are copied from instead of read (a
        parked replica's shared host copy, serve.shared_weights). ``keep_open``: keep the store
        and image open for the next load of the same source (reloads after a park: no index to
        open again, the safetensors header in the store's memory tier); never for the load
        before a snapshot, whose CRIU dump would carry the store's open files.

        Raises:
            snapshot.ModuleMismatch: the file's tensors do not match the model's parameters.
            casfs.ImageNotFound / casfs.ChunkUnavailable / snapshot.InvalidSafetensors.
        """
        import casfs

        stats = snapshot.LoadStats()
        t0 = time.perf_counter()
        kw: dict[str, Any] = {"concurrency": concurrency} if concurrency else {}
        if pinned is not None:
            kw["pinned"] = pinned
        held = getattr(self, "_held", None)
        if held is None or held[0] != source:
            self.close_store()
            held = None
        try:
            if held is None:
                store = casfs.open_store(source.store, cache_dir=source.cache_dir)
                try:
                    held = (source, store, store.open_image(source.image))
                except BaseException:
                    store.close()
                    raise
            t1 = time.perf_counter()
            snapshot.load_into_module(self.model, held[2], source.path, stats=stats, **kw)
        finally:
            self._held = held
            if not keep_open:
                self.close_store()
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        self.timings = {"open": t1 - t0, "load": time.perf_counter() - t1}
        self.stats = stats
        return stats

    def close_store(self) -> None:
        """Close the store a ``keep_open`` load kept."""
        held, self._held = getattr(self, "_held", None), None
        if held is not None:
            held[1].close()

    def load_directory(self, model_dir: str) -> None:
        """Read the weights from safetensors files in a plain directory (no casfs store at hand)."""
        import torch
        from safetensors.torch import load_file

        name = find_weights_file(model_dir)
        files = [name]
        if name.endswith(".json"):
            import json

            with open(os.path.join(model_dir, name)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        sd = self.model.state_dict()
        with torch.no_grad():
            for fn in files:
                for k, v in load_file(os.path.join(model_dir, fn)).items():
                    if k in sd:
                        sd[k].copy_(v)

    def release(self) -> int:
        """Free the weights' memory, keeping their addresses; returns the bytes freed."""
        return self.region.release()

    def remap(self) -> None:
        """Memory back under the weights' addresses (contents unspecified until ``load``)."""
        self.region.remap()
