"""The Engine protocol the HTTP API is written against, and its vLLM implementation.

The API layer (serve/app.py) owns the OpenAI surface: validation, errors, streaming, metrics.
An :class:`Engine` owns the model: tokenizing, chat templates, generating. Two implement it:
:class:`VllmEngine` (here; vLLM's ``AsyncLLM``, imported only when one is created, so this
module imports without vLLM) and :class:`serve.echo.EchoEngine` (a deterministic stand-in
used by the API tests where vLLM is not installed).

Contract of ``generate``: an async iterator of :class:`Delta` (new text and tokens since the
last one); the last delta has ``finish_reason`` set. Closing or cancelling the iterator
aborts the request inside the engine. Errors: :class:`InvalidRequest` for a request the
engine refuses (the API answers 400), :class:`EngineError` when the engine itself failed
(the API answers 500/503).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol, runtime_checkable

log = logging.getLogger("serve.engine")


class InvalidRequest(ValueError):
    """The engine refuses this request as given (bad prompt, parameters out of range).

    ``param`` names the offending request field where known.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineError(RuntimeError):
    """The engine failed (crashed, dead, out of memory); the request was not served."""


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample one completion. ``temperature == 0`` means greedy decoding.

    ``logprobs``: None for no log-probabilities, else how many top alternatives to return per
    generated token (0: only the sampled token's own log-probability).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None


@dataclass
class TokenLogprob:
    """A generated token's text and natural-log probability, with the top alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New output since the previous delta of the same request."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last delta


@runtime_checkable
class Engine(Protocol):
    """What the API needs from a model engine."""

    model_name: str  # the name served in /v1/models
    max_model_len: int  # prompt + completion tokens, at most

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for chat ``messages`` (role/content dicts), ending where the
        assistant's reply begins. Raises InvalidRequest if the model has no chat template."""

    def generate(self, request_id: str, prompt_ids: list[int],
                 settings: SamplingSettings) -> AsyncIterator[Delta]:
        """Generate a completion of ``prompt_ids``; see the module docstring."""

    async def check_health(self) -> None:
        """Return if the engine can serve; raise EngineError if not."""

    async def reseed(self, seed: int) -> None:
        """Reseed every random generator sampling uses (after a snapshot restore, so that
        replicas restored from one snapshot do not draw the same random numbers)."""

    async def close(self) -> None:
        """Stop the engine and free its resources."""

    # Optional (the worker calls it where an engine has it): ``async release_for_snapshot() ->
    # dict[str, int]``: just before a CPU snapshot, drop what is cheaper to recreate after a
    # restore than to restore (cached prefixes, the KV cache's pages, freed heap); the engine
    # must still serve correctly afterwards. Returns counts for the boot report.


# -- vLLM --------------------------------------------------------------------------------------

#: Environment for vLLM on a CPU host, offline. Set by the worker before importing vLLM.
VLLM_CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # lets VllmEngine.reseed send a function to the EngineCore process (local IPC only)
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}

#: The fast-boot flags (2-core CI): the model runs inside the EngineCore process and OpenMP
#: threads are not pinned. With them and --enforce-eager a cold boot is ~3x faster.
VLLM_FAST_BOOT_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}

_TIMING_PATTERNS = {
    "weights": re.compile(r"Loading weights took ([0-9.]+) seconds"),
    "model_load": re.compile(r"Model loading took [0-9.]+ \w+ (?:memory )?and ([0-9.]+) seconds"),
    "compile": re.compile(r"torch\.compile takes ([0-9.]+) s in total"),
    "engine_init": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+)"),
}


def parse_vllm_timings(log_text: str) -> dict[str, float]:
    """Durations (seconds) vLLM logs about its own start: ``weights`` (loading the checkpoint
    into the model), ``compile`` (torch.compile, absent in eager mode), ``engine_init``
    (profiling, KV cache, model warmup). The last occurrence of each wins; missing ones are
    left out. vLLM logs these from its EngineCore process, so they are read from the log."""
    out: dict[str, float] = {}
    for name, pat in _TIMING_PATTERNS.items():
        found = pat.findall(log_text)
        if found:
            out[name] = float(found[-1])
    return out


