"""Choosing each row's next token from its logits, as OpenAI's parameters say.

Per row: presence and frequency penalties on the tokens it generated so far
(``logit -= frequency * count + presence * (count > 0)``), then greedy (``temperature == 0``)
or sampling from ``softmax(logits / temperature)`` cut to the smallest set of tokens whose
probability reaches ``top_p``. A row with a ``seed`` draws from its own generator, so its output
depends on nothing but the request; other rows draw from the engine's generator (reseeded after
a snapshot restore). Log-probabilities are those of the model's distribution (before penalties
and temperature), as vLLM reports them.

When every row is greedy without penalties (the common case and the first-token probe) the
whole batch is one ``argmax``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .engine import SamplingSettings

__all__ = ["RowSampler", "sample", "token_logprobs"]


@dataclass
class RowSampler:
    """One row's sampling state: its settings, its own generator (when seeded), and the counts of
    the tokens it generated (a [vocab] tensor, made when penalties need it)."""

    settings: SamplingSettings
    generator: Any = None
    counts: Any = None

    @property
    def greedy_plain(self) -> bool:
        s = self.settings
        return s.temperature == 0 and not s.presence_penalty and not s.frequency_penalty

    def record(self, token: int, vocab: int, device: Any) -> None:
        s = self.settings
        if s.presence_penalty or s.frequency_penalty:
            import torch

            if self.counts is None:
                self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            self.counts[token] += 1


def sample(logits: Any, rows: list[RowSampler | None], default_generator: Any) -> Any:
    """Next tokens ``[B]`` (long, on the logits' device) for ``logits`` ``[B, vocab]``; rows
    that are None (padding) get the argmax."""
    import torch

    if all(r is None or r.greedy_plain for r in rows):
        return logits.argmax(-1)
    out = logits.argmax(-1)
    for i, r in enumerate(rows):
        if r is None or r.greedy_plain:
            continue
        s = r.settings
        x = logits[i]
        if r.counts is not None:
            x = x - s.frequency_penalty * r.counts - s.presence_penalty * (r.counts > 0).float()
        if s.temperature == 0:
            out[i] = x.argmax()
            continue
        probs = torch.softmax(x / s.temperature, -1)
        if s.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(-1) - sp < s.top_p  # the first token is always kept
            sp = sp * keep
            pick = torch.multinomial(sp / sp.sum(), 1, generator=r.generator or default_generator)
            out[i] = si[pick[0]]
        else:
            out[i] = torch.multinomial(probs, 1, generator=r.generator or default_generator)[0]
    return out


def token_logprobs(logits_row: Any, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of ``token``, the ``top`` most likely (token, log-probability) pairs)."""
    import torch

    lp = torch.log_softmax(logits_row.float(), -1)
    own = float(lp[token])
    if not top:
        return own, []
    v, i = lp.topk(top)
    return own, list(zip(i.tolist(), v.tolist()))
