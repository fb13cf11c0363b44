"""Batching concurrent requests onto one model: a scheduler thread and the requests' hand-off to asyncio.

Requests wait in arrival order. The scheduler thread takes as many as fit one batch (at most
``max_batch``, and together within the KV cache: the longest prompt plus the largest
``max_tokens`` must fit ``max_len``, since rows are left-padded to one length), runs the batch
to its end through ``run_batch`` (the engine's prefill and decode loop), then takes the next. A
request that arrives while a batch runs waits for the next one (static batching: simple, and
the decode step costs about the same for 2 rows as for 8 on a GPU, where it reads the weights
once per step either way).

Deltas go from the scheduler thread to the request's asyncio queue with
``loop.call_soon_threadsafe``. ``pause()`` waits for the running batch to end and holds the
next ones back (the engine releases its GPU memory only while paused); ``resume()`` lets them go.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .engine import SamplingSettings

__all__ = ["BatchRequest", "Scheduler"]

log = logging.getLogger("serve.batching")


@dataclass
class BatchRequest:
    """One request as the scheduler sees it. ``emit`` delivers a Delta or an exception to the
    requester's event loop; ``aborted`` is set when the requester went away."""

    request_id: str
    prompt_ids: list[int]
    settings: SamplingSettings
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[Any]"
    aborted: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Any) -> None:
        if not self.aborted.is_set():
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            except RuntimeError:  # the requester's loop is closed
                self.aborted.set()


class Scheduler:
    """See the module docstring. ``run_batch(requests)`` must emit every request's deltas and
    may raise: the error is delivered to each request of the batch that is not finished."""

    def __init__(self, run_batch: Callable[[list[BatchRequest]], None], max_batch: int, max_len: int,
                 name: str = "serve-batches") -> None:
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_len = max_len
        self._pending: deque[BatchRequest] = deque()
        self._cv = threading.Condition()
        self._paused = False
        self._busy = False
        self._stopped = False
        self.batches = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, req: BatchRequest) -> None:
        with self._cv:
            if self._stopped:
                raise RuntimeError("the engine is closed")
            self._pending.append(req)
            self._cv.notify_all()

    def abort(self, req: BatchRequest) -> None:
        req.aborted.set()
        with self._cv:
            try:
                self._pending.remove(req)
            except ValueError:
                pass

    def pause(self, timeout: float | None = None) -> bool:
        """Hold new batches back and wait until none runs; True when idle within ``timeout``."""
        with self._cv:
            self._paused = True
            return self._cv.wait_for(lambda: not self._busy, timeout)

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            pending = list(self._pending)
            self._pending.clear()
            self._cv.notify_all()
        for r in pending:
            r.emit(RuntimeError("the engine was closed"))
        self._thread.join(30)

    def _take(self) -> list[BatchRequest]:
        """The next batch (called with the lock held, pending non-empty)."""
        batch: list[BatchRequest] = []
        longest = most_new = 0
        for req in list(self._pending):
            if len(batch) >= self.max_batch:
                break
            lp, mn = max(longest, len(req.prompt_ids)), max(most_new, req.settings.max_tokens)
            if batch and lp + mn > self.max_len:
                continue  # does not fit with these rows: it leads a later batch
            batch.append(req)
            longest, most_new = lp, mn
        for req in batch:
            self._pending.remove(req)
        return batch

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopped or (self._pending and not self._paused))
                if self._stopped:
                    return
                batch = self._take()
                self._busy = True
            try:
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(batch))
                self._run_batch(batch)
            except BaseException as e:  # noqa: BLE001 - handed to the requests
                log.exception("a batch of %d failed", len(batch))
                for r in batch:
                    r.emit(e)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
