"""vLLM's ``casfs`` load format: a model's weights streamed from a casfs store.

vLLM builds the model from a directory holding its config and tokenizer (``casfs serve``
writes those files only: ``serve.modeldir.materialize_metadata``); this loader then reads the
safetensors weights from the chunk store with ``snapshot.load_safetensors`` (verified chunks,
many reads at once, straight into the tensors) and hands them to the model's own
``load_weights``, which maps checkpoint names to vLLM's fused parameters and shards them.
Nothing goes through FUSE, and because chunks are content-addressed a fine-tune that shares
most tensors with a model already in the ssd tier fetches only the chunks that changed.

Registration (``register()``, idempotent) goes through vLLM's plugin API,
``vllm.model_executor.model_loader.register_model_loader``. It must run in the process that
loads the weights: ``serve.engine.VllmEngine.start`` calls it before building the engine (for
``vllm.LLM`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` that is the loading process), and sets
``CASFS_VLLM_LOAD_FORMAT=1`` so that vLLM's spawned EngineCore, which re-imports
``serve.worker`` as its main module, registers it there too. The ``vllm.general_plugins``
entry point ``casfs = serve.vllm_loader:register`` in pyproject.toml does the same for any vLLM
program (entry points come from installed metadata: the venv's editable install must be redone
after the entry point is added). Being loaded in every vLLM process, it also applies
``serve.vllm_procfix`` (vLLM's reads of its own /proc files inside a snapshot's PID namespace).

``model_loader_extra_config`` (``--model-loader-extra-config`` on vLLM's command line):

    store       casfs store URL (required)
    image       image tag or id (required)
    path        the weights inside the image: ``model.safetensors`` or a shard index json
                (default: the index json when the image has one, else model.safetensors)
    cache_dir   the ssd tier's directory ("" or absent: none)
    concurrency chunk reads in flight (default: snapshot.weights' default)
    device      where tensors are staged before ``load_weights`` copies them into the model's
                parameters: ``auto`` (default: the device the parameters live on), ``cpu`` or
                ``cuda``. One shard is staged at a time: peak extra memory is the largest shard.

The last load's ``LoadStats`` (bytes, chunk reads, per-tier hits) is logged and kept in
``CasfsModelLoader.last_stats``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

LOAD_FORMAT = "casfs"
_KEYS = {"store", "image", "path", "cache_dir", "concurrency", "device"}
# under "vllm.": vLLM's handler prints it in every vLLM process (its EngineCore configures no
# other logging), and serve.engine.parse_vllm_timings finds the "Loading weights took" line
log = logging.getLogger("vllm.casfs_loader")
_registered: type | None = None


class LoaderConfigError(ValueError):
    """``model_loader_extra_config`` is missing a key or holds a bad value."""


def parse_extra_config(extra: Any) -> dict:
    """Validate the ``casfs`` load format's extra config; returns it with defaults filled in.

    Raises:
        LoaderConfigError: a missing store or image, an unknown key, a bad concurrency or device.
    """
    if not isinstance(extra, dict):
        raise LoaderConfigError(f"load format casfs needs model_loader_extra_config as a dict, got {type(extra).__name__}")
    unknown = set(extra) - _KEYS
    if unknown:
        raise LoaderConfigError(f"unknown keys for load format casfs: {sorted(unknown)} (known: {sorted(_KEYS)})")
    out = dict(extra)
    for key in ("store", "image"):
        if not isinstance(out.get(key), str) or not out[key]:
            raise LoaderConfigError(f"load format casfs needs model_loader_extra_config[{key!r}] (a string)")
    c = out.get("concurrency")
    if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
        raise LoaderConfigError(f"concurrency must be a positive integer, got {c!r}")
    if out.get("device", "auto") not in ("auto", "cpu", "cuda"):
        raise LoaderConfigError(f"device must be auto, cpu or cuda, got {out['device']!r}")
    out.setdefault("device", "auto")
    out.setdefault("cache_dir", "")
    out.setdefault("path", "")
    return out


def register() -> type:
    """Register the ``casfs`` load format with vLLM (idempotent); returns the loader class.

    Raises:
        ImportError: vLLM is not installed in this Python.
    """
    global _registered
    from .vllm_procfix import apply as fix_proc_reads

    fix_proc_reads()  # every vLLM process loads this plugin: see serve.vllm_procfix
    if _registered is not None:
        return _registered
    from vllm.model_executor.model_loader import register_model_loader

    _registered = register_model_loader(LOAD_FORMAT)(_loader_class())
    return _registered


def _loader_class() -> type:
    import torch
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    import casfs
    import snapshot

    class CasfsModelLoader(BaseModelLoader):
        """Loads safetensors weights from a casfs image (see ``serve.vllm_loader``)."""

        last_stats: Any = None

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.cfg = parse_extra_config(load_config.model_loader_extra_config)

        def _open(self) -> tuple[Any, Any, str]:
            store = casfs.open_store(self.cfg["store"], cache_dir=self.cfg["cache_dir"] or "", memory_bytes=0)
            try:
                image = store.open_image(self.cfg["image"])
                path = self.cfg["path"] or _weights_path(image)
                image.stat(path)  # PathNotFound names it
            except BaseException:
                store.close()
                raise
            return store, image, path

        def download_model(self, model_config: Any) -> None:
            """Nothing to download: checks that the image and its weights are there."""
            store, _, _ = self._open()
            store.close()

        def _iter(self, image: Any, path: str, device: Any, stats: Any) -> Iterator[tuple[str, Any]]:
            kw = {"concurrency": self.cfg["concurrency"]} if self.cfg.get("concurrency") else {}
            for shard in _shards(image, path):
                tensors = snapshot.load_safetensors(image, shard, device=device, stats=stats, **kw)
                while tensors:
                    yield tensors.popitem()  # handed over one by one: each is freed once loaded

        def load_weights(self, model: Any, model_config: Any) -> None:
            params = list(model.parameters())
            dev = self.cfg["device"]
            if dev == "auto":
                dev = params[0].device if params else torch.device("cpu")
            t0 = time.perf_counter()
            stats = snapshot.LoadStats()
            store, image, path = self._open()
            try:
                model.load_weights(self._iter(image, path, dev, stats))
            finally:
                store.close()
            type(self).last_stats = stats
            # vLLM's own loaders log this line; serve.engine.parse_vllm_timings reads it
            log.info("Loading weights took %.2f seconds", time.perf_counter() - t0)
            log.info("casfs: loaded %.1f MB of weights from image %s in %.2f s (%d chunk reads; tiers %s)",
                     stats.bytes / 1e6, image.id[:12], time.perf_counter() - t0, stats.chunks,
                     {k: v.get("hits", 0) for k, v in stats.tiers.items()})

    return CasfsModelLoader


def _weights_path(image: Any) -> str:
    """The shard index json when the image has one, else ``model.safetensors``."""
    import casfs

    try:
        image.stat("model.safetensors.index.json")
        return "model.safetensors.index.json"
    except casfs.CasfsError:
        return "model.safetensors"


def _shards(image: Any, path: str) -> list[str]:
    """The safetensors files ``path`` names: itself, or every shard of an index json (paths
    relative to the image root, in sorted order).

    Raises:
        casfs.InvalidSafetensors: a malformed index json; casfs.PathNotFound."""
    if not path.endswith(".json"):
        return [path]
    import casfs

    entry = image.lookup(path)
    shards = casfs.parse_safetensors_index(lambda: image.read_entry(entry), image.stat(path).size, path,
                                           f"{path} (image {image.name})")
    return sorted(shards)  # already resolved against the index's directory
