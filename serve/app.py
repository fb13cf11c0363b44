"""The OpenAI-compatible HTTP API over an :class:`serve.engine.Engine`.

Endpoints:
    POST /v1/completions         text completion (``stream`` for SSE)
    POST /v1/chat/completions    chat completion (``stream`` for SSE)
    GET  /v1/models, /v1/models/{id}
    GET  /health                 200 only when a request can be served (engine up, boot done)
    GET  /metrics                Prometheus text: boot phases, requests, latency, tokens
    GET  /boot                   this replica's boot report (JSON)

Every error is an OpenAI-style object ``{"error": {"message", "type", "param", "code"}}``
with a 4xx/5xx status: malformed JSON and invalid fields 400 (``invalid_request_error``), an
unknown model 404 (``model_not_found``), a prompt that does not fit the context 400
(``context_length_exceeded``), an engine failure 500/503. An error after a stream started
is sent as a final ``data: {"error": ...}`` event. A client that disconnects has its
generation aborted (the HTTP layer cancels the handler or closes the stream). Nothing a
client sends stops the server.

Supported request fields: model, prompt (a string, one-string list, or token id list) /
messages (role + string or text-part content), max_tokens (max_completion_tokens for chat),
temperature, top_p, seed, stop, presence_penalty, frequency_penalty, stream,
stream_options.include_usage, logprobs (+ top_logprobs for chat), n=1, user. Fields that ask
for something not supported (n>1, best_of>1, echo, suffix, logit_bias, tools) are refused
with 400 rather than silently ignored; unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from . import metrics as metrics_mod
from .engine import Delta, Engine, EngineError, InvalidRequest, SamplingSettings, TokenLogprob
from .http import Request, Response, StreamResponse

log = logging.getLogger("serve.app")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An OpenAI-style error answer: HTTP ``status`` plus the error object's fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def error_response(status: int, message: str, *, type: str | None = None, param: str | None = None,
                   code: str | None = None) -> Response:
    """An OpenAI-style error object as a Response (also used for HTTP protocol errors)."""
    if type is None:
        type = "invalid_request_error" if status < 500 else "server_error"
    e = ApiError(status, message, type=type, param=param, code=code)
    return _json(status, e.body())


def _json(status: int, obj: Any) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


@dataclass
class _Job:
    """A validated generation request."""

    kind: str  # "completion" | "chat"
    request_id: str
    model: str
    prompt_ids: list[int]
    settings: SamplingSettings
    stream: bool
    include_usage: bool
    created: int


class ServeApp:
    """Routes requests to the engine; see the module docstring.

    Args:
        engine: the model engine, or None while it is still booting (generation endpoints and
            /health answer 503 until ``set_engine``).
        metrics: where request and boot metrics go (a fresh registry if None).
        served_names: model names accepted in requests (default: the engine's model_name).
        boot_report: a callable returning the boot report dict for /boot (None: 404).
    """

    def __init__(self, engine: Engine | None = None, *, metrics: metrics_mod.ServeMetrics | None = None,
                 served_names: list[str] | None = None,
                 boot_report: Callable[[], dict | None] | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or metrics_mod.ServeMetrics()
        self._names = list(served_names) if served_names else None
        self._boot_report = boot_report
        self.ready = engine is not None
        self.created = int(time.time())

    def set_engine(self, engine: Engine, *, ready: bool = True) -> None:
        """Attach the engine once booted; ``ready`` makes /health answer 200."""
        self.engine = engine
        self.ready = ready

    @property
    def served_names(self) -> list[str]:
        if self._names:
            return self._names
        return [self.engine.model_name] if self.engine is not None else []

    # -- routing -------------------------------------------------------------------------------

    async def handle(self, req: Request) -> Response | StreamResponse:
        """The HTTP handler (for serve.http.HttpServer)."""
        t0 = time.monotonic()
        endpoint = _endpoint_label(req.path)
        try:
            resp = await self._route(req, t0)
        except ApiError as e:
            resp = _json(e.status, e.body())
        except asyncio.CancelledError:  # the client went away before the answer was ready
            self.metrics.disconnects.inc(endpoint=endpoint)
            self.metrics.requests.inc(endpoint=endpoint, status="499")
            raise
        except Exception as e:  # noqa: BLE001 - report, keep serving
            log.exception("request to %s failed", req.path)
            resp = error_response(500, f"internal server error: {type(e).__name__}: {e}")
        if isinstance(resp, Response):
            self.metrics.requests.inc(endpoint=endpoint, status=str(resp.status))
            self.metrics.latency.observe(time.monotonic() - t0, endpoint=endpoint)
        return resp

    async def _route(self, req: Request, t0: float) -> Response | StreamResponse:
        path = req.path.rstrip("/") or "/"
        routes: dict[str, dict[str, Callable]] = {
            "/v1/completions": {"POST": lambda: self._generate(req, "completion", t0)},
            "/v1/chat/completions": {"POST": lambda: self._generate(req, "chat", t0)},
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
            "/metrics": {"GET": self._metrics},
            "/boot": {"GET": self._boot},
        }
        if path.startswith("/v1/models/"):
            if req.method != "GET":
                raise ApiError(405, f"method {req.method} is not allowed on {path}; use GET")
            return self._model(path[len("/v1/models/"):])
        methods = routes.get(path)
        if methods is None:
            raise ApiError(404, f"no route {req.method} {req.path}: see /v1/models, /v1/completions, "
                                f"/v1/chat/completions, /health, /metrics", code="not_found")
        fn = methods.get(req.method)
        if fn is None:
            raise ApiError(405, f"method {req.method} is not allowed on {path}; use {', '.join(methods)}")
        out = fn()
        return await out if asyncio.iscoroutine(out) else out

    # -- simple endpoints ----------------------------------------------------------------------

    def _model_card(self, name: str) -> dict:
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "casfs"}
        if self.engine is not None:
            card["max_model_len"] = self.engine.max_model_len
        return card

    def _models(self) -> Response:
        return _json(200, {"object": "list", "data": [self._model_card(n) for n in self.served_names]})

    def _model(self, name: str) -> Response:
        if name not in self.served_names:
            raise _model_not_found(name)
        return _json(200, self._model_card(name))

    async def _health(self) -> Response:
        if self.engine is None or not self.ready:
            return error_response(503, "booting: the engine is not ready yet", code="not_ready")
        try:
            await self.engine.check_health()
        except EngineError as e:
            return error_response(503, str(e), code="engine_unhealthy")
        return _json(200, {"status": "ok", "model": self.served_names})

    def _metrics(self) -> Response:
        return Response(200, self.metrics.render().encode(), content_type=metrics_mod.CONTENT_TYPE)

    def _boot(self) -> Response:
        report = self._boot_report() if self._boot_report else None
        if report is None:
            raise ApiError(404, "no boot report (this replica was not started by serve.boot)", code="not_found")
        return _json(200, report)

    # -- generation ----------------------------------------------------------------------------

    async def _generate(self, req: Request, kind: str, t0: float) -> Response | StreamResponse:
        body = _parse_json(req)
        engine = self.engine
        if engine is None or not self.ready:
            raise ApiError(503, "the server is still booting; retry shortly", type="server_error",
                           code="not_ready")
        job = await self._validate(body, kind, engine)
        endpoint = _endpoint_label(req.path)
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        if job.stream:
            return StreamResponse(200, self._sse(job, engine, t0, endpoint),
                                  on_disconnect=lambda: self.metrics.disconnects.inc(endpoint=endpoint))
        return await self._complete(job, engine, t0, endpoint)

    async def _validate(self, body: dict, kind: str, engine: Engine) -> _Job:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model name (see GET /v1/models)", param="model")
        if model not in self.served_names:
            raise _model_not_found(model)
        _refuse_unsupported(body, kind)
        stream = _get(body, "stream", bool, False)
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        if opts is not None and not stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        include_usage = bool((opts or {}).get("include_usage", False))

        if kind == "completion":
            prompt_ids = await self._completion_prompt(body.get("prompt"), engine)
            max_tokens = _get_int(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
            logprobs = _get_int(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
        else:
            prompt_ids = await self._chat_prompt(body.get("messages"), engine)
            max_tokens = _get_int(body, "max_completion_tokens", None)
            if max_tokens is None:
                max_tokens = _get_int(body, "max_tokens", None)
            want = _get(body, "logprobs", bool, False)
            top = _get_int(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
            if top is not None and not want:
                raise ApiError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
            logprobs = (top or 0) if want else None
        n_prompt = len(prompt_ids)
        limit = engine.max_model_len
        param = "prompt" if kind == "completion" else "messages"
        if n_prompt >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your "
                                f"prompt has {n_prompt} tokens. Please reduce the length of the prompt.",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - n_prompt
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}",
                           param="max_tokens" if kind == "completion" or "max_tokens" in body
                           else "max_completion_tokens", code="invalid_value")
        if n_prompt + max_tokens > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                                f"{max_tokens} in the completion). Please reduce the length of the prompt "
                                f"or the completion.", param=param, code="context_length_exceeded")
        temperature = _get_float(body, "temperature", 1.0, lo=0.0, hi=2.0)
        top_p = _get_float(body, "top_p", 1.0, lo=0.0, hi=1.0)
        if top_p == 0.0:
            raise ApiError(400, "top_p must be greater than 0", param="top_p", code="invalid_value")
        settings = SamplingSettings(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            seed=_get_int(body, "seed", None, lo=-(2 ** 63), hi=2 ** 63 - 1),
            stop=_stop(body.get("stop")),
            presence_penalty=_get_float(body, "presence_penalty", 0.0, lo=-2.0, hi=2.0),
            frequency_penalty=_get_float(body, "frequency_penalty", 0.0, lo=-2.0, hi=2.0),
            logprobs=logprobs)
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        return _Job(kind=kind, request_id=f"{prefix}-{uuid.uuid4().hex}", model=model, prompt_ids=prompt_ids,
                    settings=settings, stream=stream, include_usage=include_usage, created=int(time.time()))

    async def _completion_prompt(self, prompt: Any, engine: Engine) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return await asyncio.to_thread(engine.encode, prompt, add_special_tokens=True)
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            if any(t < 0 for t in prompt):
                raise ApiError(400, "prompt token ids must be non-negative", param="prompt")
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) > 1:
            raise ApiError(400, "only one prompt per request is supported; send one request per prompt",
                           param="prompt")
        raise ApiError(400, "prompt must be a non-empty string, a list of one string, or a list of "
                            "token ids", param="prompt")

    async def _chat_prompt(self, messages: Any, engine: Engine) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object", param="messages")
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "developer", "user", "assistant"):
                raise ApiError(400, f"messages[{i}].role must be system, developer, user or assistant, "
                                    f"got {role!r}", param="messages")
            if isinstance(content, list):  # text parts
                parts = []
                for p in content:
                    if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                        raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                       param="messages")
                    parts.append(p["text"])
                content = "".join(parts)
            if content is None and role == "assistant":
                content = ""
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                               param="messages")
            clean.append({"role": "system" if role == "developer" else role, "content": content})
        try:
            text = engine.render_chat(clean)
        except InvalidRequest as e:
            raise ApiError(400, str(e), param=e.param or "messages") from None
        return await asyncio.to_thread(engine.encode, text, add_special_tokens=False)

    async def _complete(self, job: _Job, engine: Engine, t0: float, endpoint: str) -> Response:
        text, n_tokens, lps, finish, first = [], 0, [], None, None
        self.metrics.running.add(1)
        try:
            async for d in _checked(engine.generate(job.request_id, job.prompt_ids, job.settings)):
                if first is None and d.token_ids:
                    first = time.monotonic()
                    self.metrics.ttft.observe(first - t0, endpoint=endpoint)
                text.append(d.text)
                n_tokens += len(d.token_ids)
                if d.logprobs:
                    lps.extend(d.logprobs)
                if d.finish_reason:
                    finish = d.finish_reason
        finally:
            self.metrics.running.add(-1)
            self.metrics.generation_tokens.inc(n_tokens)
        usage = _usage(len(job.prompt_ids), n_tokens)
        content = "".join(text)
        lp = None if job.settings.logprobs is None else _logprobs_obj(job.kind, lps, job.settings.logprobs)
        if job.kind == "completion":
            choice = {"index": 0, "text": content, "logprobs": lp, "finish_reason": finish or "stop"}
            obj = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": content},
                      "logprobs": lp, "finish_reason": finish or "stop"}
            obj = "chat.completion"
        return _json(200, {"id": job.request_id, "object": obj, "created": job.created, "model": job.model,
                           "choices": [choice], "usage": usage})

    async def _sse(self, job: _Job, engine: Engine, t0: float, endpoint: str) -> AsyncIterator[bytes]:
        obj = "text_completion" if job.kind == "completion" else "chat.completion.chunk"
        base = {"id": job.request_id, "object": obj, "created": job.created, "model": job.model}
        n_tokens, first, status = 0, None, "200"
        self.metrics.running.add(1)
        try:
            if job.kind == "chat":
                yield _event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]})
            try:
                async for d in _checked(engine.generate(job.request_id, job.prompt_ids, job.settings)):
                    if first is None and d.token_ids:
                        first = time.monotonic()
                        self.metrics.ttft.observe(first - t0, endpoint=endpoint)
                    n_tokens += len(d.token_ids)
                    if not d.text and not d.finish_reason:
                        continue
                    lp = None if job.settings.logprobs is None else \
                        _logprobs_obj(job.kind, d.logprobs or [], job.settings.logprobs)
                    if job.kind == "completion":
                        choice = {"index": 0, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
                    else:
                        delta = {"content": d.text} if d.text else {}
                        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
                    yield _event({**base, "choices": [choice]})
            except ApiError as e:  # the stream already started: the error is its last event
                status = str(e.status)
                yield _event(e.body())
                yield b"data: [DONE]\n\n"
                return
            if job.include_usage:
                yield _event({**base, "choices": [], "usage": _usage(len(job.prompt_ids), n_tokens)})
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status = "499"
            raise
        finally:
            self.metrics.running.add(-1)
            self.metrics.generation_tokens.inc(n_tokens)
            self.metrics.requests.inc(endpoint=endpoint, status=status)
            self.metrics.latency.observe(time.monotonic() - t0, endpoint=endpoint)


async def _checked(gen: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """Iterate an engine stream, mapping engine errors to API errors; closing this closes ``gen``."""
    try:
        async for d in gen:
            yield d
    except InvalidRequest as e:
        raise ApiError(400, str(e), param=e.param) from None
    except EngineError as e:
        raise ApiError(500, str(e), type="server_error", code="engine_error") from None
    finally:
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            await aclose()


# -- helpers ------------------------------------------------------------------------------------


def _endpoint_label(path: str) -> str:
    p = path.rstrip("/") or "/"
    known = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/boot")
    if p in known:
        return p
    return "/v1/models/{id}" if p.startswith("/v1/models/") else "other"


def _model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist (see GET /v1/models).", param="model",
                    code="model_not_found")


def _parse_json(req: Request) -> dict:
    ctype = req.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise ApiError(415, f"Content-Type must be application/json, got {ctype!r}")
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request ({e}). The body must be "
                            f"a JSON object.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", code="invalid_json")
    return body


def _get(body: dict, name: str, typ: type, default: Any) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
        raise ApiError(400, f"{name} must be a {typ.__name__}, got {json.dumps(v)[:60]}", param=name)
    return v


def _get_int(body: dict, name: str, default: int | None, *, lo: int | None = None,
             hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if type(v) is not int:
        raise ApiError(400, f"{name} must be an integer, got {json.dumps(v)[:60]}", param=name, code="invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {v}", param=name, code="invalid_value")
    return v


def _get_float(body: dict, name: str, default: float, *, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(v)[:60]}", param=name, code="invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {v}", param=name, code="invalid_value")
    return float(v)


def _stop(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if len(v) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"stop may hold at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return tuple(s for s in v if s)


def _refuse_unsupported(body: dict, kind: str) -> None:
    """400 for fields that ask for behaviour this server does not implement."""
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "only n=1 is supported; send several requests instead", param="n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise ApiError(400, "best_of is not supported", param="best_of")
    if body.get("echo"):
        raise ApiError(400, "echo is not supported", param="echo")
    if body.get("suffix"):
        raise ApiError(400, "suffix is not supported", param="suffix")
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    if kind == "chat" and (body.get("tools") or body.get("functions")):
        raise ApiError(400, "tool and function calling are not supported", param="tools")


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs_obj(kind: str, lps: list[TokenLogprob], top: int) -> dict:
    if kind == "completion":
        return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
                "top_logprobs": [dict(t.top[:top]) if top else None for t in lps], "text_offset": _offsets(lps)}
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
                         "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                                          for s, lp in t.top[:top]]} for t in lps]}


def _offsets(lps: list[TokenLogprob]) -> list[int]:
    out, pos = [], 0
    for t in lps:
        out.append(pos)
        pos += len(t.token)
    return out


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
