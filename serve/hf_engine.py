"""TransformersEngine: the :class:`serve.engine.Engine` over a Hugging Face ``transformers``
model, for hosts where vLLM cannot run (the GPU machine: vLLM needs ~916 MB of packages it
lacks) and on the CPU (CI covers it with a tiny model).

How it runs a model (each part its own module):

* ``serve.hf_model``: the model built on the meta device, its parameters placed in one
  releasable memory region and streamed in from casfs (``snapshot.load_into_module``), not read
  through FUSE;
* ``serve.kvcache``: one static KV cache for the replica's life, reused by every batch (a fresh
  ``StaticCache`` per ``generate()`` call made torch re-record its CUDA graphs every time);
* ``serve.decoding``: eager prefill, then decode steps compiled once (``torch.compile``) and
  recorded as one CUDA graph per batch size (2, 4, 8) on a GPU; eager on the CPU;
* ``serve.batching``: concurrent requests batched by a scheduler thread;
* ``serve.sampling`` / ``serve.textstream``: OpenAI's sampling parameters, log-probabilities,
  incremental detokenisation and stop strings.

GPU snapshots and parking (serve.snapshots, issue 18/12): ``release_device()`` pauses the
scheduler and frees the weights and the KV cache while keeping their addresses (CUDA virtual
memory), so a driver checkpoint of the process carries neither; ``restore_device()`` maps memory
back at the same addresses, streams the weights in again from casfs and zeroes the cache; the
captured graphs then replay as before.

Measured on the H200 before this engine (transformers 5.17 ``generate`` with a static cache and
``reduce-overhead``, Qwen3-0.6B shape): decode 3.2-3.8 ms a step with graphs vs 33-42 ms eager;
a cold boot 112-139 s, most of it inductor. This engine's numbers are in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from .batching import BatchRequest, Scheduler
from .engine import Delta, EngineError, InvalidRequest, SamplingSettings, TokenLogprob, _reseed_process
from .hf_model import ModelWeights, WeightsSource, build_model
from .sampling import RowSampler, sample, token_logprobs
from .textstream import TextStream

__all__ = ["TransformersEngine", "TransformersOptions"]

log = logging.getLogger("serve.hf_engine")

DEFAULT_MAX_MODEL_LEN = 2048
RELOAD_CONCURRENCY = 8


@dataclass
class TransformersOptions:
    """How to run the model.

    ``device``: "auto" (the GPU when torch sees one, else the CPU), "cpu" or "cuda[:N]".
    ``compile``: torch.compile the decode step (None: on a GPU only). ``graphs``: record CUDA
    graphs of the decode step for ``graph_batch_sizes`` (None: on a GPU only; needs a GPU).
    ``max_batch``: most requests in one batch (the KV cache holds this many rows; with graphs
    it is the largest graph size). ``max_model_len``: prompt + completion tokens (default: the
    model's, at most 2048). ``dtype``: the weights' dtype (default: the config's).
    """

    device: str = "auto"
    compile: bool | None = None
    graphs: bool | None = None
    graph_batch_sizes: tuple[int, ...] = (2, 4, 8)
    max_batch: int = 8
    max_model_len: int | None = None
    dtype: str | None = None
    seed: int = 0


class TransformersEngine:
    """See the module docstring. Create with :meth:`start`."""

    def __init__(self) -> None:
        self.model_name = ""
        self.max_model_len = 0
        self.timings: dict[str, float] = {}
        self.device: Any = None
        self._closed = False
        self._shared: Any = None  # serve.shared_weights.AttachedWeights while a shared copy is attached

    # -- start ----------------------------------------------------------------------------------

    @classmethod
    def start(cls, model_dir: str, model_name: str, options: TransformersOptions | None = None,
              weights: WeightsSource | None = None) -> "TransformersEngine":
        """Load ``model_dir`` (config + tokenizer; the weights from ``weights``, a casfs image, or
        from the directory's safetensors when None) and get it ready to serve.

        Blocks for the whole start (imports, weights, KV cache, compile and graph capture).

        Raises:
            EngineError: the model cannot be built, loaded or compiled here (the reason included).
        """
        self = cls()
        try:
            self._start(model_dir, model_name, options or TransformersOptions(), weights)
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - torch/transformers raise many kinds
            raise EngineError(f"the transformers engine could not start on {model_dir}: "
                              f"{type(e).__name__}: {e}") from e
        return self

    def _start(self, model_dir: str, model_name: str, opts: TransformersOptions,
               weights: WeightsSource | None) -> None:
        tm = self.timings
        t = time.perf_counter()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        import transformers  # noqa: F401
        from transformers import AutoTokenizer

        tm["import"] = time.perf_counter() - t
        if opts.device == "auto":
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        else:
            dev = torch.device(opts.device)
            if dev.type == "cuda" and dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        on_gpu = dev.type == "cuda"
        use_graphs = on_gpu if opts.graphs is None else opts.graphs
        if use_graphs and not on_gpu:
            raise EngineError("CUDA graphs need a GPU: run with graphs off on the CPU")
        use_compile = on_gpu if opts.compile is None else opts.compile

        t = time.perf_counter()
        self._tok = AutoTokenizer.from_pretrained(model_dir)
        tm["tokenizer"] = time.perf_counter() - t
        t = time.perf_counter()
        dtype = getattr(torch, opts.dtype) if opts.dtype else None
        model, config = build_model(model_dir, dtype)
        self._config = config
        self._weights = ModelWeights(model, config, dev)
        tm["build"] = time.perf_counter() - t
        t = time.perf_counter()
        if weights is not None:
            self._weights.load(weights)
            tm.update({f"weights_{k}": v for k, v in self._weights.timings.items()})
        else:
            self._weights.load_directory(model_dir)
        tm["weights"] = time.perf_counter() - t
        self.weights_source = weights

        limit = int(getattr(config, "max_position_embeddings", DEFAULT_MAX_MODEL_LEN) or DEFAULT_MAX_MODEL_LEN)
        self.max_model_len = min(limit, opts.max_model_len or DEFAULT_MAX_MODEL_LEN)
        sizes = tuple(sorted(opts.graph_batch_sizes)) if use_graphs else None
        max_batch = sizes[-1] if sizes else opts.max_batch
        t = time.perf_counter()
        from .decoding import Decoder
        from .kvcache import KvCache

        param_dtype = next(model.parameters()).dtype
        self._kv = KvCache(config, max_batch, self.max_model_len, dev, param_dtype)
        tm["kv_cache"] = time.perf_counter() - t
        self._vocab = int(config.vocab_size)
        self._decoder = Decoder(model, self._kv, self._vocab, graph_sizes=sizes, compile=use_compile)
        tm.update(self._decoder.capture())
        self.model_name = model_name
        self._eos = self._eos_ids(model_dir, config)
        self._gen = torch.Generator(device=dev).manual_seed(opts.seed)
        self.config_summary = {"device": str(dev), "dtype": str(param_dtype).replace("torch.", ""),
                               "compile": use_compile, "graph_batch_sizes": list(sizes or []),
                               "max_batch": max_batch, "max_model_len": self.max_model_len,
                               "weights_bytes": self._weights.nbytes, "kv_cache_bytes": self._kv.nbytes,
                               "transformers": transformers.__version__, "torch": torch.__version__}
        self._scheduler = Scheduler(self._run_batch, max_batch, self.max_model_len)

    def _eos_ids(self, model_dir: str, config: Any) -> set[int]:
        ids: set[int] = set()
        for v in (getattr(self._tok, "eos_token_id", None), getattr(config, "eos_token_id", None)):
            ids.update(v if isinstance(v, list) else [v] if v is not None else [])
        try:
            from transformers import GenerationConfig

            g = GenerationConfig.from_pretrained(model_dir).eos_token_id
            ids.update(g if isinstance(g, list) else [g] if g is not None else [])
        except (OSError, ValueError):
            pass
        return {int(i) for i in ids}

    # -- the Engine protocol --------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self._tok, "chat_template", None):
            raise InvalidRequest(f"model {self.model_name} has no chat template: use /v1/completions",
                                 param="messages")
        try:
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja errors
            raise InvalidRequest(f"chat template failed on these messages: {e}", param="messages") from None

    async def generate(self, request_id: str, prompt_ids: list[int],
                       settings: SamplingSettings) -> AsyncIterator[Delta]:
        if self._closed:
            raise EngineError("the engine is closed")
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if len(prompt_ids) + settings.max_tokens > self.max_model_len:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({settings.max_tokens}) "
                                 f"exceeds the context length {self.max_model_len}")
        bad = [i for i in prompt_ids if not 0 <= i < self._vocab]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{self._vocab - 1})",
                                 param="prompt")
        loop = asyncio.get_running_loop()
        req = BatchRequest(request_id, list(prompt_ids), settings, loop, asyncio.Queue())
        self._scheduler.submit(req)
        done = False
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {type(item).__name__}: {item}") from item
                yield item
                if item.finish_reason:
                    done = True
                    return
        finally:
            if not done:
                self._scheduler.abort(req)

    async def check_health(self) -> None:
        if self._closed:
            raise EngineError("the engine is closed")
        if self._scheduler.paused:
            raise EngineError("the engine's device memory is released (parked or being snapshotted)")

    async def reseed(self, seed: int) -> None:
        import torch

        _reseed_process(seed)
        self._gen = torch.Generator(device=self.device).manual_seed(seed)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._scheduler.close)
            self._weights.close_store()
            self._drop_shared()

    def stats(self) -> dict[str, int]:
        """Batches run so far and the most requests one of them held."""
        return {"batches": self._scheduler.batches, "largest_batch": self._scheduler.largest_batch}

    # -- batches (the scheduler's thread) -------------------------------------------------------

    def _generator(self, seed: int | None) -> Any:
        if seed is None:
            return None
        import torch

        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _piece(self, token: int) -> str:
        return self._tok.decode([token])

    def _run_batch(self, batch: list[BatchRequest]) -> None:
        import torch

        with torch.no_grad():
            n = len(batch)
            logits, B = self._decoder.prefill([r.prompt_ids for r in batch])
            samplers: list[RowSampler | None] = [RowSampler(r.settings, self._generator(r.settings.seed))
                                                 for r in batch]
            samplers += [None] * (B - n)
            streams = [TextStream(self._tok, r.settings.stop, self._eos, r.settings.max_tokens) for r in batch]
            live = [True] * n
            while True:
                toks = sample(logits, samplers, self._gen)
                host = toks.tolist()
                for i, r in enumerate(batch):
                    if not live[i]:
                        continue
                    if r.aborted.is_set():
                        live[i] = False
                        continue
                    t = host[i]
                    lps = None
                    if r.settings.logprobs is not None:
                        own, top = token_logprobs(logits[i], t, r.settings.logprobs)
                        lps = [TokenLogprob(self._piece(t), own, [(self._piece(a), v) for a, v in top])]
                    text, finish = streams[i].push(t)
                    samplers[i].record(t, self._vocab, self.device)  # type: ignore[union-attr]
                    r.emit(Delta(text=text, token_ids=[t], logprobs=lps, finish_reason=finish))
                    if finish:
                        live[i] = False
                if not any(live):
                    return
                logits = self._decoder.step(toks)

    # -- device memory (GPU snapshots, parking) ---------------------------------------------------

    def release_device(self, timeout: float = 60.0) -> dict[str, Any]:
        """Finish the running batch, hold new ones, and free the weights and the KV cache while
        keeping their addresses (and unregister a shared host copy of the weights, unless its
        pin mode keeps it registered). Returns bytes freed and seconds.

        Raises:
            EngineError: a batch was still running after ``timeout`` seconds.
        """
        import torch

        t0 = time.perf_counter()
        if not self._scheduler.pause(timeout):
            self._scheduler.resume()
            raise EngineError(f"a batch was still running after {timeout:.0f} s: not releasing the device")
        freed: dict[str, Any] = {"weights_bytes": self._weights.release(), "kv_cache_bytes": self._kv.release()}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # cached blocks would be carried by a driver checkpoint
            host_empty = getattr(torch._C, "_host_emptyCache", None)
            if host_empty is not None:
                host_empty()  # the loader's pinned staging buffers, cached by torch
            # what stays on the GPU (the driver checkpoint carries it): torch's blocks (CUDA
            # graph pools, static buffers) and, beyond them, the context, kernels and workspaces
            free, total = torch.cuda.mem_get_info(self.device)
            freed.update(torch_allocated_bytes=torch.cuda.memory_allocated(self.device),
                         torch_reserved_bytes=torch.cuda.memory_reserved(self.device),
                         device_free_bytes=free, device_total_bytes=total)
        shared = getattr(self, "_shared", None)
        if shared is not None:
            try:
                freed["shared_weights"] = shared.unpin(parking=True)
            except Exception as e:  # noqa: BLE001 - CasfsError: dropped, the next unpark re-reads
                log.warning("unpinning the shared weights failed (%s): dropping them", e)
                self._drop_shared()
        return {**freed, "seconds": time.perf_counter() - t0}

    def _drop_shared(self) -> None:
        shared, self._shared = getattr(self, "_shared", None), None
        if shared is not None:
            try:
                shared.close()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def _attach_shared(self, spec: dict | None) -> tuple[Any, dict[str, Any]]:
        """The pinned tier lending the supervisor's shared weights (attached once), pinned for
        this load; (None, reason) when there is none or it cannot be used (the load then reads
        from casfs)."""
        if not spec:
            self._drop_shared()
            return None, {}
        from .shared_weights import AttachedWeights

        info: dict[str, Any] = {}
        try:
            cur = getattr(self, "_shared", None)
            if cur is None or not cur.matches(spec):
                self._drop_shared()
                cur = self._shared = AttachedWeights(spec, self.device)
                info["attach_s"] = cur.attach_s
            cur.pin_mode = spec.get("pin", "unpark")
            info.update(cur.pin())
            return cur.tier, info
        except Exception as e:  # noqa: BLE001 - CasfsError, CUDA refusals: fall back to casfs reads
            self._drop_shared()
            log.warning("the shared weights cannot be used (%s): reading them from casfs", e)
            return None, {"error": f"{type(e).__name__}: {e}"}

    def restore_device(self, weights: WeightsSource | None = None, shared: dict | None = None) -> dict[str, Any]:
        """Memory back at the same addresses, the weights streamed in again (from ``weights``,
        default the source they were first loaded from; chunks the supervisor's shared host copy
        holds, ``shared`` = ``HostWeights.spec()``, are copied from it at pinned speed instead),
        the KV cache zeroed; batches resume.

        Raises:
            EngineError: the weights could not be loaded (the engine stays paused).
        """
        src = weights or self.weights_source
        t0 = time.perf_counter()
        self._kv.remap()
        t1 = time.perf_counter()
        self._weights.remap()
        pinned, shared_info = self._attach_shared(shared)
        t_shared = time.perf_counter() - t1
        try:
            if src is not None:
                # fewer loader threads than a cold load: each holds pinned staging slots, which
                # are allocated again after a release (measured on the H200: 16 threads reloaded
                # 1.19 GB at 2.5 GiB/s after a restore)
                stats = self._weights.load(src, concurrency=RELOAD_CONCURRENCY, pinned=pinned, keep_open=True)
            else:
                raise EngineError("no casfs weights source to reload the weights from")
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"reloading the weights failed: {type(e).__name__}: {e}") from e
        t2 = time.perf_counter()
        self._scheduler.resume()
        out = {"kv_cache": t1 - t0, "weights": t2 - t1, "weights_bytes": stats.bytes,
               "weights_gib_s": stats.gib_per_s, "weights_tiers": stats.tiers,
               "weights_steps": dict(self._weights.timings)}
        if shared:
            out["shared_weights"] = {**shared_info, "setup_s": t_shared, "pinned_bytes": stats.pinned_bytes,
                                     "copy_s": stats.seconds,
                                     "copy_gib_s": stats.bytes / (1 << 30) / stats.seconds if stats.seconds else 0.0}
        return out
