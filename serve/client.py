"""Talking to a replica over HTTP: JSON requests, waiting for /health, the first-token probe."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any, Callable

from casfs import parse_listen

from .errors import BootError

__all__ = ["CONTROL_HEADER", "PROBE_PROMPT", "first_token", "http_json", "wait_ready"]

PROBE_PROMPT = "The quick brown fox"
CONTROL_HEADER = "X-Casfs-Control"


def http_json(listen: str, method: str, path: str, body: dict | None = None, *, timeout: float = 10.0,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One HTTP request to the replica; returns (status, parsed JSON or text). Raises OSError."""
    host, port = parse_listen(listen)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode("utf-8", "replace")
    finally:
        conn.close()


def wait_ready(listen: str, timeout: float, alive: Callable[[], str | None]) -> None:
    """Poll GET /health until 200. ``alive()`` returns None while the replica runs, else why it
    is gone. Raises BootError on death or timeout."""
    deadline = time.monotonic() + timeout
    while True:
        why = alive()
        if why:
            raise BootError(why)
        try:
            status, _ = http_json(listen, "GET", "/health", timeout=5.0)
            if status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise BootError(f"the replica did not answer /health with 200 within {timeout:.0f} s")
        time.sleep(0.05)


def first_token(listen: str, model: str, prompt: str = PROBE_PROMPT, timeout: float = 120.0) -> tuple[float, str]:
    """Stream a greedy completion; returns (seconds until the first token's event, its text)."""
    host, port = parse_listen(listen)
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0,
                           "stream": True}).encode()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise BootError(f"first-token probe: HTTP {resp.status}: {resp.read()[:300]!r}")
        while True:
            line = resp.readline()
            if not line:
                raise BootError("first-token probe: the stream ended without a token")
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise BootError(f"first-token probe: {event['error'].get('message')}")
                text = event["choices"][0].get("text", "")
                if text or event["choices"][0].get("finish_reason"):
                    return time.monotonic() - t0, text
    finally:
        conn.close()
