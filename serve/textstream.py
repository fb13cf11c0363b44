"""Turning one request's generated tokens into streamed text deltas, with stop strings.

The text is always ``tokenizer.decode(all generated ids)`` (special tokens skipped), so what the
deltas add up to equals the unstreamed completion whatever the tokenizer's merges. A delta
holds back text that may still change: a trailing U+FFFD (an incomplete UTF-8 sequence) and the
last ``len(longest stop) - 1`` characters (they may begin a stop string). A stop string ends the
completion before it (it is not returned); so does an end-of-sequence token (not returned as text).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TextStream"]


class TextStream:
    """One request's output. ``push(token)`` -> (new text, finish reason or None)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], eos_ids: set[int], max_tokens: int) -> None:
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.eos = eos_ids
        self.max_tokens = max_tokens
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already sent
        self.finish: str | None = None

    def _text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, str | None]:
        """Add a generated token. Returns the text to send now and, on the last token, the
        finish reason ("stop" or "length")."""
        if self.finish:
            raise RuntimeError("push after the completion finished")
        if token in self.eos:
            self.finish = "stop"
            return self._flush(self._text()), self.finish
        self.ids.append(token)
        text = self._text()
        for_stop = [i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0]
        if for_stop:
            self.finish = "stop"
            end = min(for_stop)
            out = text[self.sent:end] if end > self.sent else ""
            self.sent = max(self.sent, end)
            return out, self.finish
        if len(self.ids) >= self.max_tokens:
            self.finish = "length"
            return self._flush(text), self.finish
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        if end <= self.sent:
            return "", None
        out = text[self.sent:end]
        self.sent = end
        return out, None

    def _flush(self, text: str) -> str:
        out = text[self.sent:]
        self.sent = len(text)
        return out
