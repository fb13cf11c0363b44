"""EchoEngine: a small deterministic :class:`serve.engine.Engine` that stands in for vLLM.

It exists so the whole OpenAI API surface (validation, error objects, SSE streaming,
client-disconnect aborts, /v1/models, /health, /metrics) can be exercised for real, with the
official client over real sockets, where vLLM is not installed (the main .venv, CI's fast
tests). It is a real engine, not a mock: it tokenizes (one token per Unicode character, id =
code point + 3; ids 0/1/2 are unk/bos/eos), enforces its context length, honours max_tokens,
stop strings and logprobs, and aborts a request when its iterator is closed.

Its "model": the completion of a prompt is the prompt's own characters read backwards
starting from its last one, cycling, so every output is predictable from the prompt alone
(``"abc"`` continues ``"cbacbacba..."``). Sampling settings other than max_tokens, stop and
logprobs are accepted and ignored: it always decodes greedily. ``token_delay`` (seconds) makes
each token take that long, so tests can disconnect mid-stream.
"""

from __future__ import annotations

import asyncio
import math
from typing import AsyncIterator

from .engine import Delta, EngineError, InvalidRequest, SamplingSettings, TokenLogprob

BOS, EOS, OFFSET = 1, 2, 3


class EchoEngine:
    """A deterministic engine; see the module docstring.

    Attributes (for tests to observe): ``started``, ``finished`` and ``aborted`` are the
    request ids that began, ran to their end, and were closed early; ``healthy`` can be set
    False to make ``check_health`` fail.
    """

    def __init__(self, model_name: str = "echo", *, max_model_len: int = 256,
                 token_delay: float = 0.0) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.token_delay = token_delay
        self.started: list[str] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.healthy = True
        self.seed: int | None = None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) + OFFSET for c in text]
        return [BOS] + ids if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - OFFSET) for i in ids if i >= OFFSET)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise InvalidRequest(f"the echo engine's chat template has no role {m['role']!r}",
                                     param="messages")
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    async def generate(self, request_id: str, prompt_ids: list[int],
                       settings: SamplingSettings) -> AsyncIterator[Delta]:
        if len(prompt_ids) + settings.max_tokens > self.max_model_len:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({settings.max_tokens}) "
                                 f"exceeds the context length {self.max_model_len}")
        if not self.healthy:
            raise EngineError("echo engine is marked unhealthy")
        chars = [i for i in prompt_ids if i >= OFFSET][::-1] or [ord(" ") + OFFSET]
        stops = [x for x in settings.stop if x]
        hold = max((len(x) for x in stops), default=1) - 1  # chars that may start a stop string
        self.started.append(request_id)
        done = False
        try:
            text, ids, sent = "", [], 0
            for n in range(settings.max_tokens):
                await asyncio.sleep(self.token_delay)
                tid = chars[n % len(chars)]
                text += chr(tid - OFFSET)
                ids.append(tid)
                hits = [i for i in (text.find(x) for x in stops) if i >= 0]
                if hits:  # the output ends before the stop string, which is not returned
                    end = min(hits)
                    done = True
                    yield self._delta(text[sent:end], ids[sent:end], settings, "stop")
                    return
                last = n == settings.max_tokens - 1
                end = len(text) if last else max(sent, len(text) - hold)
                if end > sent or last:
                    done = last
                    yield self._delta(text[sent:end], ids[sent:end], settings, "length" if last else None)
                    sent = end
        finally:
            (self.finished if done else self.aborted).append(request_id)

    def _delta(self, text: str, ids: list[int], settings: SamplingSettings, finish: str | None) -> Delta:
        return Delta(text=text, token_ids=ids, logprobs=self._lp(ids, settings), finish_reason=finish)

    def _lp(self, ids: list[int], settings: SamplingSettings) -> list[TokenLogprob] | None:
        if settings.logprobs is None:
            return None
        out = []
        for tid in ids:
            tok = chr(tid - OFFSET)
            # A fixed, normalised-looking distribution: the echoed token, then the next code points.
            top = [(tok, math.log(0.5))] + [(chr(tid - OFFSET + k), math.log(0.5 / 2 ** k))
                                           for k in range(1, settings.logprobs)]
            out.append(TokenLogprob(token=tok, logprob=math.log(0.5), top=top[:settings.logprobs]))
        return out

    async def check_health(self) -> None:
        if not self.healthy:
            raise EngineError("echo engine is marked unhealthy")

    async def reseed(self, seed: int) -> None:
        self.seed = seed  # nothing random here: recorded for tests

    async def release_for_snapshot(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        self.healthy = False