@dataclass
class VllmOptions:
    """How to start vLLM: ``enforce_eager`` skips torch.compile; ``max_model_len`` None takes
    the model's own; ``extra`` are further AsyncEngineArgs fields."""

    enforce_eager: bool = True
    max_model_len: int | None = None
    dtype: str = "auto"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class VllmEngine:
    """:class:`Engine` over vLLM's ``AsyncLLM`` (V1 engine: an EngineCore child process).

    Create with :meth:`start` inside the serving event loop. vLLM starts its EngineCore with
    the ``spawn`` method, so the program's main module must be import-safe (``if __name__ ==
    "__main__":``), as serve/worker.py is.
    """

    def __init__(self, llm: Any, model_name: str, max_model_len: int, tokenizer: Any) -> None:
        self._llm = llm
        self.model_name = model_name
        self.max_model_len = max_model_len
        self._tok = tokenizer
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        self._SamplingParams = SamplingParams
        self._DELTA = RequestOutputKind.DELTA

    @staticmethod
    def preload() -> None:
        """Import vLLM's engine modules (the bulk of a cold start's import time)."""
        for k, v in VLLM_CPU_ENV.items():
            os.environ.setdefault(k, v)
        import vllm.engine.arg_utils  # noqa: F401
        import vllm.v1.engine.async_llm  # noqa: F401

    @classmethod
    def start(cls, model_dir: str, model_name: str, options: VllmOptions | None = None,
              weights: dict | None = None) -> "VllmEngine":
        """Load ``model_dir`` (a Hugging Face style directory) into a new vLLM engine.

        With ``weights`` (``{"store", "image", "path", "cache_dir"}``), ``model_dir`` needs the
        config and tokenizer only: the weights are streamed from that casfs image through the
        ``casfs`` load format (serve.vllm_loader), registered here first.

        Blocks for the whole engine start (seconds to minutes: imports, weights, KV cache,
        torch.compile unless eager).

        Raises:
            EngineError: when vLLM cannot start (its own message is included).
        """
        opts = options or VllmOptions()
        for k, v in VLLM_CPU_ENV.items():
            os.environ.setdefault(k, v)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from .vllm_procfix import apply as fix_proc_reads

        fix_proc_reads()  # in a snapshot's PID namespace (the model workers: vllm_loader.register)
        extra = dict(opts.extra)
        if weights is not None:
            from .vllm_loader import LOAD_FORMAT, register

            register()
            os.environ["CASFS_VLLM_LOAD_FORMAT"] = "1"  # the EngineCore child registers it too (serve.worker)
            extra.setdefault("load_format", LOAD_FORMAT)
            extra.setdefault("model_loader_extra_config", dict(weights))
        args = AsyncEngineArgs(model=model_dir, served_model_name=model_name, enforce_eager=opts.enforce_eager,
                               max_model_len=opts.max_model_len, dtype=opts.dtype, seed=opts.seed,
                               disable_log_stats=True, **extra)
        try:
            llm = AsyncLLM.from_engine_args(args)
        except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; the message is what matters
            raise EngineError(f"vLLM could not start on {model_dir}: {type(e).__name__}: {e}") from e
        return cls(llm, model_name, llm.model_config.max_model_len, llm.get_tokenizer())

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self._tok, "chat_template", None):
            raise InvalidRequest(f"model {self.model_name} has no chat template: use /v1/completions",
                                 param="messages")
        try:
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja errors (e.g. a role the template rejects)
            raise InvalidRequest(f"chat template failed on these messages: {e}", param="messages") from None

    async def generate(self, request_id: str, prompt_ids: list[int],
                       settings: SamplingSettings) -> AsyncIterator[Delta]:
        from vllm.exceptions import VLLMClientError, VLLMServerError

        try:
            params = self._SamplingParams(
                max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p,
                seed=settings.seed, stop=list(settings.stop) or None,
                presence_penalty=settings.presence_penalty, frequency_penalty=settings.frequency_penalty,
                logprobs=settings.logprobs, output_kind=self._DELTA)
        except (ValueError, VLLMClientError) as e:
            raise InvalidRequest(str(e)) from None
        stream = self._llm.generate({"prompt_token_ids": prompt_ids}, params, request_id)
        try:
            async for out in stream:
                c = out.outputs[0]
                lps = None
                if settings.logprobs is not None and c.logprobs is not None:
                    lps = [_token_logprob(tid, d, settings.logprobs) for tid, d in zip(c.token_ids, c.logprobs)]
                finish = None
                if out.finished:
                    finish = "length" if c.finish_reason == "length" else "stop"
                yield Delta(text=c.text, token_ids=list(c.token_ids), logprobs=lps, finish_reason=finish)
        except (ValueError, VLLMClientError) as e:
            raise InvalidRequest(str(e)) from None
        except VLLMServerError as e:
            raise EngineError(f"vLLM failed this request: {type(e).__name__}: {e}") from e
        finally:
            await stream.aclose()

    async def check_health(self) -> None:
        try:
            await self._llm.check_health()
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"vLLM engine is not healthy: {type(e).__name__}: {e}") from e

    async def reseed(self, seed: int) -> None:
        """Reseed Python, numpy and torch generators in this process and in vLLM's model
        workers (the EngineCore process), where unseeded sampling draws its randomness."""
        _reseed_process(seed)
        try:
            await self._llm.collective_rpc(_reseed_worker, args=(seed,))
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"could not reseed vLLM's workers: {type(e).__name__}: {e}") from e

    async def release_for_snapshot(self) -> dict[str, int]:
        """Before a CPU snapshot: forget cached prefixes (their KV blocks are about to be
        zeroed), hand the KV cache's pages back to the kernel in every model worker
        (``madvise(MADV_DONTNEED)``: a restored worker finds zero pages there, as a fresh
        ``torch.zeros`` allocation would give it, and the kernel supplies them on first touch),
        and trim freed heap (``gc.collect`` + ``malloc_trim``) in the workers and here.

        vLLM's own sleep mode does not run on CPU (its CPU worker ignores it), hence this.
        Measured on the tiny model (default config, 1 GiB KV cache): docs/benchmarks.md.

        Raises:
            EngineError: when a worker could not release its memory.
        """
        try:
            await self._llm.reset_prefix_cache()
            per_worker = await self._llm.collective_rpc(_release_worker_memory)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"could not release vLLM's memory before the snapshot: "
                              f"{type(e).__name__}: {e}") from e
        out = {"kv_cache_bytes": 0, "workers": 0}
        for r in per_worker or []:
            out["kv_cache_bytes"] += int((r or {}).get("kv_cache_bytes", 0))
            out["workers"] += 1
        trim_heap()
        return out

    #: seconds vLLM's EngineCore process gets to finish its own teardown when the engine is
    #: closed before it is killed: its teardown took 5.0 s of a measured 5.75 s SIGTERM stop
    #: (vLLM's default bound), with nothing left to save (requests were already ended)
    shutdown_timeout = 1.0

    async def close(self) -> None:
        self._llm.shutdown(timeout=self.shutdown_timeout)


def _reseed_process(seed: int) -> None:
    import random
    import sys

    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (1 << 32))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def _reseed_worker(worker: Any, seed: int) -> None:
    """Runs inside each vLLM worker (collective_rpc passes the worker first)."""
    _reseed_process(seed)


MADV_DONTNEED = 4


def trim_heap() -> None:
    """Free Python's garbage and hand glibc's free heap pages back to the kernel (this process)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def release_pages(ptr: int, nbytes: int) -> int:
    """``madvise(MADV_DONTNEED)`` the whole pages inside [ptr, ptr+nbytes) of private anonymous
    memory: their contents become zero pages the kernel supplies on the next touch. Returns the
    bytes released (0 when the range holds no whole page).

    Raises:
        OSError: when madvise fails.
    """
    import ctypes

    page = os.sysconf("SC_PAGESIZE")
    start = (ptr + page - 1) // page * page
    end = (ptr + nbytes) // page * page
    if end <= start:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(start, end - start, MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_DONTNEED) of {end - start} bytes: {os.strerror(err)}")
    return end - start


def _release_worker_memory(worker: Any) -> dict[str, int]:
    """Runs inside each vLLM worker (collective_rpc): zero the KV cache's pages (CPU tensors
    only; one storage may back several layers' views), then trim the heap."""
    seen: dict[int, int] = {}
    for t in getattr(getattr(worker, "model_runner", None), "kv_caches", None) or []:
        if getattr(t, "device", None) is None or t.device.type != "cpu":
            continue
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    released = sum(release_pages(p, n) for p, n in seen.items())
    trim_heap()
    return {"kv_cache_bytes": released}


def _token_logprob(token_id: int, entry: dict, top: int) -> TokenLogprob:
    """vLLM's {token_id: Logprob(logprob, rank, decoded_token)} -> TokenLogprob."""
    own = entry.get(token_id)
    ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30))
    alts = [(lp.decoded_token or "", float(lp.logprob)) for tid, lp in ranked][:top] if top else []
    return TokenLogprob(token=(own.decoded_token or "") if own else "",
                        logprob=float(own.logprob) if own else float("nan"), top=alts)
